"""Running a CPU plan's parts after the first in forked worker processes.

Why: two Python threads in one interpreter slow each other down (the GIL around every short
NumPy call, shared reference counts); two processes do not. A prototype that ran half of a
LeNet-5 step at batch 128 in a forked child was 6-12% faster than the thread plan, same bits.

How: one shared anonymous mapping per plan layout (made before the fork, so parent and workers
see the same pages) holds int64 control counters, an error-text area, every parameter, and per
worker its rows of x, out, dy and dx and its parameter gradients. A worker is forked lazily at
the first parallel region of a layout, so it inherits the compiled plan with its buffers; its
copy of the model's parameters points into the mapping, where the parent copies its current
values before every forward and backward region. Hand-overs are counters: the parent bumps a
command counter, the worker bumps its done counter. A worker spins for SPIN_SECONDS after its
last command (the next one usually comes within a step), then sleeps in poll() on a pipe the
parent writes a byte to when it sees the worker's `sleeping` flag; the poll times out every
WAKE_TIMEOUT, in case a store-load reordering hid the flag from the parent.

A worker is forked again when the plan recompiles or changes its layout, when a layer's
`training` flag changes, after it raised, or when it has died. Workers are killed when their
plan is garbage-collected and at interpreter exit, die with the parent (PR_SET_PDEATHSIG when
forked by the main thread, and a getppid() check while asleep), and never return into the
parent's code. A process forked from the parent does not use the parent's workers: it forks its
own.

BLAS: the regions run with a 1-thread BLAS, set without restarting the OpenBLAS thread pool
that the fork stopped (see gpuconv.blas.one_thread): a restarted pool spins ~0.1 s per fork.

Ordering: the data a side writes before bumping its counter is visible to the other side once
the counter is, on x86-64 (stores are not reordered with stores there). Weaker-ordered CPUs
would need a fence this module does not have, so supported() is Linux on x86-64 only (fork is
also unsafe on macOS once its system frameworks have started threads); elsewhere the plan runs
worker threads.
"""
import ctypes
import mmap
import os
import platform
import select
import signal
import threading
import time
import weakref

import numpy as np

from .. import blas
from ..errors import WorkerError

SPIN_SECONDS = 0.002     # a worker spins this long after its last command, the parent this long before yielding
WAKE_TIMEOUT = 0.01      # a sleeping worker re-checks its command counter (and its parent) this often
ALIVE_INTERVAL = 0.01    # a waiting parent checks that the worker is alive this often
TIMEOUT = 60.0           # no wait for a worker is longer: it raises WorkerError
ERROR_BYTES = 4096       # per worker: "type: message" of the error it raised, UTF-8, truncated

# int64 control words per worker; the parent's and the worker's words on separate cache lines
COMMAND, KIND, NEED_DX = 0, 1, 2                # written by the parent
DONE, FAILED, SLEEPING, ERROR_LENGTH = 8, 9, 10, 11  # written by the worker
CONTROL_WORDS = 16
KINDS = {"forward": 1, "backward": 2}
ALIGN = 64


_SUPPORTED = (hasattr(os, "fork") and os.uname().sysname == "Linux"
              and platform.machine().lower() in ("x86_64", "amd64"))


def supported():
    """Linux on x86-64, where fork is safe here and stores are seen in order (see above)."""
    return _SUPPORTED


class Received:
    """A worker's parameter gradients, shaped like cpu_plan._Grads: arrays[id(p)] = [p, value],
    the values being views of the mapping (read before the next region writes them again)."""

    def __init__(self, arrays):
        self.arrays = arrays


