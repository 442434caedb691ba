"""The CPU executor: a chain of layers run as one plan in the batch-innermost layout.

gpuconv.compile(model) (gpuconv/compiler.py) hands a float32 NumPy batch here. When every layer
of the chain lowers through the registry below (`LOWERINGS`: Conv2d with groups=1, ReLU, Tanh,
Sigmoid, MaxPool2d/AvgPool2d with stride == kernel and no padding, AdaptiveAvgPool2d(1),
BatchNorm2d (in training too), Flatten, Linear, Identity, Dropout when it is the identity, residual
blocks of those (`RESIDUALS`: nn.Residual, the zoo's BasicBlock with its ShortcutA), each one op
with two branches, and nn.Concat along the channels, one op with a branch per block of channels),
the whole chain runs here as one autograd Function. A chain lowerable in part
runs its runs of lowerable layers here (each a plan of its own, where worth it, see
compiler._worth_a_plan) and the rest eagerly; anything else runs eagerly, op by op, which stays
the reference. Gradients match that reference to float32 rounding. This module plans and runs (lowering, fusion, chunks, threads); the per-layer
ops are in cpu_ops.py. No layer or container knows this module exists.

Why it is faster than the layers (the measurements: docs/performance.md):

* Layout. Activations live as [C, H, W, n] (n, the images of a chunk, innermost); dense ones as
  [features, n]. A conv's product W @ columns is then already the next layer's input, Flatten is
  a free reshape ([C*H*W, n] in NCHW's flatten order), and NCHW is converted only at the edges.
* No im2col. With the column rows ordered (kh, c, kw), the columns of one output row are a
  contiguous block of R[ih, c, kw, ow, n] = x[c, ih, ow*S + kw, n], KH times smaller than the
  im2col matrix: each output row is a GEMM reading R in place (see ConvOp._row_matrices). With
  few filters (LeNet's conv1: 6) one GEMM does a whole pooling row, with a banded weight. The
  input gradient uses the same trick along H on the output gradient, then one reduce over kw,
  not col2im.
* Fusion. conv -> ReLU -> max pool runs as conv -> max pool -> (+bias, ReLU) on the 4x smaller
  map: max pooling commutes with adding a per-channel constant and with ReLU. Its output
  positions are ordered pool-tap-major, so each pooling tap is one contiguous block for the max,
  for routing the gradient to the first maximum and for dW. Ties are decided on the raw conv
  output, before the bias; only where the float32 bias add rounds two different raw values to
  the same number can the layers (first of the equal sums) and the plan (the larger raw value,
  as exact arithmetic would) route a gradient differently.
* Parts. NumPy's elementwise work runs on one core and OpenBLAS's threaded small GEMMs stall
  when the other core is busy. So the batch is split into parts, one for the caller and one per
  worker (a process where cpu_workers.supported(), else a thread); each runs the whole network on
  its rows with a single-threaded BLAS, and the parts' parameter gradients are summed. Two
  hand-overs per training step, none per layer. The split comes from the batch size and the
  number of workers alone (never from the BLAS thread count, which another thread may change, nor
  from timings), so the same batch always sums its gradients in the same order.
  With worker threads, running the same ops in lockstep, the two threads would run their short
  NumPy calls (and the Python between them, which holds the GIL) at the same moments; so in the
  backward every other part computes all the input gradients first and the weight gradients after
  (_Grads.add_later), which puts one thread's short calls (the dense layers, the pooling routes)
  beside the other's long GEMMs; this measured faster than lockstep and than swapping only each
  op's dW and dx. The dense layers' weight gradients wait in every thread: both threads start the
  backward with the dense layers, whose calls take microseconds, so the fewer of them there, the
  less each thread waits for the GIL. Processes run the same order, so both give the same bits.
* Meetings. A BatchNorm that normalizes by the batch (training) needs per-channel sums over every
  part. Its op yields its part's sums (cpu_ops: "Meetings"), and a plan holding one runs its parts
  in rounds (_Plan._in_rounds): one parallel region from one meeting to the next, the sums added
  in part order at each. Such a plan runs in threads (the sums stay in this process), each part as
  one chunk, without deferred weight gradients (a part would wait for the other's at every
  meeting), and its convs rebuild R in the backward instead of keeping it (ConvOp.recompute_rows).
* Memory. Buffers are allocated once per (chunk, layer) or per thread and reused while the batch
  size stays; no im2col matrix is kept (R is KH times smaller). What the caller receives
  (logits, input gradient, every p.grad) is always a new array.

What it does to the process (the README lists it for users): parts 1.. of a split batch run in
worker processes (cpu_workers.py: fresh interpreters, never a fork of the caller) where
cpu_workers.supported() and `processes` is on (and the plan has no meetings), else in `workers`
daemon threads; for the length of
each parallel region the BLAS thread count is 1 (and, with threads, Python's switch interval 0.2
ms), both restored exactly afterwards; regions run one at a time, under one lock. The number of
workers is GPUCONV_CPU_WORKERS in the environment, or gpuconv.set_cpu_workers(n); 0 runs
everything in the caller's thread; the default is one fewer than the CPUs this process may run on
(at most 7).
"""
import _thread
import contextlib
import os
import sys
import threading

import numpy as np

from .. import blas, fpenv
from ..errors import ArgumentError, DTypeError, ShapeError
from . import cpu_workers
from . import layers as L
from .sequential import Concat, Residual, Sequential
from .cpu_ops import (ActivationOp, BatchNormEvalOp, BatchNormTrainOp, BranchingOp, Chunk, ConcatOp, ConvOp, FlattenOp,
                      GlobalAvgPoolOp, IdentityOp, LinearOp, PoolOp, ResidualOp, Unsupported, backward_chain_steps,
                      finish, forward_chain_steps, gradients, mark_owned_gradients, owns_output, setup_chain)

