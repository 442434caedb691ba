"""Data-parallel training: one process per rank, launched by `mpiexec`, on engines that exist.

    import gpuconv.distributed as dist
    group = dist.init()                          # MPI (mpi4py) on CPUs, NCCL (cupyx.distributed) on GPUs
    model = LeNet5().to(group.device)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    net = dist.DistributedDataParallel(gpuconv.compile(model), optimizer)  # rank 0's weights everywhere
    loader = DataLoader(data, batch_size=64, shuffle=True, rank=group.rank, world_size=group.world_size)
    for x, y in loader:                          # each rank its own shard of every global batch
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(); loss.backward()
        optimizer.step()                         # gradients averaged across ranks first

What is communicated. At start, rank 0's parameters and buffers are broadcast. For every optimizer
step the gradients are summed by all-reduce in buckets (flat arrays of about `bucket_bytes`, last
layers first) and divided by the number of samples all ranks saw, so the update is the one a single
process takes on the union of the ranks' batches: N ranks at batch B equal one process at batch N*B
to float32 round-off (tests/test_distributed.py checks it with SGD + momentum and with Adam, with
buckets started during backward, and with gradients accumulated over two backward passes).

Overlap. A forward through the wrapper notes how many gradients each parameter will receive; a
hook on the tape's leaf accumulation (Tensor.register_post_accumulate_grad_hook) counts them as
backward delivers them, and a bucket whose parameters are complete starts its all-reduce at once
(on GPUs on a stream of its own, beside the backward's remaining kernels), buckets in the same
order on every rank; the optimizer's step waits for them. Where gradients arrive all at once (the
CPU executor's plan is one tape node) every bucket starts at the end of backward, and MPI without
a progress thread moves a non-blocking collective only inside MPI calls, so on CPUs the overlap is
nominal. Gradient accumulation over several backward passes is correct as it is: a gradient that
reaches a bucket already started makes the step reduce every bucket again from .grad; run all but
the last micro-batch under `no_sync()` to send each bucket once.

BatchNorm. Batch statistics are per rank (each normalises by its own B samples, as PyTorch's DDP
without SyncBatchNorm); running statistics drift apart per rank during an epoch and are replaced by
rank 0's (`sync_buffers()`) before evaluation and before a checkpoint, so every rank evaluates and
saves rank 0's, as PyTorch's DDP (broadcast_buffers) does at each forward.

Failure. Every wait polls its request with a sleep of at most 1 ms (no core spun) and a timeout
(`timeout`, GPUCONV_DIST_TIMEOUT, default 120 s). A rank that raises tells the others on a side
channel, which stop with "rank R failed: ..." at their next wait; a rank that dies is reported by
mpiexec ("process rank R ... exited on signal"), which ends the job; a rank that hangs is found at
the timeout: the waiting rank pings the others and names those that did not answer. Each then
calls MPI_Abort, so no process is left waiting.

Backends share all code but the communicator: `_MPITransport` (mpi4py Iallreduce/Ibcast on host
arrays; CuPy arrays are staged through the host), `_NCCLTransport` over cupyx.distributed's
NCCLBackend (rendezvous through MPI, use_mpi=True), or over `NCCLStandIn`, which checks every
call's devices, dtypes and sizes as NCCL needs them and reduces through MPI: what runs where no GPU
is (GPUCONV_EMULATE=1, or backend="nccl-standin").
"""
import contextlib
import os
import sys
import time
import traceback
import zlib

import numpy as np

from .backend import (_emulated_devices, cuda_status, device_of, device_scope, emulation_enabled,
                      get_array_module, is_cupy_array, parse_device)
from .errors import CheckpointError, DeviceMismatchError, DTypeError, GpuconvError, MissingExtraError

DEFAULT_TIMEOUT = 120.0   # seconds a collective may wait for the other ranks
BUCKET_BYTES = 1 << 20    # gradients per all-reduce (PyTorch's DDP uses 25 MiB; our models are small)
MAX_PAUSE = 0.001         # the longest sleep between two polls of a pending request
_FAIL, _PING, _PONG, _ACK = 11, 12, 13, 14  # tags on the side channel


class DistributedError(GpuconvError, RuntimeError):
    """A collective could not complete: another rank failed, died or hung (the message names it),
    or the ranks disagree (different models)."""


