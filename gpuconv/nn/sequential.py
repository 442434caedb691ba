"""Containers: Sequential (a chain, run in order), ModuleList (modules a forward indexes),
Residual (a residual connection: activation(body(x) + shortcut(x))) and Concat (branches side by
side on one input, their outputs concatenated)."""
import math

import numpy as np

from ..autograd import cat, concat_axis
from ..errors import ShapeError
from .module import Module


def _runs_cuda_kernels(x):
    from ..backend import uses_cuda_kernels
    return uses_cuda_kernels(getattr(x, "data", x))


def _fusable_pair(layer, following):
    """On a GPU a Conv2d or Linear followed by ReLU runs as one op with the ReLU in its epilogue
    (gpuconv.functional.conv2d / linear with activation="relu"); the result is the same."""
    from .layers import Conv2d, Linear, ReLU
    return type(following) is ReLU and type(layer) in (Conv2d, Linear)


class ModuleList(Module):
    """A list of modules whose parameters the parent sees (children named "0", "1", ...), for a
    forward that loops over blocks. A plain Python list would hide them from parameters()."""

    def __init__(self, modules=()):
        self._names = []
        for module in modules:
            self.append(module)

    def append(self, module):
        name = str(len(self._names))
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: entry {name} must be a gpuconv.nn.Module, got "
                            f"{type(module).__name__}")
        setattr(self, name, module)
        self._names.append(name)
        return self

    def named_children(self):
        for name in self._names:
            yield name, getattr(self, name)

    def __iter__(self):
        return (module for _, module in self.named_children())

    def __len__(self):
        return len(self._names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(list(self)[index])
        return getattr(self, self._names[index])


class Sequential(ModuleList):
    """Layers in a chain: forward(x) runs them in order."""

    def __init__(self, *layers):
        super().__init__(layers)

    def add(self, name, layer):
        """Append `layer` under `name` (its state_dict prefix)."""
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential: layer {name!r} must be a gpuconv.nn.Module, got {type(layer).__name__}")
        setattr(self, name, layer)
        self._names.append(name)
        return self

    def __getitem__(self, index):
        if isinstance(index, slice):  # a Sequential of those layers, under their names
            part = Sequential()
            for name in self._names[index]:
                part.add(name, getattr(self, name))
            return part
        return getattr(self, self._names[index])

    def forward(self, x):
        layers = list(self)
        fuse = _runs_cuda_kernels(x)
        index = 0
        while index < len(layers):
            layer = layers[index]
            if fuse and index + 1 < len(layers) and _fusable_pair(layer, layers[index + 1]):
                x = layer(x, activation="relu")  # the ReLU in the layer's epilogue
                index += 2
                continue
            x = layer(x)
            index += 1
        return x

    def layer_table(self, input_shape):
        """Per layer: (name, layer, output shape, parameter count, FLOPs per image). Shapes come
        from each layer's own output-size rule (no forward pass), so this works on any device."""
        rows, shape = [], (1,) + tuple(input_shape[1:]) if len(input_shape) == 4 else (1,) + tuple(input_shape)
        for name, layer in self.named_children():
            out = layer.output_shape(shape)
            params = sum(p.size for p in layer.parameters())
            rows.append((name, layer, out, params, layer.flops(shape, out)))
            shape = out
        return rows

    def summary(self, input_shape=(1, 1, 28, 28), print_fn=print):
        """Print each layer's output shape, parameters and forward FLOPs per image, with totals.
        FLOPs count a multiply-add as 2; backward costs about twice the forward."""
        rows = self.layer_table(input_shape)
        header = f"{'layer':<28}{'output shape':<22}{'params':>10}{'FLOPs':>14}{'im2col KiB':>12}"
        lines = [header, "-" * len(header)]
        for name, layer, out, params, flops in rows:
            label = f"{name}: {type(layer).__name__}"
            cols = layer.im2col_elements(out) * 4 / 1024 if hasattr(layer, "im2col_elements") else None
            cols_text = f"{cols:>12,.1f}" if cols is not None else f"{'':>12}"
            lines.append(f"{label:<28}{str(tuple(out[1:])):<22}{params:>10,}{flops:>14,}{cols_text}")
        total_params = sum(r[3] for r in rows)
        total_flops = sum(r[4] for r in rows)
        lines += ["-" * len(header),
                  f"{'total':<50}{total_params:>10,}{total_flops:>14,}",
                  f"input {tuple(input_shape)}, parameters on {self.device}, "
                  f"{total_params * 4 / 1024:.1f} KiB as float32; im2col KiB: the float32 column matrix "
                  "one image needs when a conv runs as a GEMM"]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return {"layers": [dict(name=n, type=type(l).__name__, output_shape=tuple(o), params=p, flops=f)
                           for n, l, o, p, f in rows],
                "total_params": total_params, "total_flops": total_flops, "text": text}


def _flops_and_shape(module, shape):
    """(forward FLOPs per image, output shape) of `module`, a layer or a Sequential (a subclass too,
    while it keeps Sequential's forward) run layer by layer, from the layers' own rules (no forward pass)."""
    if isinstance(module, Sequential) and type(module).forward is Sequential.forward:
        total = 0
        for layer in module:
            flops, shape = _flops_and_shape(layer, shape)
            total += flops
        return total, shape
    if not hasattr(module, "output_shape"):  # compiler._output_shape takes a TypeError as "no rule"
        raise TypeError(f"{type(module).__name__} has no output_shape rule (its forward is its own)")
    out = tuple(module.output_shape(shape))
    return module.flops(shape, out), out


class Residual(Module):
    """activation(body(x) + shortcut(x)): a residual connection (He et al. 2016) as a container.

    The same as a forward written in Python (`F.relu(x + self.body(x))`), but gpuconv.compile can
    lower this one into the CPU executor (a Python forward runs eagerly, op by op): the body and the
    shortcut become two branches of one plan op whose outputs are added. shortcut=None is the
    identity; activation=None applies nothing after the add. Children are named body, shortcut and
    activation (state_dict keys `body.0.weight`, ...)."""

    def __init__(self, body, shortcut=None, activation=None):
        for name, value in (("body", body), ("shortcut", shortcut), ("activation", activation)):
            if not isinstance(value, Module) and not (value is None and name != "body"):
                allowed = "a gpuconv.nn.Module" + ("" if name == "body" else " or None")
                raise TypeError(f"Residual: {name} must be {allowed}, got {type(value).__name__}")
        self.body, self.shortcut, self.activation = body, shortcut, activation

    def forward(self, x):
        y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return y if self.activation is None else self.activation(y)

    def output_shape(self, input_shape):
        shape = _flops_and_shape(self.body, tuple(input_shape))[1]
        return shape if self.activation is None else _flops_and_shape(self.activation, shape)[1]

    def flops(self, input_shape, output_shape):
        total, added = _flops_and_shape(self.body, tuple(input_shape))
        total += int(math.prod(added[1:]))  # the add
        if self.shortcut is not None:
            total += _flops_and_shape(self.shortcut, tuple(input_shape))[0]
        if self.activation is not None:
            total += _flops_and_shape(self.activation, added)[0]
        return total


class Concat(ModuleList):
    """cat([branch(x) for branch in branches], dim): branches side by side on one input, their
    outputs concatenated, by default along the channels (an Inception module; DenseNet's
    concatenation of x with f(x) takes nn.Identity() as one branch).

    The same as a forward written in Python (`gpuconv.cat([a(x), b(x)], dim=1)`), but
    gpuconv.compile can lower this one into the CPU executor when dim names the channels (1, -3 of
    NCHW input, -1 of a flat one; a Python forward runs eagerly, op by op): each branch becomes a
    chain of one plan op that writes its own channels of the output. Branches are named "0", "1", ... (state_dict keys `0.weight`, `1.0.weight`, ...).
    Their outputs must agree in every dimension but `dim`."""

    def __init__(self, *branches, dim=1):
        if not branches:
            raise TypeError("Concat: expected at least one branch, got none")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"Concat: dim must be an int, got {type(dim).__name__}")
        for position, branch in enumerate(branches):
            if not isinstance(branch, Module):
                raise TypeError(f"Concat: branch {position} must be a gpuconv.nn.Module, got {type(branch).__name__}")
        super().__init__(branches)
        self.dim = int(dim)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Concat(*list(self)[index], dim=self.dim)
        return super().__getitem__(index)

    def extra_repr(self):
        return f"dim={self.dim}"

    def forward(self, x):
        outputs = [branch(x) for branch in self]
        self._concat_axis([tuple(out.shape) for out in outputs])  # a clear error before np.concatenate's
        return cat(outputs, dim=self.dim)

    def _concat_axis(self, shapes):
        """The axis the branches' output `shapes` are concatenated along; a ShapeError naming the
        branch whose output differs beyond it."""
        axis = concat_axis(self.dim, len(shapes[0]), "Concat")
        for position, shape in enumerate(shapes):
            if len(shape) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(shape, shapes[0])) if i != axis):
                raise ShapeError(f"Concat: branch {position} gives shape {shape}, branch 0 {shapes[0]}: "
                                 f"expected them equal but for dim {self.dim}")
        return axis

    def _branch_shapes(self, input_shape):
        """(FLOPs, output shape) of each branch, and the concatenated shape."""
        results = [_flops_and_shape(branch, tuple(input_shape)) for branch in self]
        shapes = [shape for _, shape in results]
        axis = self._concat_axis(shapes)
        out = list(shapes[0])
        out[axis] = sum(shape[axis] for shape in shapes)
        return results, tuple(out)

    def output_shape(self, input_shape):
        return self._branch_shapes(input_shape)[1]

    def flops(self, input_shape, output_shape):
        return sum(flops for flops, _ in self._branch_shapes(input_shape)[0])