MIN_CHUNK = 24          # fewer images than this per part is not worth a worker (docs/performance.md)
SWITCH_INTERVAL = 0.0002  # seconds: Python's thread switch interval while the plan's threads run
MAX_CHUNK = 128         # a thread runs its share in chunks of at most this many images
MAX_WORKERS = 7
FORK_CHECK_SECONDS = 0.05  # a wait for a worker thread looks this often whether it is in a forked child
processes = True        # parts 1.. in worker processes where cpu_workers.supported(), else threads

_pools = {}             # thread name -> its _Worker threads (created on first use), see _run_parallel
_pools_pid = None
PLAN_THREADS, OP_THREADS = "gpuconv-cpu", "gpuconv-ops"
_worker_count = None    # set_cpu_workers(); None: GPUCONV_CPU_WORKERS or the default


class _RegionLock(_thread.RLock):
    """The lock of the parallel regions (one at a time), knowing whether this thread holds it
    (held_here; _after_fork_in_child). Never entered twice by one thread (callers check held_here
    first). Its __enter__ and __exit__ are the C lock's own: a `with` block calls them with no
    Python frame around the acquire or the release, so there is no line at which a signal
    handler's exception (Ctrl-C) could leave the lock held for good. (The Python __exit__ this
    replaces could be interrupted on entry, before its release; test_a_real_ctrl_c_during_adds_in_parts
    once found the lock held after its interrupts, 2026-12-03.)"""

    def locked(self):
        """Held by any thread (an RLock has no locked() before Python 3.14)."""
        if self._is_owned():
            return True
        if self.acquire(blocking=False):
            self.release()
            return False
        return True

    def held_here(self):
        """Does the calling thread hold it? Then the call is nested inside that thread's own region:
        a signal handler run between its bytecodes while it waits for its workers."""
        return self._is_owned()


_region_lock = _RegionLock()
_saved_interval = None  # the switch interval a plan's region in flight restores (_switch_interval)


def _after_fork_in_child():
    """A fork while another thread was in a region: that thread does not exist in the child, which
    would wait for its lock forever and keep its settings (a 1-thread BLAS, a 0.2 ms switch
    interval) for good. The child gets a free lock and the settings from before the region. (A
    fork from the region's own thread keeps all: that thread leaves the region in the child too,
    running the parts its worker threads had not finished itself: _Worker.result.)"""
    global _region_lock, _saved_interval
    if _region_lock.locked() and not _region_lock.held_here():
        blas.restore_after_fork()
        if _saved_interval is not None:
            sys.setswitchinterval(_saved_interval)
            _saved_interval = None
        _region_lock = _RegionLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_workers(value, source):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ArgumentError(f"{source}: expected a whole number of worker threads >= 0 (0 runs in the "
                            f"caller's thread), got {value!r}")
    return int(value)


def set_cpu_workers(count):
    """Worker threads the CPU executor uses beside the caller's (0: the caller alone). None goes
    back to GPUCONV_CPU_WORKERS or the default. Takes effect at the next step."""
    global _worker_count
    _worker_count = None if count is None else _check_workers(count, "set_cpu_workers(count)")


def get_cpu_workers():
    """The worker threads a step uses besides the caller's."""
    if _worker_count is not None:
        return _worker_count
    text = os.environ.get("GPUCONV_CPU_WORKERS", "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = text
        return _check_workers(value, "GPUCONV_CPU_WORKERS")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(cpus - 1, MAX_WORKERS))


# ----------------------------------------------------------------------------------------------
# compiling a Sequential into ops


def steps(model):
    """The modules a model runs in order, each called on the previous one's output: a Sequential
    (or a subclass that keeps its forward) opened recursively; any other module (a layer, or a
    module whose forward is its own Python) is one step."""
    if type(model).forward is not Sequential.forward or not isinstance(model, Sequential):
        return [model]
    found = []
    for name in model._names:  # not iter(model): a compiled model takes its steps at every call
        found += steps(getattr(model, name))
    return found


def unlowerable(layer):
    """Why the executor cannot take `layer` as it is configured now (its training mode included),
    or None when it can. Independent of the input shape: a plan of such layers may still meet a
    shape it cannot take (_Plan.prepare then returns False)."""
    lowering = LOWERINGS.get(type(layer))
    if lowering is None:
        hint = ("; a residual connection written as nn.Residual lowers, and branches concatenated as nn.Concat"
                if layer.children() else "")
        return f"{type(layer).__name__} (its forward is Python the executor cannot lower{hint})"
    try:
        lowering([layer], 0, [])  # the lowering's own checks of the configuration, on the layer alone
    except Unsupported as why:
        return f"{type(layer).__name__}: {why}"
    return None


def batch_norm_modes(layer):
    """The training flags of `layer`'s BatchNorm2d modules (itself or inside it), in module order:
    the compiler keeps a plan per combination, as each is compiled differently (BatchNormTrainOp
    or BatchNormEvalOp; a BatchNorm without running statistics meets in both modes, and its
    forward in one mode must not recompile the plan a pending backward of the other needs)."""
    return tuple(module.training for module in layer.modules() if isinstance(module, L.BatchNorm2d))


def _signature(layers, x):
    """What the compiled ops depend on; any change recompiles (cheap: a tuple per layer)."""
    return (x.shape[1:],) + tuple(_layer_signature(layer) for layer in layers)


