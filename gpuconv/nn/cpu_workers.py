"""Worker processes for the CPU executor's parts after the first, started safely.

Why processes: two Python threads in one interpreter slow each other down (the GIL around every
short NumPy call); two processes do not. How, without the hazards of forking the user's program:

* A worker is a fresh interpreter started by subprocess (fork + exec in C, safe in a threaded
  process), with close_fds: it holds one socket end and the caller's stderr (for a traceback),
  nothing else of the caller's. It is started at the first parallel region and reused for every
  batch size and model; it exits when its socket closes (the caller's process ended, or the pool
  was closed).
* The layers are described to it as JSON (types and hyper-parameters, no pickle); it builds the
  same layers and compiles the same plan. Parameters, its rows of x / out / dy / dx and its
  gradients live in a memfd arena both processes map; the caller copies the parameters and the
  rows in before each region and reads the results after.
* Commands and replies are a few bytes on a SOCK_SEQPACKET socket pair; a setup's description
  (JSON) comes in a memfd of its own. A side that
  waits polls for SPIN_SECONDS (a wake-up from a blocking recv is slow on a VM and would come
  twice a region), then blocks in recv: an idle worker, or a caller waiting for a slow one, takes no
  CPU, and nothing times out a worker that is still working.
* A worker's exception comes back as WorkerError naming its type and message; a worker that dies
  gives WorkerError naming how; Ctrl-C while waiting kills the worker (it would go on writing
  into the arena). The next region starts a new one. The worker ignores SIGINT: the terminal's
  Ctrl-C is for the caller.

The part a worker runs is the same chunks and ops as in a thread, in the caller's C floating-point
environment (rounding mode, flush-to-zero: gpuconv/fpenv.py) as a thread's part is, and its
gradients are summed in the same order, so processes and threads give the same bits.
"""
import atexit
import json
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
import weakref

import numpy as np

from .. import fpenv
from ..errors import WorkerError
from . import layers as L
from .module import Parameter
from .sequential import Concat, Residual, Sequential

ALIGN = 64


class ArenaDropped(Exception):
    """A backward whose worker dropped the plan's arena (and the activations of its forward with it)
    since that forward: more than MAX_PLANS plans ran after it (a model split into many segments),
    or the interpreter is exiting and closed its workers. Raised before anything is sent; the caller runs the forward again, then the backward
    (compiler.PlanFunction.backward)."""

# Every message is a few bytes ("F 3.1 64 1 7f03... 1101": the caller's fpenv, at most
# 2 * fpenv.ENV_BYTES hex digits, then the error kinds its np.errstate watches; "ok", or "ok over"
# for a part that met such errors) or an error text of at most ERROR_CHARS; a
# setup's description travels in a memfd. recv allocates its whole buffer on every call, the
# polls included, so it is kept small (a worker near its memory limit must still hear commands).
MESSAGE_BYTES = 8192
ERROR_CHARS = 1200  # as UTF-8 JSON a character takes at most 6 bytes: the reply fits MESSAGE_BYTES
SPIN_SECONDS = 0.002  # both sides poll this long before blocking: the next message usually comes sooner