class Workers:
    """The worker processes for parts 1.. of one plan layout and the mapping they share."""

    def __init__(self, plan, key):
        self.key, self.owner = key, os.getpid()
        params = plan.params()
        self.param_shapes = [p.data.shape for p in params]
        count = len(plan.parts) - 1
        self.rows = [(part[0].start, part[-1].stop) for part in plan.parts[1:]]
        in_shape, out_shape = tuple(plan.input_shape), tuple(plan.out_shape)
        layout, size = [], 0

        def take(name, dtype, shape):
            nonlocal size
            layout.append((name, dtype, shape, size))
            size += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN

        take("control", np.int64, (count, CONTROL_WORDS))
        take("errors", np.uint8, (count, ERROR_BYTES))
        take("present", np.int64, (count, len(params)))
        for index, p in enumerate(params):
            take(("param", index), np.float32, p.data.shape)
        for worker, (start, stop) in enumerate(self.rows):
            rows = stop - start
            take(("x", worker), np.float32, (rows,) + in_shape)
            take(("out", worker), np.float32, (rows,) + out_shape)
            take(("dy", worker), np.float32, (rows,) + out_shape)
            take(("dx", worker), np.float32, (rows,) + in_shape)
            for index, p in enumerate(params):
                take(("grad", worker, index), np.float32, p.data.shape)
        self.mapping = mmap.mmap(-1, max(size, ALIGN))
        views = {name: np.ndarray(shape, dtype, buffer=self.mapping, offset=offset)
                 for name, dtype, shape, offset in layout}
        self.control, self.errors, self.present = views["control"], views["errors"], views["present"]
        self.param_views = [views["param", index] for index in range(len(params))]
        self.io = [{name: views[name, worker] for name in ("x", "out", "dy", "dx")} for worker in range(count)]
        self.grad_views = [[views["grad", worker, index] for index in range(len(params))]
                           for worker in range(count)]
        self.sequence = 0
        self.pids, self.wake_fds = [], []
        # Registered before forking: a failed fork still cleans up the workers already started.
        self._finalizer = weakref.finalize(plan, _stop, self.pids, self.wake_fds, self.owner)
        try:
            for worker in range(count):
                self._fork(plan, worker)
        except BaseException:
            self.stop()
            raise

    def _fork(self, plan, worker):
        read_fd, write_fd = os.pipe()
        # The kernel's parent-death signal comes when the forking *thread* ends: only the main
        # thread ends with the process. Workers of other threads find out by getppid() asleep.
        with_parent = threading.current_thread() is threading.main_thread()
        pid = os.fork()
        if pid == 0:  # the worker: never returns from here into the parent's code
            code = 70
            try:
                os.close(write_fd)
                for fd in self.wake_fds:
                    os.close(fd)
                self._serve(plan, worker, read_fd, with_parent)
                code = 0
            finally:
                os._exit(code)
        os.close(read_fd)
        os.set_blocking(write_fd, False)  # a wake-up byte never blocks the parent
        self.pids.append(pid)
        self.wake_fds.append(write_fd)

    # ------------------------------------------------------------------------------------------
    # the worker's side

    def _serve(self, plan, worker, wake_fd, die_with_parent):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        except ValueError:  # not the main thread (CPython makes the forking thread the main one)
            pass
        if die_with_parent:
            _die_with_parent()
        parent = self.owner
        if os.getppid() != parent:
            return
        if blas.get_num_threads() != 1:
            # Only then: OpenBLAS shut its thread pool down for the fork, and setting the count
            # starts it again, with helper threads that spin ~0.1 s for work that never comes.
            blas.set_num_threads(1)
        params = plan.params()
        for p, view in zip(params, self.param_views):
            p.data = view
        control, io, grads = self.control[worker], self.io[worker], self.grad_views[worker]
        present, part, base = self.present[worker], worker + 1, self.rows[worker][0]
        seen = 0
        while True:
            seen = _next_command(control, seen, wake_fd, parent)
            try:
                if control[KIND] == KINDS["forward"]:
                    plan.run_forward(part, io["x"], io["out"], base)
                else:
                    result = plan.run_backward(part, io["dy"], io["dx"], bool(control[NEED_DX]), base)
                    for index, p in enumerate(params):
                        entry = result.arrays.get(id(p))
                        present[index] = entry is not None
                        if entry is not None:
                            np.copyto(grads[index], entry[1])
                control[FAILED] = 0
            except BaseException as error:  # reported to the parent, which raises it
                text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:ERROR_BYTES]
                self.errors[worker, :len(text)] = np.frombuffer(text, np.uint8)
                control[ERROR_LENGTH] = len(text)
                control[FAILED] = 1
            control[DONE] = seen

    # ------------------------------------------------------------------------------------------
    # the parent's side

    def alive(self):
        """Are all workers still running? (Reaps any that are not.)"""
        return all(self._exit_status(worker) is None for worker in range(len(self.pids)))

    def _exit_status(self, worker):
        """None while the worker runs, else how it ended (reaped once, its pid forgotten)."""
        pid = self.pids[worker]
        if pid is None:
            return "ended earlier"
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else (a SIGCHLD handler, os.wait())
            done, status = pid, None
        if done == 0:
            return None
        self.pids[worker] = None
        if status is None:
            return "ended"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def post(self, plan, kind, arrays):
        """Copy the parameters and each worker's input rows into the mapping, then start them."""
        for p, view in zip(plan.params(), self.param_views):
            np.copyto(view, p.data)
        if kind == "forward":
            x = arrays[0]
            for io, (start, stop) in zip(self.io, self.rows):
                np.copyto(io["x"], x[start:stop])
        else:
            dy = arrays[0]
            for io, (start, stop) in zip(self.io, self.rows):
                np.copyto(io["dy"], dy[start:stop])
        self.sequence += 1
        for worker, fd in enumerate(self.wake_fds):
            control = self.control[worker]
            control[KIND] = KINDS[kind]
            control[NEED_DX] = kind == "backward" and bool(arrays[2])
            control[COMMAND] = self.sequence
            if control[SLEEPING]:
                try:
                    os.write(fd, b"\0")
                except BlockingIOError:  # the pipe is full of wake-ups already
                    pass

    def collect(self, plan, kind, arrays):
        """Wait for every worker, copy its outputs out -> its results (part order). Raises
        WorkerError once all have answered if one raised (its workers are then stopped)."""
        results, failures = [], []
        params = plan.params() if kind == "backward" else None
        for worker, (start, stop) in enumerate(self.rows):
            self._wait(worker)
            control, io = self.control[worker], self.io[worker]
            if control[FAILED]:
                text = bytes(self.errors[worker, :control[ERROR_LENGTH]]).decode("utf-8", "replace")
                failures.append(f"part {worker + 1} (rows {start}:{stop}, worker process "
                                f"{self.pids[worker]}) raised {text}")
            elif kind == "forward":
                np.copyto(arrays[1][start:stop], io["out"])
            else:
                if arrays[2]:
                    np.copyto(arrays[1][start:stop], io["dx"])
                present = self.present[worker]
                results.append(Received({id(p): [p, view] for index, (p, view)
                                         in enumerate(zip(params, self.grad_views[worker])) if present[index]}))
        if failures:
            self.stop()
            raise WorkerError("; ".join(failures) + " (the worker is forked again for the next step)")
        return results

    def _wait(self, worker):
        control, target = self.control[worker], self.sequence
        if control[DONE] == target:
            return
        start = checked = time.perf_counter()
        spins = 0
        while control[DONE] != target:
            spins += 1
            if spins % 64:
                continue
            now = time.perf_counter()
            if now - start > SPIN_SECONDS:
                os.sched_yield()  # a long wait: let a worker that shares this CPU run
            if now - checked >= ALIVE_INTERVAL:
                checked = now
                pid, status = self.pids[worker], self._exit_status(worker)
                if status is not None:
                    raise WorkerError(f"part {worker + 1} of the batch: its worker process {pid} {status} "
                                      f"before finishing (the worker is forked again for the next step)")
                if now - start > TIMEOUT:
                    raise WorkerError(f"part {worker + 1} of the batch: its worker process {pid} did not "
                                      f"answer within {TIMEOUT:g} s; it was stopped")

    def stop(self):
        """Kill and reap the workers (once)."""
        self._finalizer()

    def disown(self):
        """In a process forked from the owner: forget these workers without touching them."""
        self._finalizer.detach()