def _layer_signature(layer):
    kind = type(layer)
    # the Parameter objects too (params() keeps them): one assigned anew (layer.weight =
    # Parameter(...)) must get the gradient and be what the workers copy
    if kind is L.Conv2d:
        return (id(layer), kind, layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.weight.data.shape, layer.bias is None, id(layer.weight), id(layer.bias))
    if kind is L.Linear:
        return (id(layer), kind, layer.weight.data.shape, layer.bias is None, id(layer.weight), id(layer.bias))
    if kind in (L.MaxPool2d, L.AvgPool2d):
        return (id(layer), kind, layer.kernel_size, layer.stride, layer.padding)
    if kind is L.Dropout:
        return (id(layer), kind, layer.training and layer.p > 0)
    if kind is L.Flatten:
        return (id(layer), kind, layer.start_dim, layer.end_dim)
    if kind is L.BatchNorm2d:
        return (id(layer), kind, layer.training, layer.track_running_stats, layer.eps,
                layer.num_features, layer.weight is None, id(layer.weight), id(layer.bias))
    if kind is L.AdaptiveAvgPool2d:
        return (id(layer), kind, layer.output_size)
    if kind in RESIDUALS or kind is Concat:  # its layers (which may be replaced after compile), branch by branch
        return (id(layer), kind, getattr(layer, "dim", None)) + tuple(
            tuple(_layer_signature(part) for part in branch) for branch in branches_of(layer))
    # another kind (a ReLU, a layer a model registers): its plain hyper-parameters
    settings = tuple(sorted((name, value) for name, value in vars(layer).items()
                            if name != "training" and isinstance(value, (bool, int, float, str, tuple, type(None)))))
    return (id(layer), kind, settings)


def fused_conv_pools(layers):
    """How many Conv2d of `layers` (each lowerable), those in residual blocks and Concat branches
    included, the lowering fuses with a following [ReLU ->] MaxPool2d(k, stride k); shape-free,
    compiles nothing."""
    def count(ops):
        return sum(count(op.ops()) if isinstance(op, BranchingOp) else isinstance(op, ConvOp) and op.pool is not None
                   for op in ops)
    return count(_lower_chain(layers))


# The registry: layer type -> lowering(layers, index, ops) -> how many layers it consumed. A
# lowering appends ops, or raises Unsupported for a configuration it cannot run.
LOWERINGS = {}


def lowers(*kinds):
    def register(function):
        for kind in kinds:
            LOWERINGS[kind] = function
        return function
    return register


@lowers(L.Conv2d)
def _lower_conv(layers, index, ops):
    """Conv2d, fused with a following [ReLU ->] MaxPool2d(k, stride k) where there is one."""
    conv = layers[index]
    # ConvOp.setup checks these too; here, so that unlowerable() sees them without a shape
    if conv.groups != 1:
        raise Unsupported("conv groups")
    if conv.padding == "same" and (conv.stride != (1, 1) or any(
            d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation))):
        raise Unsupported("asymmetric 'same' padding")
    relu = index + 1 < len(layers) and type(layers[index + 1]) is L.ReLU
    pool_at = index + 1 + relu
    pool = layers[pool_at] if pool_at < len(layers) else None
    if type(pool) is L.MaxPool2d and pool.stride == pool.kernel_size and pool.padding == (0, 0):
        ops.append(ConvOp(layers[index], index, pool=pool.kernel_size, relu=relu))
        return pool_at + 1 - index
    ops.append(ConvOp(layers[index], index))
    return 1


@lowers(L.MaxPool2d, L.AvgPool2d)
def _lower_pool(layers, index, ops):
    pool = layers[index]
    if pool.stride != pool.kernel_size or pool.padding != (0, 0):  # as PoolOp.setup, for unlowerable()
        raise Unsupported("pool with stride != kernel or padding")
    ops.append(PoolOp(layers[index], index))
    return 1


@lowers(L.BatchNorm2d)
def _lower_batch_norm(layers, index, ops):
    """In eval with running statistics, a per-channel affine map (BatchNormEvalOp); on the batch's
    statistics (training, or no running statistics), BatchNormTrainOp, whose sums over the whole
    batch make the plan meet between its parts (_Plan._in_rounds)."""
    layer = layers[index]
    if (layer.weight is None) != (layer.bias is None):  # the eager path adds a bias only with a weight
        raise Unsupported("BatchNorm2d with only one of weight and bias")
    if layer.training or not layer.track_running_stats:
        ops.append(BatchNormTrainOp(layer, index))
    else:
        ops.append(BatchNormEvalOp(layer, index))
    return 1


@lowers(L.AdaptiveAvgPool2d)
def _lower_adaptive_avg_pool(layers, index, ops):
    if layers[index].output_size != (1, 1):
        raise Unsupported("AdaptiveAvgPool2d other than output_size=1 (the global average pool)")
    ops.append(GlobalAvgPoolOp(index))
    return 1


@lowers(L.ReLU, L.Tanh, L.Sigmoid)
def _lower_activation(layers, index, ops):
    # In place when nothing reads the previous output again (conv without pool, linear, eval batch norm,
    # a Concat's own buffer: cpu_ops.owns_output).
    in_place = bool(ops) and not ops[-1].needs_own_output and owns_output(ops[-1])
    ops.append(ActivationOp(layers[index], index, in_place))
    return 1


@lowers(L.Flatten)
def _lower_flatten(layers, index, ops):
    if (layers[index].start_dim, layers[index].end_dim) != (1, -1):
        raise Unsupported("Flatten other than start_dim=1, end_dim=-1")
    ops.append(FlattenOp(index))
    return 1


@lowers(L.Linear)
def _lower_linear(layers, index, ops):
    ops.append(LinearOp(layers[index], index))
    return 1


