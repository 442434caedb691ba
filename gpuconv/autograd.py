"""The tape: Tensor, Function, backward() and no_grad(), define-by-run like DeZero, Chainer, PyTorch.

A Tensor wraps one NumPy or CuPy array (`.data`). Calling a Function on Tensors runs its
`forward` on their arrays and, when some input requires grad and grad mode is on, records one
node: the function object itself, holding what its backward needs and the nodes of its inputs.
`loss.backward()` walks the nodes in decreasing generation order (a heap), so a tensor used
twice has both gradients summed before its own node runs; each node's `backward` returns one
gradient per input, and a leaf that requires grad (a Parameter) adds it into `.grad`.

What a node keeps: its saved arrays and, per input, the input's node (intermediate tensors) or
the input itself (leaves). An activation is therefore alive only while some node saved it for
its backward, and `backward()` frees each node's saved arrays once used (retain_graph=False),
so the memory of a step falls as its backward proceeds.

The ops themselves are plain array functions in gpuconv.ops (conv2d / conv2d_backward, ...): a
Function here or in gpuconv.functional is a thin record around one such pair.
"""
import heapq
import itertools
import threading

import numpy as np

from .backend import device_of, device_scope, get_array_module, is_device_array, parse_device, to_device
from .errors import ArgumentError, DTypeError, ShapeError
from .ops import cpu_parts

_mode = threading.local()  # grad mode is per thread, as in PyTorch


def is_grad_enabled():
    return getattr(_mode, "enabled", True)


class _GradMode:
    """Base of no_grad / enable_grad: a context manager and a decorator."""
    value = True

    def __enter__(self):
        self._previous = is_grad_enabled()
        _mode.enabled = self.value

    def __exit__(self, *exc):
        _mode.enabled = self._previous
        return False

    def __call__(self, function):
        def wrapper(*args, **kwargs):
            with type(self)():
                return function(*args, **kwargs)
        wrapper.__name__, wrapper.__doc__ = function.__name__, function.__doc__
        return wrapper


class no_grad(_GradMode):
    """`with gpuconv.no_grad():` records no graph and keeps nothing for backward (inference)."""
    value = False


class enable_grad(_GradMode):
    value = True


# ----------------------------------------------------------------------------------------------
# Tensor


def _operand(value, like):
    """The other operand of an arithmetic op: a Tensor or an array as it is; a Python scalar as an
    array of `like`'s dtype and device, so that `x * 2.0` stays float32 and on the GPU."""
    if isinstance(value, Tensor):
        return value
    if like is not None and np.isscalar(value):
        return get_array_module(like).asarray(value, dtype=like.dtype)
    return value