def _next_command(control, seen, wake_fd, parent):
    """Spin until the command counter moves past `seen`, sleeping on the pipe after SPIN_SECONDS."""
    until = time.perf_counter() + SPIN_SECONDS
    spins = 0
    while control[COMMAND] == seen:
        spins += 1
        if spins % 64:
            continue
        if time.perf_counter() < until:
            continue
        control[SLEEPING] = 1
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        while control[COMMAND] == seen:
            if poller.poll(WAKE_TIMEOUT * 1000):
                os.read(wake_fd, 4096)
            if os.getppid() != parent:
                os._exit(0)
        control[SLEEPING] = 0
    return int(control[COMMAND])


def _die_with_parent():
    """Linux: the kernel sends SIGKILL to this process when its parent (thread) ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(pids, wake_fds, owner):
    if os.getpid() != owner:  # a forked copy of these objects: the workers are not this process's
        return
    for index, pid in enumerate(pids):
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        pids[index] = None
    for fd in wake_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    wake_fds.clear()


def _workers_for(plan):
    """The plan's workers for its current layout and layers' training flags, forked if needed."""
    model = plan.model()
    key = (plan.version, tuple(bool(layer.training) for layer in model) if model is not None else ())
    workers = plan.workers
    if workers is not None and workers.owner != os.getpid():
        workers.disown()
        workers = None
    if workers is not None and (workers.key != key or not workers.alive()):
        workers.stop()
        workers = None
    if workers is None:
        plan.workers = None
        workers = plan.workers = Workers(plan, key)
    return workers


def run_parallel(plan, kind, arrays):
    """plan.run_<kind>(part, *arrays) for every part: part 0 here, the others in the workers;
    -> results in part order. Every part has finished (or its worker was stopped) before this
    returns or raises. The caller holds cpu_plan's region lock and a 1-thread BLAS."""
    workers = _workers_for(plan)
    try:
        workers.post(plan, kind, arrays)
    except BaseException:  # interrupted with some workers started: their state is unknown
        workers.stop()
        raise
    results, error = [], None
    try:
        results.append(getattr(plan, "run_" + kind)(0, *arrays))
    except BaseException as caught:
        error = caught
    try:
        results += workers.collect(plan, kind, arrays)
    except BaseException as caught:  # a worker failed, or the wait was interrupted: stop them all
        workers.stop()
        if not isinstance(caught, WorkerError):
            raise
        error = error or caught
    if error is not None:
        raise error
    return results


def stop(plan):
    """Stop the plan's workers, if it has any (the thread path does not need them)."""
    workers = plan.workers
    if workers is not None:
        plan.workers = None
        if workers.owner == os.getpid():
            workers.stop()
        else:
            workers.disown()