@lowers(L.Identity, L.Dropout)
def _lower_identity(layers, index, ops):
    layer = layers[index]
    if type(layer) is L.Dropout and layer.training and layer.p > 0:
        raise Unsupported("Dropout in training (the eager path draws its masks)")
    ops.append(IdentityOp(index))
    return 1


# Residual blocks: block type -> residual_parts(block) -> (body, shortcut, post), three lists of
# layers the registry lowers: the block computes post(body(x) + shortcut(x)), the shortcut empty
# for the identity, post empty for nothing after the add. A block type with its own forward
# registers here (gpuconv/models.py: BasicBlock) only when that forward computes exactly this.
RESIDUALS = {}


def lowers_residual(kind, residual_parts):
    """Register a residual block type: its layers, as residual_parts(block) lists them, run as one
    ResidualOp of the plan."""
    RESIDUALS[kind] = residual_parts
    LOWERINGS[kind] = _lower_residual


def _lower_residual(layers, index, ops):
    branches = [_lower_chain(branch) for branch in RESIDUALS[type(layers[index])](layers[index])]
    ops.append(ResidualOp(index, *branches))
    return 1


lowers_residual(Residual, lambda block: (
    steps(block.body), [] if block.shortcut is None else steps(block.shortcut),
    [] if block.activation is None else steps(block.activation)))


@lowers(Concat)
def _lower_concat(layers, index, ops):
    layer = layers[index]
    if layer.dim not in (1, -1, -3):
        raise Unsupported(f"Concat along dim {layer.dim} (the executor concatenates channels: dim 1, -3 of NCHW "
                          "or -1 of a flat input)")
    ops.append(ConcatOp(index, [_lower_chain(branch) for branch in branches_of(layer)], layer.dim))
    return 1


def branches_of(layer):
    """The layers of each branch of a residual block (body, shortcut, post) or of an nn.Concat."""
    if type(layer) is Concat:
        return [steps(branch) for branch in layer]
    return RESIDUALS[type(layer)](layer)


def _lower_chain(layers):
    """Layers -> ops through LOWERINGS (not set up yet). Raises Unsupported."""
    ops, index = [], 0
    while index < len(layers):
        lowering = LOWERINGS.get(type(layers[index]))
        if lowering is None:
            raise Unsupported(f"layer {type(layers[index]).__name__}")
        index += lowering(layers, index, ops)
    return ops


def _compile(layers, input_shape):
    """Layers -> ops through LOWERINGS, then each op set up for its input shape. Raises Unsupported."""
    ops = _lower_chain(layers)
    if any(op.meets for op in ops):
        # A plan that meets keeps every op's activations of the whole part at once (one chunk per
        # part): its convs rebuild their row copies R in the backward instead of keeping them
        # (ResNet-20's R kept took more memory at batch 128 than PyTorch's whole step)
        for op in _in_forward_order(ops):
            if isinstance(op, ConvOp):
                op.recompute_rows = True
    shape = setup_chain(ops, tuple(input_shape), copied_at_end=True)  # into the caller's array
    mark_owned_gradients(ops, False)  # the plan's output gradient is the caller's
    return ops, shape