def supported():
    """Linux with memfd_create and fd passing (send_fds), and the interpreter not exiting (after
    _close_at_exit, a region runs its parts in threads)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
            and not _exiting)


# ----------------------------------------------------------------------------------------------
# describing layers (JSON both ways, never pickle)

_KINDS = {cls.__name__: cls for cls in (L.Conv2d, L.Linear, L.MaxPool2d, L.AvgPool2d, L.ReLU, L.Tanh, L.Sigmoid,
                                        L.Flatten, L.Identity, L.Dropout, L.AdaptiveAvgPool2d, L.BatchNorm2d)}


_MORE_KINDS = {}  # name -> (kind, settings, make): layer types a model module registers (describable)


def describable(kind, settings, make):
    """Let worker processes rebuild layers of `kind`, a leaf layer a model module defines and lowers
    (gpuconv/models.py: ShortcutA): settings(layer) -> a dict for JSON, make(that dict) -> the same
    layer. A worker imports the gpuconv package, which imports gpuconv.models: the zoo's kinds are
    known on both sides."""
    _MORE_KINDS[kind.__name__] = (kind, settings, make)


def _param_owners(layer):
    """The layers whose weight and bias a description carries (one parameter index each)."""
    return isinstance(layer, (L.Conv2d, L.Linear)) or (isinstance(layer, L.BatchNorm2d) and layer.weight is not None)


def describe(layer, index_of=None):
    """A JSON-able description of `layer`; index_of (id(Parameter) -> its index in the arena) adds
    which parameters it uses: a parameter shared by layers (or a layer used twice) stays one. A
    residual block (cpu_plan.RESIDUALS) is described by its branches' layers and rebuilt as an
    nn.Residual, which lowers to the same ops; an nn.Concat by its branches' layers and its dim."""
    from .cpu_plan import RESIDUALS, branches_of
    kind = type(layer)
    spec = {"kind": kind.__name__, "training": layer.training}
    if kind in RESIDUALS or kind is Concat:
        spec.update(kind="Concat" if kind is Concat else "Residual",
                    branches=[[describe(part, index_of) for part in branch] for branch in branches_of(layer)])
        if kind is Concat:
            spec["dim"] = layer.dim
        return spec
    if kind is L.Conv2d:
        o, c, kh, kw = layer.weight.data.shape
        spec.update(shape=[o, c * layer.groups, kh, kw], stride=layer.stride, dilation=layer.dilation,
                    groups=layer.groups, bias=layer.bias is not None,
                    padding=layer.padding if layer.padding == "same" else list(layer.padding))
    elif kind is L.Linear:
        spec.update(shape=list(layer.weight.data.shape), bias=layer.bias is not None)
    elif kind in (L.MaxPool2d, L.AvgPool2d):
        spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding)
    elif kind is L.Flatten:
        spec.update(start=layer.start_dim, end=layer.end_dim)
    elif kind is L.Dropout:
        spec.update(p=layer.p)
    elif kind is L.AdaptiveAvgPool2d:
        spec.update(output_size=list(layer.output_size))
    elif kind is L.BatchNorm2d:
        spec.update(features=layer.num_features, eps=layer.eps, affine=layer.weight is not None,
                    track=layer.track_running_stats)
    elif kind.__name__ in _MORE_KINDS:
        spec.update(settings=_MORE_KINDS[kind.__name__][1](layer))
    if index_of is not None and _param_owners(layer):
        spec["params"] = [index_of[id(layer.weight)], None if layer.bias is None else index_of[id(layer.bias)]]
    return spec


def build(spec, params=None):
    """The layer `spec` describes; with `params` (the arena's Parameters), using those its
    description names, else fresh placeholders."""
    if spec["kind"] == "Residual":
        body, shortcut, post = ([build(part, params) for part in branch] for branch in spec["branches"])
        layer = Residual(Sequential(*body), Sequential(*shortcut) if shortcut else None,
                         Sequential(*post) if post else None)
        layer.training = spec["training"]  # its layers keep their own modes (a frozen BatchNorm in a training block)
        return layer
    if spec["kind"] == "Concat":
        layer = Concat(*(Sequential(*(build(part, params) for part in branch)) for branch in spec["branches"]),
                       dim=spec["dim"])
        layer.training = spec["training"]
        return layer
    if spec["kind"] in _MORE_KINDS:
        layer = _MORE_KINDS[spec["kind"]][2](spec["settings"])
        layer.training = spec["training"]
        return layer
    kind = _KINDS[spec["kind"]]
    if kind is L.Conv2d:
        o, c, kh, kw = spec["shape"]
        padding = spec["padding"] if spec["padding"] == "same" else tuple(spec["padding"])
        layer = L.Conv2d(c, o, (kh, kw), tuple(spec["stride"]), padding, tuple(spec["dilation"]), spec["groups"],
                         spec["bias"])
    elif kind is L.Linear:
        o, i = spec["shape"]
        layer = L.Linear(i, o, spec["bias"])
    elif kind in (L.MaxPool2d, L.AvgPool2d):
        layer = kind(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]))
    elif kind is L.Flatten:
        layer = L.Flatten(spec["start"], spec["end"])
    elif kind is L.Dropout:
        layer = L.Dropout(spec["p"])
    elif kind is L.AdaptiveAvgPool2d:
        layer = L.AdaptiveAvgPool2d(tuple(spec["output_size"]))
    elif kind is L.BatchNorm2d:
        layer = L.BatchNorm2d(spec["features"], spec["eps"], affine=spec["affine"], track_running_stats=spec["track"])
    else:
        layer = kind()
    layer.training = spec["training"]
    if params is not None and "params" in spec:
        layer.weight = params[spec["params"][0]]
        layer.bias = None if spec["params"][1] is None else params[spec["params"][1]]
    return layer


# ----------------------------------------------------------------------------------------------
# the shared arena