class Tensor:
    """An array with a gradient. `.data` is the NumPy or CuPy array; `.grad` is an array of the same
    shape and device (or None) that backward() adds into; `.requires_grad` says whether it should."""

    __array_priority__ = 1000  # numpy_array + tensor calls Tensor.__radd__, not numpy's add
    _grad_hooks = ()           # register_post_accumulate_grad_hook(); none by default

    def __init__(self, data, requires_grad=False, creator=None):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "dtype") or not hasattr(data, "shape"):
            data = np.asarray(data)
        if requires_grad and data.dtype.kind != "f":
            raise DTypeError(f"requires_grad: only floating-point tensors can require grad, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = creator  # the Function that made it, None for a leaf

    # ----- what it is -----
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    is_leaf = property(lambda self: self.creator is None)

    @property
    def device(self):
        return parse_device(device_of(self.data))

    def __len__(self):
        return len(self.data)

    def __bool__(self):
        return bool(self.data)  # one element only, as NumPy and PyTorch

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({self.numpy()!r}{grad}, device='{device_of(self.data)}')".replace("\n", "\n       ")

    def item(self):
        """The value of a one-element tensor as a Python number (a sync on the GPU)."""
        if self.data.size != 1:
            raise ShapeError(f"item(): expected a tensor with one element, got shape {self.shape}")
        return self.data.reshape(-1)[0].item()

    def numpy(self):
        """The data as a NumPy array (copied to the host from a GPU; the same array on the CPU)."""
        return to_device(self.data, "cpu")

    def detach(self):
        """The same data, outside the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on `device` (itself if already there). A leaf keeps requires_grad."""
        data = to_device(self.data, device)
        if data is self.data:
            return self
        return Tensor(data, requires_grad=self.requires_grad) if self.is_leaf else _Copy(device)(self)

    def argmax(self, dim=None):
        return Tensor(self.data.argmax(axis=dim))

    # ----- the tape -----
    def backward(self, grad=None, retain_graph=False):
        """Gradients of this tensor with respect to every leaf that requires grad, added into
        their `.grad`. `grad` defaults to 1 for a one-element tensor (a loss)."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad (no input of the ops "
                               "that made it requires grad, or it was computed under gpuconv.no_grad())")
        if is_device_array(self.data):
            # The backward allocates where the loss lives: make that GPU current (cuda:N for any N),
            # and name the backward in an out-of-memory error.
            from .cuda.runtime import device_errors
            with device_scope(self.data), device_errors("backward", {"loss": self.shape}):
                self._backward(grad, retain_graph)
        else:
            self._backward(grad, retain_graph)

    def _backward(self, grad, retain_graph):
        if grad is None:
            if self.data.size != 1:
                raise ShapeError(f"backward(): grad can be omitted only for a one-element tensor "
                                 f"(a loss), this one has shape {self.shape}; pass grad=")
            grad = get_array_module(self.data).ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != self.shape:
                raise ShapeError(f"backward(): grad must have the tensor's shape {self.shape}, got {tuple(grad.shape)}")
        if self.creator is None:
            _accumulate(self, grad)
            return
        _run_backward(self.creator, grad, retain_graph)

    def register_post_accumulate_grad_hook(self, hook):
        """Call hook(tensor) each time backward() has added a gradient into this leaf's .grad
        (PyTorch's name; gpuconv.distributed starts a bucket's all-reduce from it). Returns a
        handle whose remove() takes the hook off."""
        if self.creator is not None:
            raise RuntimeError("register_post_accumulate_grad_hook: only a leaf tensor (a Parameter) "
                               "accumulates a .grad")
        self._grad_hooks = self._grad_hooks + (hook,)
        return _HookHandle(self, hook)

    # ----- arithmetic (broadcasting as NumPy) -----
    def __add__(self, other): return Add()(self, _operand(other, self.data))
    def __radd__(self, other): return Add()(_operand(other, self.data), self)
    def __sub__(self, other): return Sub()(self, _operand(other, self.data))
    def __rsub__(self, other): return Sub()(_operand(other, self.data), self)
    def __mul__(self, other): return Mul()(self, _operand(other, self.data))
    def __rmul__(self, other): return Mul()(_operand(other, self.data), self)
    def __truediv__(self, other): return Div()(self, _operand(other, self.data))
    def __rtruediv__(self, other): return Div()(_operand(other, self.data), self)
    def __neg__(self): return Neg()(self)
    def __matmul__(self, other): return MatMul()(self, other)
    def __rmatmul__(self, other): return MatMul()(other, self)
    def __pow__(self, exponent): return Pow(exponent)(self)
    def __getitem__(self, index): return GetItem(index)(self)

    def sum(self, dim=None, keepdim=False): return Sum(dim, keepdim)(self)
    def mean(self, dim=None, keepdim=False): return Mean(dim, keepdim)(self)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape(shape)(self)

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        """Merge dims start_dim..end_dim into one: x.flatten(1) turns (N, C, H, W) into (N, C*H*W)."""
        shape = self.shape
        start, end = start_dim % max(len(shape), 1), end_dim % max(len(shape), 1)
        merged = int(np.prod(shape[start:end + 1]))
        return self.reshape(shape[:start] + (merged,) + shape[end + 1:])


def tensor(data, requires_grad=False, dtype=None, device=None):
    """A new leaf Tensor holding a copy of `data` (a list, a NumPy or CuPy array)."""
    data = data.data if isinstance(data, Tensor) else data
    xp = get_array_module(data) if hasattr(data, "dtype") else np
    array = xp.array(data, dtype=dtype, copy=True)
    if device is not None:
        array = to_device(array, device)
    return Tensor(array, requires_grad=requires_grad)


def as_tensor(value):
    """A Tensor as it is; an array wrapped (no copy, no grad)."""
    return value if isinstance(value, Tensor) else Tensor(value)


# ----------------------------------------------------------------------------------------------
# Function and the backward walk

_order = itertools.count()  # ties in generation are broken by recording order, newest first


class Function:
    """One op on the tape. Subclasses define

        forward(*arrays) -> array           the op on plain arrays
        backward(grad_output) -> grads      one array (or None) per input

    and may keep arrays on `self` for backward. `self.needs_input_grad[i]` tells forward and
    backward whether input i needs a gradient (a first conv's input does not, so its backward
    skips the whole data gradient). A subclass whose backward returns a new array per input, held
    by nothing else, sets `fresh_grads = True`: a leaf then keeps it as its .grad without a copy."""

    fresh_grads = False

    def __call__(self, *inputs):
        # One pass over the inputs (a compiled model's node has one per parameter): on the CPU
        # this bookkeeping is a measurable share of a small model's step.
        arrays, needs = [], []
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
                needs.append(x.requires_grad)
            else:
                arrays.append(x)
                needs.append(False)
        record = any(needs) and is_grad_enabled()
        self.needs_input_grad = tuple(needs) if record else (False,) * len(inputs)
        if arrays and is_device_array(arrays[0]):
            with device_scope(arrays[0]):  # CuPy allocates and launches on the current GPU: the data's
                output = self.forward(*arrays)
        else:
            output = self.forward(*arrays)
        if not record:
            return Tensor(output)
        # per input: (leaf tensor, None) or (None, its creator) or (None, None) for a constant
        self.inputs, generation = [], 0
        for x, needed in zip(inputs, needs):
            if not needed:
                self.inputs.append((None, None))
            elif x.creator is None:
                self.inputs.append((x, None))
            else:
                self.inputs.append((None, x.creator))
                generation = max(generation, x.creator.generation + 1)
        self.generation = generation
        self.order = next(_order)
        self.freed = False
        self.dtype = output.dtype  # gradients reaching this node are cast to it (float64 * float32 input)
        return Tensor(output, requires_grad=True, creator=self)

    def forward(self, *arrays):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def release(self):
        """Drop what backward needed (called after this node's backward unless retain_graph)."""
        for name in list(vars(self)):
            if name not in ("inputs", "generation", "order", "needs_input_grad", "freed", "dtype"):
                delattr(self, name)
        self.freed = True


def _accumulate(leaf, grad, fresh=False):
    """leaf.grad += grad, PyTorch's accumulation; the first gradient is copied (unless `fresh`: an
    array no one else holds), so the leaf owns its .grad and the in-place adds that follow touch
    nothing else."""
    if not leaf.requires_grad:
        return
    if grad.shape != leaf.data.shape:
        raise ShapeError(f"gradient of shape {tuple(grad.shape)} for a tensor of shape {leaf.shape}")
    if grad.dtype != leaf.data.dtype:
        grad = grad.astype(leaf.data.dtype)
    if leaf.grad is None:
        buffer = leaf.__dict__.get("grad_buffer")  # a view of an optimizer's flat gradient buffer
        if (buffer is not None and buffer.shape == grad.shape and buffer.dtype == grad.dtype
                and device_of(buffer) == device_of(grad)):
            with device_scope(buffer):  # the copy runs on the buffer's GPU, whichever is current
                buffer[...] = grad
            leaf.grad = buffer
        else:
            with device_scope(grad):
                leaf.grad = grad if fresh else grad.copy()
    else:
        with device_scope(grad):
            leaf.grad += grad
    for hook in leaf._grad_hooks:
        hook(leaf)


class _HookHandle:
    def __init__(self, tensor, hook):
        self.tensor, self.hook = tensor, hook

    def remove(self):
        self.tensor._grad_hooks = tuple(h for h in self.tensor._grad_hooks if h is not self.hook)


def _run_backward(root, grad, retain_graph):
    pending = {root: grad}  # node -> the sum of its output's gradients so far
    heap = [(-root.generation, -root.order, root)]
    queued = {root}
    while heap:
        _, _, node = heapq.heappop(heap)
        grad_output = pending.pop(node)
        if node.freed:
            raise RuntimeError(f"backward() through {type(node).__name__} a second time: its saved arrays "
                               "were freed by the first backward; pass retain_graph=True to the first call")
        grads = node.backward(grad_output)
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != len(node.inputs):
            raise RuntimeError(f"{type(node).__name__}.backward returned {len(grads)} gradients for "
                               f"{len(node.inputs)} inputs")
        for (leaf, creator), g in zip(node.inputs, grads):
            if g is None:
                continue
            if leaf is not None:
                _accumulate(leaf, g, node.fresh_grads)
            elif creator is not None:
                if g.dtype != creator.dtype:
                    g = g.astype(creator.dtype)
                if creator in pending:  # a tensor read twice (a residual block's input): its gradients' sum
                    pending[creator] = _add(pending[creator], g)
                else:
                    pending[creator] = g
                if creator not in queued:
                    queued.add(creator)
                    heapq.heappush(heap, (-creator.generation, -creator.order, creator))
        if not retain_graph:
            node.release()


# ----------------------------------------------------------------------------------------------
# arithmetic and shape Functions (what a CNN's forward writes between its layers)


def sum_to(array, shape):
    """Sum a broadcast gradient back to `shape` (NumPy's broadcasting rules, reversed)."""
    if tuple(array.shape) == tuple(shape):
        return array
    lead = array.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, size in enumerate(shape) if size == 1 and array.shape[i + lead] != 1)
    out = array.sum(axis=axes, keepdims=True)
    return out.reshape(shape) if lead else out


def _add(a, b):
    """a + b, a new array; two large float32 NumPy arrays of one shape (a residual add, the sum of
    a block input's two gradients) in parts over the cores, with the same bits."""
    if cpu_parts.elementwise_in_parts(a, b) and a.dtype == np.float32:
        return cpu_parts.elementwise(np.add, a, b)
    return a + b


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return _add(a, b)

    def backward(self, g):
        return sum_to(g, self.shapes[0]), sum_to(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, g):
        return sum_to(g, self.shapes[0]), (-sum_to(g, self.shapes[1]) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a = a if self.needs_input_grad[1] else None  # each gradient needs the other factor
        self.b = b if self.needs_input_grad[0] else None
        self.shapes = (a.shape, b.shape)
        return a * b

    def backward(self, g):
        ga = sum_to(g * self.b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = sum_to(g * self.a, self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        ga = sum_to(g / self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(-g * self.a / (self.b * self.b), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    def __init__(self, exponent):
        if not np.isscalar(exponent):
            raise ArgumentError(f"exponent: expected a number, got {type(exponent).__name__}")
        self.exponent = exponent

    def forward(self, a):
        self.a = a
        return a ** self.exponent

    def backward(self, g):
        return g * self.exponent * self.a ** (self.exponent - 1)


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim != 2 or b.ndim != 2:
            raise ShapeError(f"@: gpuconv multiplies 2-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        return (g @ self.b.T if self.needs_input_grad[0] else None,
                self.a.T @ g if self.needs_input_grad[1] else None)


def _axes(dim, ndim):
    if dim is None:
        return None
    return tuple(d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))


class Sum(Function):
    def __init__(self, dim=None, keepdim=False):
        self.dim, self.keepdim = dim, keepdim

    def forward(self, a):
        self.shape, self.axes = a.shape, _axes(self.dim, a.ndim)
        return a.sum(axis=self.axes, keepdims=self.keepdim)

    def backward(self, g):
        xp = get_array_module(g)
        if not self.keepdim and self.axes is not None:
            g = xp.expand_dims(g, self.axes)
        return xp.broadcast_to(g, self.shape)


class Mean(Sum):
    def forward(self, a):
        y = super().forward(a)
        self.count = a.size // max(y.size, 1) if a.size else 1
        return y / y.dtype.type(self.count) if hasattr(y, "dtype") else y / self.count

    def backward(self, g):
        return super().backward(g / g.dtype.type(self.count))


class Reshape(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, a):
        self.input_shape = a.shape
        return a.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.input_shape)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, a):
        self.input_shape, self.dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, g):
        xp = get_array_module(g)
        dx = xp.zeros(self.input_shape, self.dtype)
        xp.add.at(dx, self.index, g)  # repeated indices add, as the gradient of a gather must
        return dx


class Cat(Function):
    def __init__(self, dim):
        self.dim = dim

    def forward(self, *arrays):
        self.sizes = [a.shape[self.dim] for a in arrays]
        return get_array_module(*arrays).concatenate(arrays, axis=self.dim)

    def backward(self, g):
        xp = get_array_module(g)
        edges = list(itertools.accumulate(self.sizes))[:-1]
        pieces = xp.split(g, edges, axis=self.dim)
        return tuple(p if needs else None for p, needs in zip(pieces, self.needs_input_grad))


class _Copy(Function):
    """A device copy that gradients flow back through."""

    def __init__(self, device):
        self.device = device

    def forward(self, a):
        self.source = device_of(a)
        return to_device(a, self.device)

    def backward(self, g):
        return to_device(g, self.source)


def cat(tensors, dim=0):
    """Concatenate tensors along `dim` (channels: dim=1), as torch.cat."""
    tensors = list(tensors)
    if not tensors:
        raise ArgumentError("cat: expected a non-empty list of tensors, got an empty one")
    ndim = tensors[0].ndim if hasattr(tensors[0], "ndim") else np.ndim(tensors[0])
    return Cat(concat_axis(dim, ndim, "cat"))(*tensors)


def concat_axis(dim, ndim, caller):
    """dim (negative from the end, as in torch.cat) as an axis of `ndim`-dimensional arrays; an
    ArgumentError naming dim where it is out of range (np.concatenate would wrap it around)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ArgumentError(f"{caller}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ArgumentError(f"{caller}: dim {dim} is out of range for {ndim}-dimensional tensors "
                            f"(expected {-ndim} to {ndim - 1})")
    return int(dim) % ndim