def _split(batch, threads):
    """Row bounds of the parts: equal shares (the caller's part first).

    Equal shares are what measured fastest: a worker starts its part a few tens of microseconds
    after the caller (the hand-over) and runs its rows about as fast, so the two finish within
    a few tens of microseconds of each other; giving the caller 5% more rows made it the last
    to finish and the step slower (docs/performance.md). Depends on the batch size and the
    number of parts alone, so a batch always sums its gradients in the same order."""
    return [batch * t // threads for t in range(threads + 1)]


class _Grads:
    """Per-thread parameter gradients: the first contribution is kept (a fresh array from a
    matmul or a sum), later ones are added to it.

    add_later(param, compute) adds compute() now, or, when `deferring` (or for every thread,
    `always`), at flush(), which the plan calls after each chunk's backward: the weight
    gradients then run after all the input gradients, first layer first (see "Threads"). The
    buffers they read are the chunk's, and gradient buffers the thread's pool holds until flush()
    (`reads`); every parameter still gets the same contributions, added in the same order, so the
    numbers are the same bits. With `compute_now` (parts in processes) the values are computed at
    once and only their sums wait: the same bits, and the gradient buffers go back at once."""

    def __init__(self, deferring=False, pool=None, compute_now=False):
        self.arrays, self.deferring, self.deferred = {}, deferring, []
        self.pool, self.compute_now = pool, compute_now

    def add(self, param, value):
        key = id(param)
        if key in self.arrays:
            self.arrays[key][1] += value
        else:
            self.arrays[key] = [param, value]

    def add_later(self, param, compute, always=False, reads=None):
        """`reads`: the gradient buffer compute() reads, kept out of the pool until flush() (None:
        every buffer lent now, for an op that does not say)."""
        if not (self.deferring or always):
            self.add(param, compute())
        elif self.compute_now:
            value = compute()
            self.deferred.append((param, lambda: value))
        else:
            if self.pool is not None:
                self.pool.hold(reads)
            self.deferred.append((param, compute))

    def flush(self):
        """Compute the deferred gradients first layer first, then add them in the order the
        backward reached them, as an undeferred thread does (a layer used three times sums its
        weight gradients in that order either way)."""
        values = [compute() for _, compute in reversed(self.deferred)][::-1]
        for (param, _), value in zip(self.deferred, values):
            self.add(param, value)
        self.deferred.clear()
        if self.pool is not None:
            self.pool.flush()


# ----------------------------------------------------------------------------------------------
# running


class _Worker:
    """A persistent thread running one call at a time, handed over by a lock and back by a
    semaphore. (A ThreadPoolExecutor's submit and result go through Condition objects: more
    Python, with the GIL held, at the start and end of every parallel region: a measurable share
    of a step.) Calls are numbered, so a result is never taken for another call's."""

    def __init__(self, name):
        self.go, self.done = threading.Lock(), threading.Semaphore(0)
        self.go.acquire()
        self.ticket, self.call, self.outcome = 0, None, None
        self.last_run = 0  # the ticket of the call the thread last started (_loop)
        self.pid = os.getpid()  # a forked child has this object but not its thread (result())
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _run(self, call):
        ticket, function, argument = call
        try:
            self.outcome = (ticket, True, function(argument))
        except BaseException as error:  # handed to the caller, raised there
            self.outcome = (ticket, False, error)

    def _loop(self):
        while True:
            self.go.acquire()
            if self._run_new_call():
                self.done.release()

    def _run_new_call(self):
        """Runs the call handed over, if it is new -> whether it ran. A wake-up may be a spare one
        (result()'s re-wake): a call runs once, and only once the caller has counted it (its
        ticket is the caller's: submit's second line). Keeps nothing of the call when it returns,
        as the thread waits: its function may hold the caller's arrays (an array-level op's
        closure), which must die with the caller's last reference. self.call is cleared by the
        caller (result()), never here: a caller interrupted before it waited may already have
        handed over its next call, which this would wipe."""
        call = self.call  # read once: the caller may hand over its next call meanwhile
        if call is None or call[0] != self.ticket or call[0] == self.last_run:
            return False
        self.last_run = call[0]
        self._run(call)
        return True

    def submit(self, function, argument):
        """Hand a call over. Ctrl-C may stop this between any two lines: before the ticket is
        bumped the call does not count (the worker never runs it, the caller does not wait for
        it); after, it counts, and if the wake-up was not sent, result() sends it."""
        self.call = (self.ticket + 1, function, argument)
        self.ticket += 1
        self._wake()

    def _wake(self):
        try:
            self.go.release()
        except RuntimeError:  # already released: a spare wake-up not yet taken; one is enough
            pass

    def _finished(self):
        return self.outcome is not None and self.outcome[0] == self.ticket

    def result(self):
        """The call's return value (or its exception raised). Waits for the worker to finish even
        when Ctrl-C arrives meanwhile, then raises the KeyboardInterrupt: a worker left running
        would go on writing into buffers the next step uses.

        In a child forked while this call was pending (os.fork in a signal handler of the region's
        own thread), the worker thread did not come along: the call runs here, from its start.
        That gives the worker's bits: a part writes only its own slices of the region's outputs,
        each from inputs no part writes, so whatever the worker had written of it before the fork
        is simply written again. (Raising instead would also never hang, but would break a child
        that only wanted to go on with its work.) The wait is timed so that the loop sees the
        fork: a release from the fork hook could deadlock on the semaphore's own lock, which the
        signal handler's thread may hold."""
        interrupt = None
        while True:  # one acquire per call; more only after a stale release, an interrupt or a timeout
            try:  # the checks too: a signal handler's exception may come at any of these lines
                self.done.acquire(timeout=FORK_CHECK_SECONDS)
                if self._finished():
                    break
                if self.pid != os.getpid():
                    self._run(self.call)
                    break
                if self.last_run != self.ticket:  # not started: maybe never woken (submit)
                    self._wake()
            except BaseException as caught:  # a signal handler's exception; the wait goes on
                interrupt = interrupt or caught
        ticket, ok, value = self.outcome
        self.outcome = self.call = None
        if interrupt is not None:
            raise interrupt
        if not ok:
            raise value
        return value


def _run_parallel(function, parts, pool=PLAN_THREADS):
    """function(part) for each part; the first in this thread, the others in worker threads of
    `pool` (the plans' threads, or the array-level ops' own, so that a plan running in worker
    processes never has threads beside them). The caller holds _region_lock (one region at a
    time: the workers and the settings are process-wide). Waits on locks: an idle or waiting
    thread takes no CPU."""
    global _pools, _pools_pid
    if _pools_pid != os.getpid():  # a forked child inherits the objects, not the threads
        _pools, _pools_pid = {}, os.getpid()
    threads = _pools.setdefault(pool, [])
    while len(threads) < len(parts) - 1:
        threads.append(_Worker(pool))
    workers = threads[:len(parts) - 1]
    tickets = [worker.ticket for worker in workers]
    results, error = [], None
    env = fpenv.current()  # the caller's rounding mode and flush-to-zero hold in every part
    watched, met = fpenv.watched_errors(), _parts_errors()  # and its np.errstate (fpenv.py)

    def in_callers_env(part):
        with fpenv.noting_errors(watched, met):
            return function(part) if env is None else fpenv.run_in(env, function, part)
    try:  # an interrupt between the hand-overs, too, waits for the parts handed over
        for worker, part in zip(workers, parts[1:]):
            worker.submit(in_callers_env, part)
        results.append(function(parts[0]))  # noting already: every caller of this function notes for its region
    except BaseException as caught:
        error = caught
    workers = [worker for worker, ticket in zip(workers, tickets) if worker.ticket != ticket]
    for worker in workers:  # wait for all before anything returns or raises
        try:
            results.append(worker.result())
        except BaseException as caught:
            error = error or caught
    if error is not None:
        raise error
    return results


_noted = threading.local()  # .scopes: per region entered in this thread, the error kinds its parts met


def _parts_errors():
    """The set the parts of this thread's innermost region add the floating-point error kinds
    they meet to (a throwaway one outside `_reporting_parts_errors`)."""
    scopes = getattr(_noted, "scopes", None)
    return scopes[-1] if scopes else set()


class _reporting_parts_errors:
    """Around a region, outside its lock -> the set its parts add the error kinds they meet to
    (every part, the caller's own too, and what the caller does between them, such as a
    meeting's sums: fpenv.py). Once the region has ended they are reported in this thread, as this
    thread's np.errstate says (fpenv.report_errors), or appended to the list `into` as (kinds,
    where) for the caller to report (compiler.PlanFunction.forward). A callback or a warning hook
    may then run ops, even a compiled model: the region is over. Not after a region that raised:
    its error comes first. A stack, one set per region: a signal handler's op that runs while this
    thread waits for the region lock reports its own errors under its own errstate, not into the
    waiting call's."""

    __slots__ = ("where", "into", "met")  # a class, not a generator: it wraps every eager matmul

    def __init__(self, where, into=None):
        self.where, self.into = where, into

    def __enter__(self):
        self.met = set()
        _noted.__dict__.setdefault("scopes", []).append(self.met)
        return self.met

    def __exit__(self, kind, value, traceback):
        _noted.scopes.pop()  # this region's: one entered later (a signal handler's) has ended before it
        if kind is None and self.met:
            if self.into is None:
                fpenv.report_errors(self.met, self.where)
            else:
                self.into.append((self.met, self.where))
        return False


@contextlib.contextmanager
def _switch_interval(seconds):
    """Python's thread switch interval (process-wide) set to `seconds` for a block, then restored.

    A thread whose NumPy call has finished waits for the GIL while the other thread holds it; the
    holder lets go at its next large NumPy call, but one short call after another (the dense
    layers, the pooling bookkeeping) can retake it before the sleeping waiter wakes up (a wake-up
    is slow on a VM). The waiter only forces a hand-over after the switch interval (5 ms by
    default); 0.2 ms bounds that. A small measured gain (docs/performance.md)."""
    global _saved_interval
    # CPython keeps whole microseconds and truncates 1e6 * value: restore the same count
    previous = (round(sys.getswitchinterval() * 1e6) + 0.5) * 1e-6
    _saved_interval = previous
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        _saved_interval = None
        sys.setswitchinterval(previous)


def run_alone(function, *args):
    """function(*args) in this thread with the BLAS as it is, under the region lock: no other
    thread's parallel region sets the BLAS to one thread meanwhile. OpenBLAS's sums differ in the
    last bits between thread counts at some shapes, so without the lock a conv's result depended
    on whether another thread was in a region when it ran. Nested in this thread's own region
    (a signal handler's op), it runs at once: the lock is this thread's already."""
    if _region_lock.held_here():
        return function(*args)
    with _reporting_parts_errors("a gpuconv op") as met, _region_lock, \
            fpenv.noting_errors(fpenv.watched_errors(), met):  # reported after the lock (_reporting_parts_errors)
        return function(*args)


_pinned = threading.local()  # .count: the worker count of this thread's op call in flight (one_worker_count)


@contextlib.contextmanager
def one_worker_count():
    """One worker count for every parallel region this thread runs in the block (run_in_parts):
    an op that runs several regions (conv2d's backward: the gather, then the filter gradient)
    gives the bits of one worker count even when another thread calls set_cpu_workers meanwhile.
    Nested blocks keep the outermost count."""
    if getattr(_pinned, "count", None) is not None:
        yield
        return
    _pinned.count = get_cpu_workers()
    try:
        yield
    finally:
        _pinned.count = None


def run_in_parts(function, batch):
    """function(start, stop) for equal parts of range(batch), one per core -> results in part order.

    For array-level ops whose work splits over the batch (gpuconv/ops/conv_cpu.py): the first
    part runs in this thread, the others in worker threads of their own ("gpuconv-ops"; threads,
    not processes: the arrays are the caller's), as a parallel region like a plan's, with a 1-thread
    BLAS restored afterwards. Python's switch interval is left alone: a part makes a few long
    NumPy calls per chunk, not a plan's many short ones. A batch of one image, or no workers,
    runs in this thread alone and leaves the BLAS as it is (run_alone). So does a call nested in this
    thread's own region (a signal handler's op): waiting for the region's lock would wait forever,
    and the region's workers are busy."""
    if _region_lock.held_here():
        return [function(0, batch)]
    workers = getattr(_pinned, "count", None)
    parts = max(1, min((get_cpu_workers() if workers is None else workers) + 1, batch))
    if parts == 1:
        return [run_alone(function, 0, batch)]
    bounds = _split(batch, parts)
    with _reporting_parts_errors("a gpuconv op run in parts on CPU workers") as met, _region_lock, \
            blas.num_threads(1), fpenv.noting_errors(fpenv.watched_errors(), met):
        return _run_parallel(lambda part: function(bounds[part], bounds[part + 1]), list(range(parts)),
                             pool=OP_THREADS)


class _Plan:
    """One model's compiled chain, its layout over threads and chunks, and the buffers they reuse.
    `forwards` counts forward runs: the backward of a forward is only valid while no other
    forward has replaced the saved activations (see gpuconv/compiler.py)."""

    def __init__(self):
        self.signature = None
        self.ops = None
        self.parts = []          # per thread: list of Chunk
        self.threads = 1
        self.batch = None
        self.layout_key = None
        self.scratch = []        # per thread: buffers its ops reuse chunk after chunk
        self.forwards = 0
        self.compiles = 0        # worker processes keep one compiled copy per (plan, compile)
        self.meets = False       # a BatchNorm that trains: the parts meet (_in_rounds)
        self.layers = None
        self._params = None
        self.training = True
        self.in_processes = False  # the last forward's parts 1.. ran in worker processes (else threads)
        # Deferred weight gradients computed at once and added later in the same order (the same
        # bits): where the parts run in processes, which share no GIL (the deferral's reason, see
        # "Threads"), so that a gradient buffer goes back to the pool as soon as it has been read
        self.weight_grads_now = False
        self.lock = threading.RLock()  # one forward or backward of this plan at a time

    def prepare(self, layers, x):
        """Compile if the layers or input shape changed; False if the plan cannot run them."""
        signature = _signature(layers, x)
        if signature != self.signature:
            self.signature, self.layers, self._params = signature, list(layers), None
            self.compiles += 1
            try:
                self.ops, self.out_shape = _compile(layers, x.shape[1:])
            except Unsupported:
                self.ops = None
            self.meets = self.ops is not None and any(op.meets for op in self.ops)
            self.layout_key = None
            self.parts, self.scratch = [], []
        if self.ops is None:
            return False
        if self.meets and any(isinstance(op, BatchNormTrainOp) and x.shape[0] * op.shape[1] * op.shape[2] < 2
                              for op in _in_forward_order(self.ops)):
            return False  # one value per channel: the eager path says why it cannot normalize
        return (all(isinstance(p.data, np.ndarray) and p.data.dtype == np.float32 for p in self.params())
                and all(isinstance(array, np.ndarray) and array.dtype == np.float32 for array in self.buffers()))

    def layout(self, batch):
        """Split the batch over the caller and the workers (while each gets MIN_CHUNK images),
        and each thread's share into chunks of at most MAX_CHUNK images run one after another."""
        threads = max(1, min(get_cpu_workers() + 1, batch // MIN_CHUNK))
        if (batch, threads, MAX_CHUNK) == self.layout_key:
            return
        old = {chunk.n: chunk.store for part in self.parts for chunk in part}
        bounds = _split(batch, threads)
        self.parts = []
        for start, stop in zip(bounds, bounds[1:]):
            # A plan that meets (a BatchNorm that trains) runs a part as one chunk: a chunk waits at
            # each meeting with its activations in the thread's shared buffers (scratch), which a
            # second chunk of the thread would overwrite
            count = 1 if self.meets else -(-(stop - start) // MAX_CHUNK)
            edges = [start + (stop - start) * i // count for i in range(count + 1)]
            part = [Chunk(a, b) for a, b in zip(edges, edges[1:])]
            for chunk in part:  # a chunk of a size seen before takes over its buffers
                chunk.store = old.pop(chunk.n, chunk.store)
            self.parts.append(part)
        while len(self.scratch) < threads:
            self.scratch.append({})
        del self.scratch[threads:]
        # In rounds (a plan that meets) no part defers its weight gradients to the end: the
        # other part would wait for them at every meeting, then alone at the end
        self.deferring = [thread % 2 == 1 and not self.meets for thread in range(threads)]
        self.batch, self.threads, self.layout_key = batch, threads, (batch, threads, MAX_CHUNK)
        blas.warm_up()

    def forward(self, x, buffers=None, reports=None):
        """The forward of x; `buffers` (as buffers() gave them at an earlier forward) are read
        instead of the layers' own: a recomputed forward normalizes as the first one did. With a
        list `reports`, the floating-point errors its regions meet go there as (kinds, where), for
        fpenv.report_errors, instead of being reported (_reporting_parts_errors)."""
        if buffers is None:
            return self._forward(x, reports)
        at = 0
        try:
            for op in self.ops:
                count = len(op.buffers())
                if count:
                    op.override = tuple(buffers[at:at + count])
                    at += count
            return self._forward(x, reports)
        finally:
            for op in self.ops:
                op.override = None

    def _forward(self, x, reports=None):
        batch = x.shape[0]
        self.layout(batch)
        self.input_shape = x.shape[1:]
        out = np.empty((batch,) + tuple(self.out_shape), np.float32)
        self.forwards += 1
        self.training = any(layer.training for layer in self.layers)
        self._in_parts("forward", x, out, reports=reports)
        return out

    def update_running_stats(self, batch):
        """After a forward whose output the caller keeps (not a recomputed one, nor one whose
        output was not finite and runs again eagerly, which updates them itself): each BatchNorm
        that trains with running statistics blends the last forward's batch statistics into them,
        in forward order, as BatchNorm2d.forward does."""
        if not self.meets:
            return
        from ..functional import update_running_stats
        for op in _in_forward_order(self.ops):
            layer = getattr(op, "layer", None)
            if not (isinstance(op, BatchNormTrainOp) and layer.training and layer.track_running_stats):
                continue
            layer.num_batches_tracked += 1
            momentum = layer.momentum
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / layer.num_batches_tracked
            update_running_stats(layer.running_mean, layer.running_var, op.batch_mean, op.batch_var, momentum,
                                 (batch,) + tuple(op.shape))

    def run_forward(self, thread, x, out):
        """Part `thread`'s chunks of a forward (a plan that never meets)."""
        finish(self.forward_steps(thread, x, out))

    def forward_steps(self, thread, x, out):
        """Part `thread`'s chunks of a forward, as a generator that yields at each meeting."""
        scratch = self.scratch[thread]
        for chunk in self.parts[thread]:
            chunk.saved = {}
            h = x[chunk.start:chunk.stop]
            h = h.transpose(1, 2, 3, 0) if h.ndim == 4 else h.T
            h = yield from forward_chain_steps(self.ops, chunk, h, scratch)
            target = out[chunk.start:chunk.stop]
            np.copyto(target.transpose(*range(1, target.ndim), 0), h)

    def backward(self, dy, need_dx):
        """-> (dx or None, [gradient or None for each of params()]) for the last forward."""
        expected = (self.batch,) + tuple(self.out_shape)
        if not isinstance(dy, np.ndarray) or dy.dtype != np.float32:
            raise DTypeError(f"dy: expected a float32 NumPy array like the model's output, got "
                             f"{getattr(dy, 'dtype', type(dy).__name__)}")
        if dy.shape != expected:
            raise ShapeError(f"dy: expected shape {expected} (the shape of the model's output), "
                             f"got {tuple(dy.shape)}")
        dy = np.ascontiguousarray(dy)
        dx = np.empty((self.batch,) + tuple(self.input_shape), np.float32) if need_dx else None
        results = self._in_parts("backward", dy, dx, need_dx)
        total = results[0].arrays
        for other in results[1:]:
            for key, (param, value) in other.arrays.items():
                total[key][1] += value
        return dx, [total[id(p)][1] if id(p) in total else None for p in self.params()]

    def run_backward(self, thread, dy, dx, need_dx):
        """Part `thread`'s chunks of a backward -> its _Grads (a plan that never meets)."""
        return finish(self.backward_steps(thread, dy, dx, need_dx))

    def backward_steps(self, thread, dy, dx, need_dx):
        """Part `thread`'s chunks of a backward -> its _Grads, as a generator that yields at each
        meeting."""
        scratch = self.scratch[thread]
        pool = gradients(scratch)
        grads = _Grads(self.deferring[thread], pool, compute_now=self.weight_grads_now)
        for chunk in self.parts[thread]:
            pool.start()
            d = dy[chunk.start:chunk.stop]
            d = yield from backward_chain_steps(self.ops, chunk, d.transpose(*range(1, d.ndim), 0), need_dx, grads,
                                                scratch)
            grads.flush()
            if need_dx:
                target = dx[chunk.start:chunk.stop]
                np.copyto(target.transpose(*range(1, target.ndim), 0), d)
        return grads

    def params(self):
        """Every parameter the ops use, once each, in op order (found once per compile)."""
        if self._params is None:
            found = {}
            for op in self.ops:
                for p in op.params():
                    found.setdefault(id(p), p)
            self._params = list(found.values())
        return self._params

    def buffers(self):
        """The arrays the ops read besides the parameters (BatchNorm's running statistics), in op
        order, looked up at each call: a module's buffer may be replaced (load_state_dict, to())."""
        found = []
        for op in self.ops:
            found += op.override or [getattr(owner, name) for owner, name in op.buffers()]
        return found

    def _in_parts(self, kind, *arrays, reports=None):
        """run_<kind>(thread, *arrays) for every part -> their results in part order; parts 1..
        in worker threads, with a 1-thread BLAS (and a short switch interval) for the region."""
        function = getattr(self, "run_" + kind)
        if _region_lock.held_here():
            raise RuntimeError(f"a compiled model's {kind} inside a parallel region of the same thread (a signal "
                               "handler that runs the model while the thread runs gpuconv ops) cannot run: the "
                               "region's workers are busy; run it outside the handler")
        # One part too runs with a 1-thread BLAS (OpenBLAS's sums differ in the last bits between
        # thread counts at some shapes), under the lock that keeps other regions' settings out.
        where = f"a compiled model's {kind}, run in parts on CPU workers"
        with _reporting_parts_errors(where, reports) as met, _region_lock, blas.num_threads(1), \
                fpenv.noting_errors(fpenv.watched_errors(), met):  # a single part's and the meetings' too
            if self.meets:
                self.in_processes = self.weight_grads_now = False
                with _switch_interval(SWITCH_INTERVAL):
                    return self._in_rounds(kind, *arrays)
            if self.threads == 1:
                return [function(0, *arrays)]
            if kind == "forward":  # a backward runs where its forward ran: its activations are there
                self.in_processes = processes and cpu_workers.supported()
            self.weight_grads_now = self.in_processes
            if self.in_processes:
                return cpu_workers.run_parallel(self, kind, arrays, _parts_errors())
            with _switch_interval(SWITCH_INTERVAL):
                return _run_parallel(lambda thread: function(thread, *arrays), list(range(self.threads)))

    def _in_rounds(self, kind, *arrays):
        """<kind>_steps(thread, *arrays) for every part, in rounds: a round runs every part up to
        its next meeting (a parallel region; the parts reach the same one, as they run the same
        ops), then the meeting op adds the parts' sums in part order and every part goes on with
        the whole batch's figures. -> the parts' results in part order. Threads only: a meeting
        needs the parts' sums in this process. A part that fails ends the call: the others are
        closed where they wait, before the error is raised."""
        steps = [getattr(self, kind + "_steps")(thread, *arrays) for thread in range(self.threads)]
        replies = [None] * self.threads
        try:
            while True:
                if self.threads == 1:
                    outcomes = [_advance(steps[0], replies[0])]
                else:
                    outcomes = _run_parallel(lambda thread: _advance(steps[thread], replies[thread]),
                                             list(range(self.threads)))
                if all(done for done, _ in outcomes):
                    return [value for _, value in outcomes]
                requests = [value for _, value in outcomes]
                op, what = requests[0][0], requests[0][1]
                if any(done or value[0] is not op or value[1] != what for done, value in outcomes):
                    raise RuntimeError(f"the parts of a plan's {kind} met at different places: {requests}")
                reply = op.meet(what, [value[2] for value in requests], [value[3] for value in requests])
                replies = [reply] * self.threads
        finally:
            for generator in steps:
                generator.close()


def _advance(steps, reply):
    """Run a part's generator to its next meeting -> (False, its request) or (True, its result)."""
    try:
        return False, steps.send(reply)
    except StopIteration as done:
        return True, done.value


def _in_forward_order(ops):
    """The ops of a chain, those inside branching ops included, in the order the forward runs them."""
    for op in ops:
        if isinstance(op, BranchingOp):
            yield from _in_forward_order(op.ops())
        else:
            yield op