class PeerFailedError(DistributedError):
    """Another rank reported that it failed; `.rank` is that rank."""

    def __init__(self, rank, message):
        super().__init__(message)
        self.rank = rank


_group = None


def is_initialized():
    return _group is not None


def group():
    """The process group init() made; DistributedError before init()."""
    if _group is None:
        raise DistributedError("gpuconv.distributed.init() has not been called in this process")
    return _group


def get_rank():
    return _group.rank if _group is not None else 0


def get_world_size():
    return _group.world_size if _group is not None else 1


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MissingExtraError("distributed training needs mpi4py and an MPI (Open MPI or MPICH): "
                                f"pip install 'gpuconv[mpi]' ({exc})") from None
    return MPI


def init(backend="auto", device="auto", timeout=None):
    """Join the job this process was launched in (`mpiexec -n N python ...`); returns the
    ProcessGroup (also `group()`). backend: 'auto' (NCCL when `device` resolves to a GPU and CuPy
    has NCCL, else MPI), 'mpi', 'nccl', or 'nccl-standin' (NCCL's code path through a checking
    stand-in over MPI; 'nccl' becomes it under GPUCONV_EMULATE=1 on a machine without a GPU).
    device: 'auto', 'cpu' or 'cuda' (each rank takes GPU local_rank % count). A second call
    returns the group of the first."""
    global _group
    if _group is not None:
        return _group
    if backend not in ("auto", "mpi", "nccl", "nccl-standin"):
        raise DistributedError(f"backend: expected 'auto', 'mpi', 'nccl' or 'nccl-standin', got {backend!r}")
    if timeout is None:
        timeout = float(os.environ.get("GPUCONV_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    MPI = _mpi()
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    rank, size = world.Get_rank(), world.Get_size()
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()

    name, emulated = str(device).strip().lower(), _emulated_devices()
    gpus = 0
    if name.startswith("cuda") or (name == "auto" and (emulated is not None or cuda_status()[1] == "")):
        parse_device("cuda")  # CudaUnavailableError, with the reason, when there is no GPU
        if emulated is not None:  # gpuconv.cuda.emulation(devices=N): pretend GPUs
            gpus = emulated.count()
            emulated.EmulatedDevice(local_rank % gpus).use()
        else:
            cupy = cuda_status()[0]
            gpus = cupy.cuda.runtime.getDeviceCount()
            cupy.cuda.Device(local_rank % gpus).use()
        dev = parse_device(f"cuda:{local_rank % gpus}")
    else:
        dev = parse_device(name if name != "auto" else "cpu")
    backend = resolve_backend(backend, dev)
    if backend in ("nccl", "nccl-standin") and dev.kind == "cuda" and local_size > gpus:
        raise DistributedError(f"backend 'nccl': {local_size} ranks on this machine but {gpus} GPU(s); NCCL "
                               "takes one GPU per rank (start fewer ranks, or use backend='mpi')")
    _group = ProcessGroup(world, rank, size, local_rank, local_size, dev, backend, float(timeout))
    _install_excepthook()
    return _group


def resolve_backend(backend, device):
    """The backend init() uses on `device` when asked for `backend` (see init)."""
    device = parse_device(device)
    if backend in ("auto", "nccl") and device.kind == "cuda" and _emulated_devices() is not None:
        return "nccl-standin"  # emulated GPUs: NCCL's code path, its arguments checked
    if backend == "nccl" and device.kind == "cpu":
        if emulation_enabled():
            return "nccl-standin"
        raise DistributedError("backend 'nccl' needs GPUs (device='cuda'); on CPUs use backend='mpi', or "
                               "GPUCONV_EMULATE=1 for NCCL's code path through the checking stand-in")
    if backend == "auto":
        return "nccl" if device.kind == "cuda" and _nccl_available() else "mpi"
    if backend == "nccl" and not _nccl_available():
        raise DistributedError("backend 'nccl': CuPy's NCCL is not available (cupy.cuda.nccl.available is "
                               "False); install NCCL (pip install nvidia-nccl-cu13, or -cu12) or use backend='mpi'")
    return backend


def _nccl_available():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(nccl.available)


class ProcessGroup:
    """The ranks of one job: rank, world_size, local_rank (on this machine), device, backend, and
    the few collectives training needs, each bounded by `timeout` seconds."""

    def __init__(self, world, rank, world_size, local_rank, local_size, device, backend, timeout):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_size = local_rank, local_size
        self.device, self.backend, self.timeout = device, backend, timeout
        self._world = world
        self._data = world.Dup()      # the collectives
        self._side = world.Dup()      # failure notices and pings, never mixed with the data
        self._pending_sends = []
        self._count = 0               # collectives started, for the messages
        self.activity = "starting"
        self._mpi = _MPITransport(self)
        if backend == "mpi":
            self.transport = self._mpi
        elif backend == "nccl-standin":
            self.transport = _NCCLTransport(self, NCCLStandIn(self))
        else:
            from cupyx.distributed import NCCLBackend
            self.transport = _NCCLTransport(self, NCCLBackend(world_size, rank, use_mpi=True))

    def __repr__(self):
        return (f"ProcessGroup(rank={self.rank}, world_size={self.world_size}, device='{self.device}', "
                f"backend='{self.backend}')")

    # ----- collectives (in place, bounded) -----
    def all_reduce_start(self, array, what="all-reduce"):
        """Start summing `array` (contiguous, on this rank's device) across ranks in place; returns
        a wait() callable."""
        self._count += 1
        label = f"{what} #{self._count}"
        done = self.transport.start_all_reduce(array, label)
        return lambda: self.wait(done, label)

    def all_reduce(self, array, what="all-reduce"):
        self.all_reduce_start(array, what)()
        return array

    def broadcast(self, array, root=0, what="broadcast"):
        self._count += 1
        label = f"{what} #{self._count}"
        self.wait(self.transport.start_broadcast(array, root, label), label)
        return array

    def sum_host(self, values, what="sum"):
        """Sum a few numbers across ranks (float64, through MPI whatever the backend)."""
        array = np.array(values, dtype=np.float64)  # a copy: the caller's values stay
        self._count += 1
        label = f"{what} #{self._count}"
        self.wait(self._mpi.start_all_reduce(array, label), label)
        return array

    def barrier(self):
        self.sum_host([0.0], "barrier")

    def check_same(self, text, what):
        """DistributedError on every rank unless all ranks pass the same `text` (compared by a
        16-bit hash, through sums that stay exact in float64 up to ~1400 ranks)."""
        h = float(zlib.crc32(str(text).encode()) % (1 << 16))
        total, squares = self.sum_host([h, h * h], f"check of {what}")
        if total * total != self.world_size * squares:  # equal only when every rank's h is equal
            raise DistributedError(f"rank {self.rank}: the ranks disagree on {what}; every rank must be "
                                   "started with the same settings and data")

    # ----- waiting, failure notices, pings -----
    def wait(self, done, label):
        """Poll `done()` until it is true: between polls the side channel is served (a failure
        notice raises PeerFailedError, a ping is answered) and the caller sleeps at most
        MAX_PAUSE; after `timeout` seconds the silent ranks are named (DistributedError)."""
        self.activity = f"waiting in {label}"
        deadline = time.monotonic() + self.timeout
        pause = 2e-5
        try:
            while not done():
                self._serve()
                if time.monotonic() > deadline:
                    self._diagnose(label)
                time.sleep(pause)
                pause = min(2 * pause, MAX_PAUSE)
        finally:
            self.activity = f"computing after {label}"

    def _send(self, dest, tag, text):
        self._pending_sends.append(self._side.isend(text, dest=dest, tag=tag))
        self._pending_sends = [r for r in self._pending_sends if not r.Test()]

    def _serve(self, pongs=None, acks=None):
        """Handle what arrived on the side channel. While this rank is stopping (`acks` given), a
        failure notice from another rank counts as its acknowledgement: it is stopping too."""
        MPI = _mpi()
        status = MPI.Status()
        while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            text = self._side.recv(source=source, tag=tag)
            if tag == _FAIL and acks is None:
                raise PeerFailedError(source, f"rank {source} failed: {text}")
            if tag in (_FAIL, _ACK) and acks is not None:
                acks.add(source)
            elif tag == _PING:
                self._send(source, _PONG, self.activity)
            elif tag == _PONG and pongs is not None:
                pongs[source] = text

    def _diagnose(self, label):
        probe = min(5.0, max(0.5, self.timeout / 4))
        others = [r for r in range(self.world_size) if r != self.rank]
        for r in others:
            self._send(r, _PING, self.activity)
        pongs, end = {}, time.monotonic() + probe
        while len(pongs) < len(others) and time.monotonic() < end:
            self._serve(pongs=pongs)
            time.sleep(MAX_PAUSE)
        silent = [r for r in others if r not in pongs]
        parts = [f"rank {self.rank}: {label} did not complete within {self.timeout:g} s"]
        if silent:
            parts.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer "
                         f"a ping within {probe:g} s (hung in its own work, stopped, or dead)")
        parts += [f"rank {r} is {state}" for r, state in sorted(pongs.items())]
        error = DistributedError("; ".join(parts))
        error.silent = silent
        raise error

    def fail(self, exc):
        """Called on this rank's unhandled exception: tell the others (or acknowledge the rank
        whose notice made this one stop), wait a bounded time for their acknowledgements so their
        messages are out, then MPI_Abort the job. Never returns when world_size > 1."""
        if self.world_size == 1:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        others = [r for r in range(self.world_size) if r != self.rank]
        if isinstance(exc, PeerFailedError):
            self._send(exc.rank, _ACK, "")
            others = []
        else:
            text = f"{type(exc).__name__}: {exc}"
            others = [r for r in others if r not in getattr(exc, "silent", ())]  # no ack will come
            for r in others:
                self._send(r, _FAIL, text)
        acks, end = set(), time.monotonic() + min(10.0, self.timeout)
        while time.monotonic() < end and (len(acks) < len(others) or self._pending_sends):
            self._serve(acks=acks)
            self._pending_sends = [r for r in self._pending_sends if not r.Test()]
            time.sleep(MAX_PAUSE)
        sys.stdout.flush()
        sys.stderr.flush()
        self._world.Abort(1)


@contextlib.contextmanager
def guard():
    """Run a block whose exception must stop every rank: the error is printed (one line for a
    gpuconv error, a traceback otherwise), the other ranks are told, and the job is aborted. Ctrl-C
    (KeyboardInterrupt) passes through: Ctrl-C on mpiexec ends every rank anyway (Open MPI)."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if _group is None or _group.world_size == 1 or (isinstance(exc, SystemExit) and not exc.code):
            raise
        _report(exc)
        _group.fail(exc)
        raise


def _report(exc):
    if isinstance(exc, GpuconvError):
        print(f"gpuconv: rank {_group.rank}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    else:
        print(f"gpuconv: rank {_group.rank}: unhandled exception:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()


def _install_excepthook():
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if _group is None or _group.world_size == 1 or issubclass(kind, KeyboardInterrupt):
            return previous(kind, exc, tb)
        _report(exc)
        _group.fail(exc)

    sys.excepthook = hook


# ----------------------------------------------------------------------------------------------
# transports: the only part that differs between MPI and NCCL


class _MPITransport:
    """mpi4py's non-blocking collectives on host arrays; a CuPy array is staged through a host
    copy (an MPI built CUDA-aware could take it directly, the pip wheels are not)."""

    def __init__(self, group):
        self.group = group

    def start_all_reduce(self, array, label):
        MPI = _mpi()
        host = array.get() if is_cupy_array(array) else array
        request = self.group._data.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        return self._finisher(request, array, host)

    def start_broadcast(self, array, root, label):
        host = array.get() if is_cupy_array(array) else array
        request = self.group._data.Ibcast(host, root=root)
        return self._finisher(request, array, host)

    @staticmethod
    def _finisher(request, array, host):
        def done():
            if not request.Test():
                return False
            if host is not array:
                array.set(host)
            return True
        return done


class _NCCLTransport:
    """cupyx.distributed's NCCLBackend (or NCCLStandIn). An all-reduce runs on a stream of its own
    that first waits for what the current stream did so far (the bucket's packing), so the
    backward's kernels that follow run beside it; completion is an event after it, polled like an
    MPI request. A broadcast stays on the current stream."""

    def __init__(self, group, backend):
        self.group, self.backend = group, backend
        self.stream = None

    def start_all_reduce(self, array, label):
        if not is_cupy_array(array):
            self.backend.all_reduce(array, array, "sum")  # the stand-in: done when it returns
            return lambda: True
        import cupy
        if self.stream is None:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        packed = cupy.cuda.Event(disable_timing=True)
        packed.record()  # on the current stream
        self.stream.wait_event(packed)
        self.backend.all_reduce(array, array, "sum", self.stream)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return lambda: done.done

    def start_broadcast(self, array, root, label):
        self.backend.broadcast(array, root)
        if not is_cupy_array(array):
            return lambda: True
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record()
        return lambda: done.done


NCCL_DTYPES = "bBiIlLqQefdFD"  # cupyx.distributed's table of dtypes NCCL can carry
NCCL_OPS = ("sum", "prod", "max", "min")


class NCCLStandIn:
    """NCCLBackend's all_reduce/broadcast signature, for machines without a GPU: every call is
    checked as NCCL would need it (the array on this rank's device, a dtype NCCL carries,
    contiguous, in and out of one dtype and size, a known op, a root in range) and then done through
    MPI. A check that fails raises at once, naming the argument, instead of a crash on a GPU."""

    def __init__(self, group):
        self.group = group
        self.calls = []  # (name, dtype, size) per call, for tests

    def _check(self, name, array, role):
        if not hasattr(array, "dtype") or not hasattr(array, "flags"):
            raise DTypeError(f"NCCL {name}: {role} must be an array on {self.group.device}, got {type(array).__name__}")
        if device_of(array) != str(self.group.device):
            raise DeviceMismatchError(f"NCCL {name}: {role} is on {device_of(array)}, but this rank's "
                                      f"communicator is on {self.group.device}; NCCL reads device memory only")
        if array.dtype.char not in NCCL_DTYPES:
            raise DTypeError(f"NCCL {name}: {role} has dtype {array.dtype}, which NCCL cannot carry")
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            raise DTypeError(f"NCCL {name}: {role} must be C- or F-contiguous")

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        self._check("all_reduce", in_array, "in_array")
        self._check("all_reduce", out_array, "out_array")
        if in_array.dtype != out_array.dtype or in_array.size != out_array.size:
            raise DTypeError(f"NCCL all_reduce: in_array {in_array.dtype}[{in_array.size}] and out_array "
                             f"{out_array.dtype}[{out_array.size}] must have one dtype and size")
        if op not in NCCL_OPS:
            raise DistributedError(f"NCCL all_reduce: op must be one of {NCCL_OPS}, got {op!r}")
        if op != "sum":
            raise DistributedError(f"NCCLStandIn: only op='sum' is emulated, got {op!r}")
        self.calls.append(("all_reduce", in_array.dtype.name, int(in_array.size)))
        if out_array is not in_array:
            out_array[...] = in_array
        label = f"stand-in all_reduce #{self.group._count}"
        self.group.wait(self.group._mpi.start_all_reduce(out_array, label), label)

    def broadcast(self, in_out_array, root=0, stream=None):
        self._check("broadcast", in_out_array, "in_out_array")
        if not (isinstance(root, int) and 0 <= root < self.group.world_size):
            raise DistributedError(f"NCCL broadcast: root must be a rank in 0..{self.group.world_size - 1}, "
                                   f"got {root!r}")
        self.calls.append(("broadcast", in_out_array.dtype.name, int(in_out_array.size)))
        label = f"stand-in broadcast #{self.group._count}"
        self.group.wait(self.group._mpi.start_broadcast(in_out_array, root, label), label)


# ----------------------------------------------------------------------------------------------
# the model wrapper


class DistributedDataParallel:
    """`model` (a Module or gpuconv.compile(model)) on every rank, kept in step.

    At construction the ranks check that they hold the same parameter names, shapes and dtypes,
    and rank 0's parameters and buffers are broadcast. `sync_gradients()` sums every p.grad across
    ranks in buckets and divides by the samples all ranks' forwards saw since the last sync (the
    batch sizes may differ between ranks); with `optimizer` given, its step() calls it first
    (unless sync_gradients() ran since the last forward). Forwards count only in grad mode.

    Overlap (`overlap=True`): a forward notes how many gradients each parameter will receive (its
    uses in the recorded graph); a hook on the tape's leaf accumulation counts them as backward
    delivers them, and a bucket whose parameters are all complete starts its all-reduce at once,
    buckets always in the same order on every rank. A gradient that reaches a bucket already
    started (gradients accumulated over several backward passes before one step) makes the step
    wait for what was started and reduce every bucket again from .grad, so the result is always
    that of reducing .grad at the step. `early` counts the buckets started during backward."""

    def __init__(self, model, optimizer=None, bucket_bytes=BUCKET_BYTES, process_group=None, overlap=True):
        self.module = model
        self.group = process_group or group()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._check_same_model()
        self.broadcast_state()
        self.buckets = self._make_buckets(bucket_bytes)
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket.params}
        self.overlap = overlap
        self.early = self.restarts = 0
        self._synced = self._paused = False
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params] \
            if overlap else []
        if optimizer is not None:
            self.attach(optimizer)

    def _reset(self):
        self._samples = 0      # images this rank's forwards saw since the last sync
        self._expected = {}    # id(param) -> gradients the forwards' graphs will bring it
        self._arrived = {}     # id(param) -> gradients backward brought so far
        self._waits = [None] * len(self.buckets)  # per bucket: wait() once its all-reduce started
        self._next = 0         # buckets start in order: the next one
        self._stale = False    # a started bucket's parameter received another gradient

    def _check_same_model(self):
        text = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in self.module.named_parameters())
        self.group.check_same(text, "the model (parameter names, shapes and dtypes)")

    def broadcast_state(self, root=0):
        """Every parameter and buffer from rank `root`."""
        for p in self.module.parameters():
            self.group.broadcast(p.data, root, "broadcast of parameters")
        self.sync_buffers(root)

    def sync_buffers(self, root=0):
        """Buffers (BatchNorm's running statistics) from rank `root`: before evaluating or saving."""
        for _, module, name in list(self.module.named_buffers()):
            array = module._buffers[name]
            xp = get_array_module(array)
            # a NumPy scalar (a buffer a user set to a plain number, or one from an older gpuconv whose
            # BatchNorm counted with `+ 1`) is read-only: MPI cannot receive into it; xp.array keeps a
            # 0-d shape, where ascontiguousarray would make it 1-d
            if not (isinstance(array, xp.ndarray) and array.flags.c_contiguous):
                with device_scope(array):
                    array = module._buffers[name] = xp.array(array, order="C")
            self.group.broadcast(array, root, "broadcast of buffers")

    def _make_buckets(self, bucket_bytes):
        """Parameters in reverse order (the order backward finishes them), cut into runs of one
        dtype and device of about bucket_bytes; the first bucket carries one more element, the
        sample count."""
        buckets, current, size = [], [], 0
        for p in reversed(self.params):
            if current and (p.dtype != current[0].dtype or device_of(p.data) != device_of(current[0].data)
                            or size + p.data.nbytes > bucket_bytes):
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.data.nbytes
        if current:
            buckets.append(current)
        return [_Bucket(b, extra=1 if i == 0 else 0) for i, b in enumerate(buckets)]

    # ----- forward and backward -----
    def __call__(self, x):
        from .autograd import Tensor, is_grad_enabled
        out = self.module(x)
        if is_grad_enabled():
            self._samples += len(x)
            self._synced = False
            if self.overlap and isinstance(out, Tensor) and out.creator is not None:
                self._count_uses(out.creator)
        return out

    forward = __call__

    def _count_uses(self, root):
        """Add each parameter's uses in the graph below `root` to the gradients it awaits."""
        seen, stack = set(), [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for leaf, creator in node.inputs:
                if leaf is not None and id(leaf) in self._bucket_of:
                    self._expected[id(leaf)] = self._expected.get(id(leaf), 0) + 1
                elif creator is not None:
                    stack.append(creator)

    def _on_gradient(self, p):
        """The tape added a gradient into p.grad."""
        if not self._expected:
            return  # no forward through this wrapper: everything is reduced at the step
        if self._waits[self._bucket_of[id(p)]] is not None:
            self._stale = True  # its bucket left with an older p.grad
            return
        self._arrived[id(p)] = self._arrived.get(id(p), 0) + 1
        if self._paused:
            return
        while self._next < len(self.buckets) and self._complete(self._next):
            self._start(self._next)
            self.early += 1

    def _complete(self, index):
        return all(self._arrived.get(id(p), 0) >= self._expected.get(id(p), 0) for p in self.buckets[index].params)

    def _start(self, index):
        bucket = self.buckets[index]
        bucket.pack(self._samples or 1)
        self._waits[index] = self.group.all_reduce_start(bucket.buffer, "all-reduce of gradients")
        self._next = index + 1

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside start no bucket (PyTorch's name): for all but the last of the
        micro-batches a step accumulates, so that only the last one's backward communicates."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # ----- the step -----
    def sync_gradients(self, samples=None):
        """Average the gradients across ranks, each rank's weighted by its samples (`samples`, or
        the count its forwards saw since the last sync; 1 when it saw none). Buckets started
        during backward are waited for; the rest start now."""
        if samples is not None and samples != self._samples:
            self._stale = self._stale or self._next > 0  # started with another weight
            self._samples = samples
        if self._stale:
            for wait in self._waits:
                if wait is not None:
                    wait()  # every rank started them: finish them, then reduce .grad afresh
            self._waits, self._next = [None] * len(self.buckets), 0
            self.restarts += 1
        while self._next < len(self.buckets):
            self._start(self._next)
        for wait in self._waits:
            wait()
        total = self.buckets[0].buffer[-1]
        for bucket in self.buckets:
            bucket.unpack(total)
        self._reset()
        self._synced = True

    def attach(self, optimizer):
        """Make `optimizer.step()` average the gradients first (unless they were since the last
        forward)."""
        step = optimizer.step

        def synced_step(*args, **kwargs):
            if not self._synced:
                self.sync_gradients()
            return step(*args, **kwargs)

        optimizer.step = synced_step
        return optimizer

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __getattr__(self, name):  # parameters(), state_dict(), ...: the model's
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)


class _Bucket:
    def __init__(self, params, extra):
        self.params = params
        first = params[0].data
        total = sum(p.size for p in params)
        with device_scope(first):  # on the parameters' GPU (or emulated GPU), or the host
            self.buffer = get_array_module(first).zeros(total + extra, dtype=first.dtype)
        self.extra = extra

    def pack(self, samples):
        buffer, offset = self.buffer, 0
        scale = buffer.dtype.type(samples)
        with device_scope(buffer):
            for p in self.params:
                part = buffer[offset:offset + p.size]
                if p.grad is None:
                    part[...] = 0
                else:
                    get_array_module(part).multiply(p.grad.reshape(-1), scale, out=part)
                offset += p.size
            if self.extra:
                buffer[-1] = samples

    def unpack(self, total):
        buffer, offset = self.buffer, 0
        with device_scope(buffer):
            for p in self.params:
                grad = buffer[offset:offset + p.size].reshape(p.shape) / total
                p.grad = grad.astype(p.dtype, copy=False)
                offset += p.size


# ----------------------------------------------------------------------------------------------
# what `python -m gpuconv train --distributed` needs beyond the wrapper


def cpu_share(group):
    """(executor workers, BLAS threads) for one rank: the CPUs this process may run on, split
    between the ranks on this machine; one core's worth is 0 workers beside the caller."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    cores = max(1, min(mine, (os.cpu_count() or 1) // max(1, group.local_size)))
    return cores - 1, cores


def fit_cpu(group):
    """Give this rank its share of the CPUs (cpu_share) unless GPUCONV_CPU_WORKERS says otherwise."""
    from . import blas
    from .nn.cpu_plan import set_cpu_workers
    workers, threads = cpu_share(group)
    if not os.environ.get("GPUCONV_CPU_WORKERS", "").strip():
        set_cpu_workers(workers)
    blas.set_num_threads(threads)
    return workers


def saved_world_size(meta, path):
    """The number of ranks a checkpoint's run had (meta.world_size; 1 before --distributed existed)."""
    value = meta.get("world_size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"checkpoint {path!r}: meta.world_size: expected an int >= 1, got {value!r}")
    return value


def resume_batch(saved_world_size, batch, batch_size, world_size):
    """The batch to resume an epoch at when the checkpoint was written at another world size:
    the samples done so far must be a whole number of the new global batches."""
    if saved_world_size == world_size or batch == 0:
        return batch
    done = batch * batch_size * saved_world_size
    if done % (batch_size * world_size):
        raise CheckpointError(
            f"--resume: the checkpoint stopped {done} samples into an epoch with {saved_world_size} rank(s); "
            f"{world_size} rank(s) at --batch-size {batch_size} cannot start there (not a whole number of "
            f"{batch_size * world_size}-sample steps). Resume with {saved_world_size} rank(s), or from a "
            "checkpoint written at the end of an epoch")
    return done // (batch_size * world_size)