def arena_layout(param_shapes, rows, in_shape, out_shape, buffer_shapes=()):
    """name -> (dtype, shape, offset) and the total size; the same on both sides. Buffers are
    arrays the ops read besides the parameters (cpu_plan._Plan.buffers), copied in like them."""
    layout, size = {}, 0

    def take(name, dtype, shape):
        nonlocal size
        layout[name] = (dtype, tuple(shape), size)
        size += -(-math.prod(shape) * np.dtype(dtype).itemsize // ALIGN) * ALIGN

    take("present", np.int64, (max(len(param_shapes), 1),))
    for index, shape in enumerate(param_shapes):
        take(f"param{index}", np.float32, shape)
        take(f"grad{index}", np.float32, shape)
    for index, shape in enumerate(buffer_shapes):
        take(f"buffer{index}", np.float32, shape)
    for name, shape in (("x", in_shape), ("out", out_shape), ("dy", out_shape), ("dx", in_shape)):
        take(name, np.float32, (rows,) + tuple(shape))
    return layout, max(size, ALIGN)


def arena_views(buffer, layout):
    return {name: np.ndarray(shape, dtype, buffer=buffer, offset=offset) for name, (dtype, shape, offset) in layout.items()}


# ----------------------------------------------------------------------------------------------
# the caller's side


def _receive(sock, recv):
    """recv(flags): polled without blocking for SPIN_SECONDS, then blocking."""
    deadline = time.perf_counter() + SPIN_SECONDS
    while time.perf_counter() < deadline:
        try:
            return recv(socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
    return recv(0)


class _Process:
    """One worker process and the caller's end of its socket."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = ("import sys; from gpuconv.nn import cpu_workers; cpu_workers.serve(int(sys.argv[1]))")
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", GPUCONV_CPU_WORKERS="0",
                   PYTHONPATH=os.pathsep.join([package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()], close_fds=True, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.socket = ours
        self.arenas = {}  # plan key -> (mapping, views, capacity rows); the mapping holds the memfd

    def receive(self, part):
        """The reply: the floating-point error kinds a part met (a set; empty for a setup or a
        free); WorkerError if the process died. Ctrl-C (or any exception) while waiting
        kills the worker, which would otherwise go on writing into the arena."""
        try:
            data = _receive(self.socket, lambda flags: self.socket.recv(MESSAGE_BYTES, flags))
        except OSError:  # the connection reset under us: the worker is gone
            data = b""
        except BaseException:
            self.close(kill=True)
            raise
        if not data:
            how = _how(self.close(kill=True))
            raise WorkerError(f"part {part} of the batch: CPU worker process {self.process.pid} died ({how}); "
                              "the next step starts a new worker")
        if data == b"ok":
            return set()
        if data.startswith(b"ok "):  # "ok over,invalid": a part that met errors the caller watches
            return fpenv.decode_kinds(data[3:].decode())
        try:
            error = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):  # never expected; the worker's words are lost, not the error
            error = f"an error whose reply could not be read: {data[:200]!r}"
        raise WorkerError(f"part {part} of the batch (CPU worker process {self.process.pid}) raised {error}")

    def close(self, kill=False):
        """Stop the process (closing the socket ends it; kill=True first sends SIGKILL); its
        exit status."""
        if kill and self.process.poll() is None:
            self.process.kill()
        try:
            self.socket.close()
        except OSError:
            pass
        for mapping, _, _ in self.arenas.values():
            mapping.close()
        self.arenas.clear()
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _how(status):
    return f"killed by signal {-status}" if status is not None and status < 0 else f"exit status {status}"


class _Pool:
    def __init__(self):
        self.processes, self.pid = [], os.getpid()
        self.ended = {}  # pid -> how a worker found dead ended
        self.closes_at_exit = False

    def get(self, count):
        if self.pid != os.getpid():  # a forked child: the processes are the parent's
            self.processes, self.pid = [], os.getpid()
        alive = []
        for p in self.processes:
            if p.process.poll() is None and p.socket.fileno() >= 0:
                alive.append(p)
            else:
                self.ended[p.process.pid] = _how(p.close())
        self.processes = alive
        while len(self.processes) < count:
            if not self.closes_at_exit:
                atexit.register(_close_at_exit)
                self.closes_at_exit = True
            self.processes.append(_Process())
        return self.processes[:count]

    def drop(self, process):
        if process in self.processes:
            self.processes.remove(process)

    def close(self):
        for process in self.processes:
            process.close()
        self.processes = []


_pool = _Pool()
_keys = weakref.WeakKeyDictionary()  # plan -> its number in the workers
_next_key = [0]
_forgotten = set()  # numbers of plans garbage-collected whose arenas a worker may still hold (see _prune)
MAX_PLANS = 8     # arenas a worker keeps; the least recently set up is dropped first


def close():
    """Stop every worker process (they are started again when needed)."""
    _pool.close()


EXIT_GRACE_SECONDS = 1.0  # how long exit waits for the workers, all together, before SIGKILL
_exiting = False


def _close_at_exit():
    """At the interpreter's exit: the workers' sockets closed, the workers reaped (an idle one
    exits as soon as its socket closes; one that has not within EXIT_GRACE_SECONDS, stopped or
    stuck, is killed). Without this, the Popen objects and sockets still open at teardown warned
    (ResourceWarning, shown under python -X dev). Left alone:
    - while another thread is in a region (a daemon thread at exit): its workers and arenas are
      in use, and the OS ends them as before;
    - in a forked child, whose pool is the parent's;
    - the arenas' mappings: the OS unmaps them; a thread may still hold views of them.
    Regions after this one (another at-exit handler's, a daemon thread's) run in threads."""
    global _exiting
    if _pool.pid != os.getpid():
        return
    from .cpu_plan import _region_lock
    if not _region_lock.acquire(blocking=False):
        return
    try:
        _exiting = True
        processes, _pool.processes = _pool.processes, []
        for process in processes:
            try:
                process.socket.close()
            except OSError:
                pass
        deadline = time.monotonic() + EXIT_GRACE_SECONDS
        for process in processes:
            try:
                process.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.process.kill()
                process.process.wait()
    finally:
        _region_lock.release()


def _forget(process, key):
    mapping, _, _ = process.arenas.pop(key)
    mapping.close()
    process.socket.send(f"D {key}".encode())
    process.receive(0)


def _tidy(process, keep=None):
    """Free the arenas of plans that are gone, and all but the MAX_PLANS newest; never `keep`, the
    arena of the region being run (a backward's holds its forward's activations)."""
    for key in [k for k in process.arenas if k.split(".")[0] in _forgotten]:
        _forget(process, key)
    while len(process.arenas) > MAX_PLANS:
        _forget(process, next(key for key in process.arenas if key != keep))


def _ensure_setup(process, plan, key, part, rows):
    entry = process.arenas.get(key)
    if entry is not None and entry[2] >= rows:
        return entry[1]
    capacity = max(rows, entry[2] * 2 if entry else rows)
    params, buffers = plan.params(), plan.buffers()
    buffer_shapes = [list(array.shape) for array in buffers]
    layout, size = arena_layout([p.data.shape for p in params], capacity, plan.input_shape, plan.out_shape,
                                buffer_shapes)
    # The caller keeps the arena as its mapping alone (mmap holds a descriptor of its own, closed with
    # it or when it is collected): a descriptor kept beside it would outlive a worker object dropped
    # unclosed (a second Ctrl-C during the first one's cleanup), and the arena's memory with it.
    fd = os.memfd_create("gpuconv-cpu", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    index_of = {id(p): i for i, p in enumerate(params)}
    specs = [describe(layer, index_of) for layer in plan.layers]
    description = json.dumps({"layers": specs, "in_shape": list(plan.input_shape), "capacity": capacity,
                              "part": part, "param_shapes": [list(p.data.shape) for p in params],
                              "buffer_shapes": buffer_shapes,
                              "size": size}).encode()
    try:
        try:
            spec_fd = os.memfd_create("gpuconv-cpu-setup", os.MFD_CLOEXEC)
            try:
                os.write(spec_fd, description)
                socket.send_fds(process.socket, [f"S {key} {len(description)}".encode()], [fd, spec_fd])
            finally:
                os.close(spec_fd)
        finally:
            os.close(fd)  # sent (the worker has its own) or not: the mapping is what the caller keeps
        process.receive(part)
    except BaseException:
        mapping.close()
        raise
    if entry is not None:  # only now: the worker has let go of the old arena
        entry[0].close()
    views = arena_views(mapping, layout)
    process.arenas[key] = (mapping, views, capacity)
    return views


class Received:
    """A worker's parameter gradients shaped like cpu_plan._Grads: arrays[id(p)] = [p, view]."""

    def __init__(self, arrays):
        self.arrays = arrays


def _number(plan):
    if plan not in _keys:
        _next_key[0] += 1
        number = _keys[plan] = str(_next_key[0])
        weakref.finalize(plan, _forgotten.add, number)  # no I/O from the garbage collector
    return _keys[plan]


def _prune():
    """Drop the numbers of plans gone whose arenas no worker holds (any more): none will again, and
    every region would otherwise walk them all."""
    if not _forgotten:  # the common case: no plan gone since, nothing to compute on the hot path
        return
    held = {key.split(".")[0] for process in _pool.processes for key in process.arenas}
    for number in list(_forgotten):  # a copy (one C call): a collection in another thread may add meanwhile
        if number not in held:
            _forgotten.discard(number)


def run_parallel(plan, kind, arrays, met):
    """run_<kind> for part 0 in this thread and parts 1.. in worker processes -> results in part
    order, as cpu_plan._run_parallel gives them; the floating-point error kinds the parts met (those
    the caller's np.errstate does not ignore, the caller's own part's too) are added to the set `met`. The caller
    holds the region lock. Any failure ends the workers of the region (their state is unknown);
    the next region starts new ones."""
    key = f"{_number(plan)}.{plan.compiles}"
    if _exiting:  # a backward after the exit close: its forward's workers are gone; that forward
        raise ArenaDropped(key)  # runs again, in threads (supported() is False now), then the backward
    processes = _pool.get(len(plan.parts) - 1)
    _prune()
    pids = [process.process.pid for process in processes]
    if kind == "backward" and pids != getattr(plan, "worker_pids", pids):
        gone = ", ".join(f"{pid} ({_pool.ended.get(pid, 'ended')})" for pid in plan.worker_pids if pid not in pids)
        raise WorkerError(f"CPU worker process {gone} died between this batch's forward and its backward; "
                          "run the forward again (the next one starts a new worker)")
    if kind == "backward" and any(key not in process.arenas for process in processes):
        raise ArenaDropped(key)
    params = plan.params()
    # the caller's rounding mode and flush-to-zero, for the workers' parts too (fpenv.py; the
    # worker restores its own after each part)
    env = fpenv.encode(fpenv.current())
    watched = fpenv.encode_watched(fpenv.watched_errors())  # and which errors it wants to hear of
    touched, started = [], []
    try:
        for index, process in enumerate(processes, start=1):
            touched.append(process)
            _tidy(process, keep=key)
            start, stop = plan.parts[index][0].start, plan.parts[index][-1].stop
            views = _ensure_setup(process, plan, key, index, stop - start)
            for p, target in zip(params, (views[f"param{i}"] for i in range(len(params)))):
                np.copyto(target, p.data)
            for number, array in enumerate(plan.buffers()):
                np.copyto(views[f"buffer{number}"], array)
            rows = stop - start
            if kind == "forward":
                np.copyto(views["x"][:rows], arrays[0][start:stop])
                process.socket.send(f"F {key} {rows} {int(plan.training)} {env} {watched}".encode())
            else:
                np.copyto(views["dy"][:rows], arrays[0][start:stop])
                process.socket.send(f"B {key} {rows} {int(bool(arrays[2]))} {env} {watched}".encode())
            started.append((index, process, views, start, stop))
        error, results = None, []
        try:
            results.append(getattr(plan, "run_" + kind)(0, *arrays))  # noting already (_Plan._in_parts)
        except BaseException as caught:
            error = caught
        for index, process, views, start, stop in started:
            try:
                met |= process.receive(index)
            except BaseException as caught:
                error = error or caught
                continue
            rows = stop - start
            if kind == "forward":
                np.copyto(arrays[1][start:stop], views["out"][:rows])
            else:
                if arrays[2]:
                    np.copyto(arrays[1][start:stop], views["dx"][:rows])
                present = views["present"]
                results.append(Received({id(p): [p, views[f"grad{i}"]] for i, p in enumerate(params) if present[i]}))
        if error is not None:
            raise error
        if kind == "forward":
            plan.worker_pids = pids
        return results
    except BaseException:
        for process in touched:
            _pool.drop(process)
            process.close(kill=True)
        raise


# ----------------------------------------------------------------------------------------------
# the worker's side


def _next_command(sock):
    """(message, descriptors) of the next command; (b"", []) when the socket closed.

    The wait polls with a one-byte MSG_PEEK recv and only then reads the message: the hot
    commands (F, B) with a plain recv, the others, which may carry descriptors, with recv_fds.
    Polling with recv_fds itself made every hand-over several times slower: with the worker
    polling that way, the caller's send took ~9 us and a command's round trip ~29 us, against
    ~2 and ~7 us with a plain recv (docs/performance.md)."""
    first = _receive(sock, lambda flags: sock.recv(1, flags | socket.MSG_PEEK))
    if not first:
        return b"", []
    if first in (b"F", b"B"):
        return sock.recv(MESSAGE_BYTES), []
    data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 4)
    return data, fds


def serve(fd):
    """The worker's loop: setup / forward / backward commands until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the caller
    from . import cpu_plan
    sock = socket.socket(fileno=fd)
    states = {}
    while True:
        try:
            data, fds = _next_command(sock)
        except OSError:
            return
        if not data:
            return
        try:
            met = set()
            if data[:1] in (b"F", b"B"):  # the hot commands: "F key rows training env watched", "B key rows need_dx env watched"
                op, key, rows, flag, env, watched = data.decode().split()
                with fpenv.noting_errors(fpenv.decode_watched(watched), met):  # reported by the caller
                    fpenv.run_in(fpenv.decode(env), _run, states[key], op, int(rows), flag == "1")
            elif data[:1] == b"D":  # "D key": the caller freed that arena
                state = states.pop(data.decode().split()[1], None)
                if state is not None:
                    state["views"].clear()
                    del state
            else:  # "S key bytes" with the arena's memfd and the description's
                _, key, length = data.decode().split()
                arena_fd, spec_fd = fds
                fds = []  # closed here, whatever happens (the mapping keeps a descriptor of its own)
                try:
                    states.pop(key, None)
                    states[key] = _setup(cpu_plan, json.loads(os.pread(spec_fd, int(length), 0)), arena_fd)
                finally:
                    os.close(arena_fd)
                    os.close(spec_fd)
            sock.send(b"ok " + fpenv.encode_kinds(met).encode() if met else b"ok")
        except BaseException as error:
            for fd in fds:  # whatever the failed command left open
                try:
                    os.close(fd)
                except OSError:
                    pass
            text = f"{type(error).__name__}: {error}"[:ERROR_CHARS]
            sock.send(json.dumps({"ok": False, "error": text}, ensure_ascii=False).encode())


def _setup(cpu_plan, message, fd):
    in_shape, capacity = tuple(message["in_shape"]), message["capacity"]
    param_shapes = [tuple(shape) for shape in message["param_shapes"]]
    # the output shape first, from layers with placeholder parameters, to lay the arena out
    layers = [build(spec) for spec in message["layers"]]
    probe = cpu_plan._Plan()
    probe.prepare(layers, np.empty((1,) + in_shape, np.float32))
    buffer_shapes = [tuple(shape) for shape in message.get("buffer_shapes", [])]
    layout, size = arena_layout(param_shapes, capacity, in_shape, probe.out_shape, buffer_shapes)
    mapping = mmap.mmap(fd, size)
    views = arena_views(mapping, layout)
    # the parameters are views of the arena (the caller fills them), one object per caller's one
    params = [Parameter(views[f"param{index}"]) for index in range(len(param_shapes))]
    layers = [build(spec, params) for spec in message["layers"]]
    plan = cpu_plan._Plan()
    plan.prepare(layers, np.empty((1,) + in_shape, np.float32))
    # the buffers too (BatchNorm's running statistics), in the order the caller's plan lists them
    owners = [(owner, name) for op in plan.ops for owner, name in op.buffers()]
    for index, (owner, name) in enumerate(owners):
        setattr(owner, name, views[f"buffer{index}"])
    plan.input_shape = in_shape
    return dict(plan=plan, layers=layers, views=views, mapping=mapping, part=message["part"], params=params,
                training=None)


def _run(state, op, rows, flag):
    plan, views = state["plan"], state["views"]
    plan.layout(rows)
    plan.deferring = [state["part"] % 2 == 1]  # as the thread running this part would
    plan.weight_grads_now = True  # in the same order, computed at once (cpu_plan._Plan.weight_grads_now)
    if op == "F":
        if state["training"] != flag:
            for layer in state["layers"]:
                layer.train(flag)
            state["training"] = flag
        plan.run_forward(0, views["x"][:rows], views["out"][:rows])
        return
    grads = plan.run_backward(0, views["dy"][:rows], views["dx"][:rows], flag)
    present = views["present"]
    for index, p in enumerate(state["params"]):
        entry = grads.arrays.get(id(p))
        present[index] = entry is not None
        if entry is not None:
            np.copyto(views[f"grad{index}"], entry[1])

