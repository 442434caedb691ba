"""Sequential: layers in a chain, forward in order and backward in reverse, plus summary()."""
from . import cpu_plan
from .module import Module


class Sequential(Module):
    # float32 NumPy batches run through gpuconv.nn.cpu_plan (same results, ~4x faster on LeNet-5)
    # when it supports every layer; use_fast_cpu(False) keeps this model on the layers.
    fast_cpu = True

    def __init__(self, *layers):
        self._names = []
        for index, layer in enumerate(layers):
            self.add(str(index), layer)

    def add(self, name, layer):
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential: layer {name!r} must be a gpuconv.nn.Module, got {type(layer).__name__}")
        setattr(self, name, layer)
        self._names.append(name)
        return self

    def named_children(self):
        for name in self._names:
            yield name, getattr(self, name)

    def __iter__(self):
        return (layer for _, layer in self.named_children())

    def __len__(self):
        return len(self._names)

    def __getitem__(self, index):
        return getattr(self, self._names[index])

    def use_fast_cpu(self, enabled=True):
        self.fast_cpu = bool(enabled)
        return self

    def forward(self, x):
        # None unless the fast CPU path applies; it does only for a NumPy x and NumPy parameters,
        # so the device check (a walk over every parameter, ~0.1 ms a step) is needed only when
        # it declines
        y = cpu_plan.forward(self, x)
        if y is not None:
            return y
        self.check_input_device(x)
        for layer in self:
            x = layer(x)
        return x

    def backward(self, dy, need_dx=True):
        """Back through the chain. The first layer is told whether anyone wants its input gradient:
        a network's first conv never does, and skipping it saves a whole col2im."""
        planned, dx = cpu_plan.backward(self, dy, need_dx)  # the plan ran the last forward
        if planned:
            return dx
        layers = list(self)
        for index in range(len(layers) - 1, -1, -1):
            dy = layers[index].backward(dy, need_dx=need_dx or index > 0)
        return dy

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
