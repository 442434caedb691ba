"""HOSTILE TESTS (session 9's second hostile tester, branch hostile12 at f9c789a) of the changes since
189a932 but nn.Concat (tests/test_compile_concat_hostile.py covers that):

1. cpu_plan._Worker.result: timed waits (FORK_CHECK_SECONDS) and the call re-run in a child forked
   while it was pending;
2. fpenv.encode/decode and cpu_workers sending the caller's floating-point environment with each
   F/B command (rounding modes, flush-to-zero);
3. functional.batch_norm with weight=None and/or bias (BatchNorm2dFunction's five gradients);
4. autograd._add (Add.forward, the sum of a tensor's gradients in _run_backward);
5. cpu_ops.ActivationOp.backward writing a ReLU's gradient into its output gradient (owns_dy);
6. models.InceptionNet.

Tests named test_finding_* FAILED on f9c789a (each docstring says what went wrong and where), fixed
where this file was merged: _Worker.result checks for its worker's end inside the try that catches
a signal handler's exception, and InceptionNet names its feature_layers. Every other test is a GUARD
(a hard case that held on f9c789a). Scenarios that could hang or that change
per-thread state run in a child process (tests/hostile_child.py: a fresh interpreter, one worker,
a hard timeout).
"""
import numpy as np
import pytest

import gpuconv
import hostile_child
from gpuconv import autograd, nn
from gpuconv import functional as F
from gpuconv.errors import ArgumentError
from gpuconv.gradcheck import gradcheck
from gpuconv.models import InceptionNet, build_model
from gpuconv.nn import cpu_plan
from gpuconv.ops import norm_cpu
from test_compile_segments import plans_on_tape

PRELUDE = r'''
import ctypes, faulthandler, json, linecache, os, signal, sys, threading, time, _thread
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import autograd, blas, fpenv, nn
from gpuconv.nn import cpu_plan


def emit(**results):
    print("RESULT " + json.dumps(results), flush=True)


_runs = []


def long_part(start, stop):
    """A region's part: the worker's (start > 0) takes 300 ms; each run is noted as (pid, start)."""
    _runs.append((os.getpid(), start))
    if start > 0:
        time.sleep(0.3)
    return start * 10


def long_part_runs():
    """The list long_part notes its runs in, empty, after one region has started the worker."""
    cpu_plan.run_in_parts(long_part, 2)
    _runs.clear()
    return _runs
'''


def run_child(tmp_path, body, hang_s=30, name="child"):
    return hostile_child.run_child(tmp_path, PRELUDE, body, hang_s, name)


@pytest.fixture
def kind(worker_kind):
    """conftest.worker_kind: worker processes or worker threads, one worker."""
    return worker_kind


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_close(got, want, rtol=1e-4, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = np.abs(want).max() if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what)


# ==============================================================================================
# 1. _Worker.result: timed waits, Ctrl-C, forks


@pytest.mark.parametrize("line", ["if self._finished():", "if self.pid != os.getpid():"])
def test_finding_ctrl_c_during_a_long_worker_part_waits_for_the_worker(tmp_path, line):
    """FOUND: _Worker.result promises to wait for the worker "even when Ctrl-C arrives meanwhile"
    (a worker left running goes on writing into buffers the next step uses). Since f9c789a the
    wait is `done.acquire(timeout=FORK_CHECK_SECONDS)` in a loop, so while a worker part runs longer
    than 50 ms the caller keeps running `self._finished()` and `os.getpid()` OUTSIDE the try that
    catches a signal handler's exception. A KeyboardInterrupt raised there (a pending SIGINT is run
    at those calls' eval-breaker checks) escapes result() at once: _run_parallel raises it and
    run_in_parts releases the region lock (and restores the BLAS threads and switch interval) while
    the worker's part is still running. (Before f9c789a these lines ran only after the worker had
    released `done`, i.e. finished.) Injected with a trace function at each of the two lines."""
    r = run_child(tmp_path, "\n        LINE = " + repr(line) + r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        gpuconv.set_cpu_workers(1)
        state = {"finished": None}

        def part(start, stop):
            if start > 0:                       # the worker's part: longer than FORK_CHECK_SECONDS
                time.sleep(0.4)
                state["finished"] = time.monotonic()
            return start

        cpu_plan.run_in_parts(part, 2)          # the worker thread exists
        state["finished"] = None
        fired, interrupted = interrupted_at("result", LINE, lambda: cpu_plan.run_in_parts(part, 2))
        worker_done_when_raised = state["finished"] is not None
        lock_free = not cpu_plan._region_lock.locked()
        time.sleep(0.6)
        emit(fired=fired, interrupted=interrupted, worker_done_when_raised=worker_done_when_raised,
             lock_free=lock_free)
    ''', name="ctrl_c_timed_wait")
    assert r["fired"] and r["interrupted"], r
    assert r["worker_done_when_raised"], r


def test_guard_interrupt_main_during_a_long_worker_part(tmp_path):
    """GUARD: _thread.interrupt_main() (no real signal: the blocked acquire is not woken, the
    handler runs when a timed acquire returns) 100 ms into a 400 ms worker part: the region raises
    KeyboardInterrupt only after the worker's part finished, and the part ran once."""
    r = run_child(tmp_path, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        gpuconv.set_cpu_workers(1)
        state = {"finished": None, "runs": 0}

        def part(start, stop):
            if start > 0:
                state["runs"] += 1
                time.sleep(0.4)
                state["finished"] = time.monotonic()
            return start

        cpu_plan.run_in_parts(part, 2)
        state.update(finished=None, runs=0)
        timer = threading.Timer(0.1, _thread.interrupt_main)
        timer.start()
        try:
            cpu_plan.run_in_parts(part, 2)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        done = state["finished"] is not None
        time.sleep(0.5)
        again = cpu_plan.run_in_parts(lambda a, b: (a, b), 2)
        emit(interrupted=interrupted, done=done, runs=state["runs"], again=again,
             lock_free=not cpu_plan._region_lock.locked())
    ''', name="interrupt_main")
    assert r["interrupted"] and r["done"] and r["runs"] == 1, r
    assert r["again"] == [[0, 1], [1, 2]] and r["lock_free"], r


def test_guard_long_parts_run_once_without_burning_cpu(tmp_path):
    """GUARD: a worker part of 1 s (sleeping, GIL released): the caller's timed waits (every 50 ms)
    take almost no CPU, each part runs exactly once (no re-run in the parent), results in order."""
    r = run_child(tmp_path, r'''
        gpuconv.set_cpu_workers(1)
        runs = []

        def part(start, stop):
            runs.append(start)
            if start > 0:
                time.sleep(1.0)
            return (start, stop)

        cpu_plan.run_in_parts(part, 2)
        runs.clear()
        cpu0, wall0 = time.process_time(), time.monotonic()
        got = cpu_plan.run_in_parts(part, 2)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        emit(got=got, runs=sorted(runs), cpu=cpu, wall=wall)
    ''', name="no_spin")
    assert r["got"] == [[0, 1], [1, 2]] and r["runs"] == [0, 1], r
    assert r["wall"] >= 0.95 and r["cpu"] < 0.15, r


def test_guard_many_regions_in_a_row_never_take_a_stale_outcome(tmp_path):
    """GUARD: 400 regions whose worker parts take 0 to 70 ms (some past FORK_CHECK_SECONDS, so
    stale semaphore releases and timeouts mix), some raising: every region gets its own part's
    value or exception, never the previous call's."""
    r = run_child(tmp_path, r'''
        gpuconv.set_cpu_workers(1)
        rng = np.random.default_rng(5)
        delays = rng.choice([0.0, 0.0, 0.0001, 0.002, 0.049, 0.051, 0.07], 400)
        raising = rng.random(400) < 0.1
        bad = []
        for i in range(400):
            def part(start, stop, i=i):
                if start > 0:
                    if delays[i]:
                        time.sleep(delays[i])
                    if raising[i]:
                        raise ValueError(f"part {i}")
                return (i, start)
            try:
                got = cpu_plan.run_in_parts(part, 2)
                if raising[i] or got != [(i, 0), (i, 1)]:
                    bad.append((i, repr(got)))
            except ValueError as error:
                if not raising[i] or str(error) != f"part {i}":
                    bad.append((i, repr(error)))
        emit(bad=bad[:5], lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=60, name="many_regions")
    assert r["bad"] == [] and r["lock_free"], r


def test_guard_exception_in_a_long_worker_part(one_worker):
    """GUARD: a worker part raising after 120 ms (two timed waits) raises its own exception in the
    caller, after the caller's part; the next region works."""
    import time
    seen = []

    def part(start, stop):
        if start > 0:
            time.sleep(0.12)
            raise KeyError("worker part")
        seen.append(start)
        return start

    with pytest.raises(KeyError, match="worker part"):
        cpu_plan.run_in_parts(part, 2)
    assert seen == [0]
    assert cpu_plan.run_in_parts(lambda a, b: b, 2) == [1, 2]


def test_guard_fork_from_another_thread_during_a_long_worker_part(tmp_path):
    """GUARD: os.fork() from a second thread while the main thread waits for a 300 ms worker part:
    the child (running only the forking thread) gets a free region lock and a working region with
    the right results; the parent's region finishes with each part run once."""
    r = run_child(tmp_path, r'''
        gpuconv.set_cpu_workers(1)
        runs = long_part_runs()
        status = {}

        def forker():
            time.sleep(0.1)
            pid = os.fork()
            if pid == 0:
                ok = cpu_plan.run_in_parts(lambda a, b: (a, b), 4) == [(0, 1), (1, 2)] or \
                     cpu_plan.run_in_parts(lambda a, b: (a, b), 2) == [(0, 1), (1, 2)]
                os._exit(0 if ok and not cpu_plan._region_lock.locked() else 3)
            status["child"] = wait_or_kill(pid, 10)

        t = threading.Thread(target=forker)
        t.start()
        got = cpu_plan.run_in_parts(long_part, 2)
        t.join()
        me = os.getpid()
        emit(got=got, runs=sorted(s for p, s in runs if p == me), child=status.get("child"))
    ''', name="fork_thread_long")
    assert r["got"] == [0, 10] and r["runs"] == [0, 1], r
    assert r["child"] == 0, r


def test_guard_fork_in_a_signal_handler_during_a_long_worker_part(tmp_path):
    """GUARD: SIGALRM 100 ms into a 300 ms worker part, its handler forks: the child's caller runs
    the worker's part itself (after a timed wait) and gets the region's results; the parent runs
    each part once and is not disturbed."""
    r = run_child(tmp_path, r'''
        gpuconv.set_cpu_workers(1)
        runs = long_part_runs()
        state = {"child": False, "pid": None}

        def handler(signum, frame):
            pid = os.fork()
            if pid == 0:
                state["child"] = True
            else:
                state["pid"] = pid

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        got = cpu_plan.run_in_parts(long_part, 2)
        if state["child"]:
            mine = sorted(s for p, s in runs if p == os.getpid())
            os._exit(0 if got == [0, 10] and mine == [1] and not cpu_plan._region_lock.locked() else 3)
        status = wait_or_kill(state["pid"], 10) if state["pid"] else "no fork"
        me = os.getpid()
        emit(got=got, runs=sorted(s for p, s in runs if p == me), child=status)
    ''', name="fork_handler_long")
    assert r["got"] == [0, 10] and r["runs"] == [0, 1], r
    assert r["child"] == 0, r


# ==============================================================================================
# 2. the caller's floating-point environment in worker processes

FP_BODY = r'''
libm = ctypes.CDLL("libm.so.6")


def make():
    rng = np.random.default_rng(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, rng=rng), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10, rng=rng), nn.Sigmoid())


model = make()
fast = gpuconv.compile(model)
dy = np.random.default_rng(2).standard_normal((48, 10)).astype(np.float32)


def step(x):
    model.zero_grad()
    xt = gpuconv.tensor(x, requires_grad=True)
    out = fast(xt)
    out.backward(gpuconv.tensor(dy))
    return [out.data.copy(), xt.grad.copy()] + [p.grad.copy() for p in model.parameters()]


def in_env(setter, restore, kind, x):
    cpu_plan.processes = kind == "processes"
    gpuconv.set_cpu_workers(0 if kind == "zero" else 1)
    setter()
    try:
        return step(x)
    finally:
        restore()


def same(a, b):
    return all(p.tobytes() == q.tobytes() for p, q in zip(a, b))


def half_differs(a, b):
    """whether the worker's half (rows 24..47) of logits and input gradient differs"""
    return [bool((a[i][24:] != b[i][24:]).any()) for i in (0, 1)]
'''


def test_guard_rounding_modes_reach_the_worker_processes(tmp_path):
    """GUARD: under FE_UPWARD / FE_DOWNWARD / FE_TOWARDZERO in the caller, a compiled step (forward and
    backward) in worker processes gives the worker threads' bits, the worker's rows differ from
    round-to-nearest's (the mode really reached the worker), the 0-worker results agree to float32
    rounding, and a following round-to-nearest step gives the first round-to-nearest bits (the
    worker process restored its own environment)."""
    r = run_child(tmp_path, FP_BODY + r'''
x = np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32)
nothing = lambda: None
nearest = {k: in_env(nothing, nothing, k, x) for k in ("processes", "threads")}
out = {"nearest_same": same(nearest["processes"], nearest["threads"])}
for name, mode in (("up", 0x800), ("down", 0x400), ("zero", 0xc00)):
    got = {k: in_env(lambda: libm.fesetround(mode), lambda: libm.fesetround(0), k, x)
           for k in ("processes", "threads", "zero")}
    after = in_env(nothing, nothing, "processes", x)
    out[name] = dict(same=same(got["processes"], got["threads"]),
                     worker_rows_differ=half_differs(got["processes"], nearest["processes"]),
                     close=all(np.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(got["zero"], got["threads"])),
                     restored=same(after, nearest["processes"]))
emit(**out)
''', hang_s=120, name="fp_rounding")
    assert r["nearest_same"], r
    for name in ("up", "down", "zero"):
        assert r[name]["same"] and r[name]["worker_rows_differ"] == [True, True], (name, r)
        assert r[name]["close"] and r[name]["restored"], (name, r)


def test_guard_flush_to_zero_reaches_the_worker_processes(tmp_path):
    """GUARD: FTZ | DAZ in the caller's MXCSR (fesetenv of an edited fenv_t, x86-64) on inputs whose
    activations are subnormal: processes give the threads' bits, the worker's half of the logits is
    flushed as the caller's is, and a default step afterwards gives default bits."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("MXCSR is x86")
    r = run_child(tmp_path, FP_BODY + r'''
x = (np.random.default_rng(1).standard_normal((48, 3, 8, 8)) * 1e-37).astype(np.float32)
env = ctypes.create_string_buffer(64)
assert libm.fegetenv(env) == 0
saved = env.raw
mxcsr = int.from_bytes(saved[28:32], "little") | 0x8040
ftz = ctypes.create_string_buffer(saved[:28] + mxcsr.to_bytes(4, "little") + saved[32:], 64)
set_ftz = lambda: libm.fesetenv(ftz)
restore = lambda: libm.fesetenv(ctypes.create_string_buffer(saved, 64))
nothing = lambda: None
default = in_env(nothing, nothing, "processes", x)
got = {k: in_env(set_ftz, restore, k, x) for k in ("processes", "threads")}
after = in_env(nothing, nothing, "processes", x)
# the first conv's outputs are subnormal: flushed, the ReLU/pool/conv give 0 + bias only
emit(same=same(got["processes"], got["threads"]), differs=half_differs(got["processes"], default),
     restored=same(after, default))
''', hang_s=120, name="fp_ftz")
    assert r["same"] and r["restored"], r
    assert r["differs"][1] or r["differs"][0], r


def test_guard_fpenv_encode_decode_round_trip():
    """GUARD: decode(encode(env)) is the same environment: fesetenv of it then fegetenv gives the
    same bytes; None <-> "-"; an all-zero buffer encodes as one word."""
    from gpuconv import fpenv
    env = fpenv.current()
    if env is None:
        pytest.skip("no fegetenv")
    word = fpenv.encode(env)
    assert " " not in word and len(word) <= 2 * fpenv.ENV_BYTES
    back = fpenv.decode(word)
    assert back.raw == env.raw
    assert fpenv.encode(None) == "-" and fpenv.decode("-") is None
    import ctypes
    assert fpenv.encode(ctypes.create_string_buffer(fpenv.ENV_BYTES)) == "00"
    assert fpenv.decode("00").raw == bytes(fpenv.ENV_BYTES)
    assert fpenv.run_in(back, lambda: fpenv.current().raw) == env.raw


# ==============================================================================================
# 3. batch_norm with weight None and/or bias


def _bn_reference(x, weight, bias, mean=None, var=None, eps=1e-5):
    x64 = x.astype(np.float64)
    if mean is None:
        mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    y = (x64 - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + eps)
    if weight is not None:
        y = y * weight.reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 8, 48, 48)], ids=["small", "over-1MiB"])
@pytest.mark.parametrize("affine", ["bias-only", "weight-only", "both", "neither"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_guard_batch_norm_bias_and_weight_each_optional(shape, affine, training, one_worker):
    """GUARD: y matches float64 (x - mean) * invstd [* weight] [+ bias] in training and eval, for a
    small array and one >= norm_cpu.MIN_BYTES (the parts path); every given input gets a gradient
    equal to the analytic one (dbias = sum dy, dweight = sum dy * xhat, dx), absent ones none; the
    running statistics move as PyTorch's (unbiased variance)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    assert (x.nbytes >= norm_cpu.MIN_BYTES) == (shape[0] == 16)
    c = shape[1]
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if affine in ("weight-only", "both") else None
    b = rng.standard_normal(c).astype(np.float32) if affine in ("bias-only", "both") else None
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    xt = gpuconv.tensor(x, requires_grad=True)
    wt = None if w is None else gpuconv.tensor(w, requires_grad=True)
    bt = None if b is None else gpuconv.tensor(b, requires_grad=True)
    y = F.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=0.1)
    ref = _bn_reference(x, w, b, None if training else rm0, None if training else rv0)
    assert_close(y.data, ref, rtol=2e-5, what="y")
    dy = rng.standard_normal(shape).astype(np.float32)
    y.backward(gpuconv.tensor(dy))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    if training:
        mean, var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    else:
        mean, var = rm0.astype(np.float64), rv0.astype(np.float64)
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x64 - mean.reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
    scale = invstd * (1 if w is None else w)
    if training:
        n = shape[0] * shape[2] * shape[3]
        dx = scale.reshape(1, -1, 1, 1) * (dy64 - dy64.sum(axis=(0, 2, 3)).reshape(1, -1, 1, 1) / n
                                           - xhat * (dy64 * xhat).sum(axis=(0, 2, 3)).reshape(1, -1, 1, 1) / n)
    else:
        dx = dy64 * scale.reshape(1, -1, 1, 1)
    assert_close(xt.grad, dx, rtol=1e-4, what="dx")
    if wt is not None:
        assert_close(wt.grad, (dy64 * xhat).sum(axis=(0, 2, 3)), rtol=1e-4, what="dweight")
    if bt is not None:
        assert bt.grad is not None, "bias got no gradient"
        assert_close(bt.grad, dy64.sum(axis=(0, 2, 3)), rtol=1e-4, what="dbias")
    if training:
        n = shape[0] * shape[2] * shape[3]
        assert_close(rm, 0.9 * rm0 + 0.1 * x64.mean(axis=(0, 2, 3)), rtol=1e-5, what="running_mean")
        assert_close(rv, 0.9 * rv0 + 0.1 * x64.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-5, what="running_var")
    else:
        assert same_bits(rm, rm0) and same_bits(rv, rv0)


@pytest.mark.parametrize("affine", ["bias-only", "weight-only", "both", "neither"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_guard_batch_norm_float64_gradcheck(affine, training):
    """GUARD: gpuconv.gradcheck of x, weight, bias (the given ones) through F.batch_norm, float64."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 3, 4))
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    w = rng.uniform(0.5, 1.5, 2) if affine in ("weight-only", "both") else None
    b = rng.standard_normal(2) if affine in ("bias-only", "both") else None
    names = ["x"] + (["w"] if w is not None else []) + (["b"] if b is not None else [])
    inputs = [x] + [a for a in (w, b) if a is not None]

    def unpack(arrays, grad):
        given = dict(zip(names, [gpuconv.tensor(a, requires_grad=grad) for a in arrays]))
        return given["x"], given.get("w"), given.get("b")

    def f(*arrays):
        xt, wt, bt = unpack(arrays, False)
        return F.batch_norm(xt, rm.copy(), rv.copy(), wt, bt, training=training).data

    def grads(dy, *arrays):
        tensors = unpack(arrays, True)
        F.batch_norm(tensors[0], rm.copy(), rv.copy(), tensors[1], tensors[2], training=training).backward(
            gpuconv.tensor(dy))
        return [t.grad for t in tensors if t is not None]

    gradcheck(f, inputs, grads)


def test_guard_batch_norm_module_bias_only_matches_functional():
    """GUARD: nn.BatchNorm2d whose weight is frozen (requires_grad False) still trains its bias: the
    bias gets sum(dy), the weight none."""
    rng = np.random.default_rng(4)
    bn = nn.BatchNorm2d(3)
    bn.weight.requires_grad = False
    x = gpuconv.tensor(rng.standard_normal((4, 3, 5, 5)).astype(np.float32), requires_grad=True)
    dy = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    bn(x).backward(gpuconv.tensor(dy))
    assert bn.weight.grad is None
    assert_close(bn.bias.grad, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5)


# ==============================================================================================
# 4. autograd._add

BIG = (1, 1, 1024, 1100)  # float32: 4.3 MiB, over ELEMENTWISE_MIN_BYTES (in parts)


@pytest.mark.parametrize("shape", [(3, 4, 5), BIG], ids=["small", "big"])
@pytest.mark.parametrize("reads", [2, 3, 5])
def test_guard_a_tensor_read_many_times_gets_the_sum(shape, reads, one_worker):
    """GUARD: h = x * 1 read `reads` times (each read scaled by its own factor): x.grad is the sum,
    the sum of float32 gradients in _run_backward's order gives a + b's bits."""
    rng = np.random.default_rng(reads)
    x = gpuconv.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
    factors = [np.float32(k + 0.5) for k in range(reads)]
    h = x * 1.0
    total = None
    for k in factors:
        term = h * gpuconv.tensor(np.full(shape, k, np.float32))
        total = term if total is None else total + term
    dy = rng.standard_normal(shape).astype(np.float32)
    total.backward(gpuconv.tensor(dy))
    want = dy * factors[0]
    for k in factors[1:]:
        want = want + dy * k
    assert_close(x.grad, want, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 5), BIG], ids=["small", "big"])
def test_guard_add_never_writes_into_its_inputs_and_handles_aliases(shape, one_worker):
    """GUARD: _add(a, a), _add(a, b) with a non-contiguous b, with NaN/inf, float32 + float64: a new
    array each time, inputs untouched, the bits (and dtype) of a + b."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape).astype(np.float32)
    a.reshape(-1)[:4] = [np.nan, np.inf, -np.inf, 3e38]
    keep = a.copy()
    s = autograd._add(a, a)
    assert s is not a and not np.shares_memory(s, a) and same_bits(s, a + a) and same_bits(a, keep)
    b = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    assert same_bits(autograd._add(a, b), a + b)
    c = rng.standard_normal(shape)  # float64
    got = autograd._add(a, c)
    assert got.dtype == np.float64 and same_bits(got, a + c)
    got = autograd.Add().forward(c, a)
    assert got.dtype == np.float64 and same_bits(got, c + a)
    assert same_bits(a, keep)


def test_guard_mixed_dtype_gradients_of_a_tensor_read_twice(one_worker):
    """GUARD: h (float32) read by a float32 branch and a float64 branch: h's node gets both
    gradients cast to float32 and summed; x.grad is float32 and right."""
    rng = np.random.default_rng(2)
    x = gpuconv.tensor(rng.standard_normal(BIG).astype(np.float32), requires_grad=True)
    h = x * 1.0
    a = h * gpuconv.tensor(np.float32(2))
    b = h * gpuconv.tensor(np.float64(3))
    out = (a.sum() + b.sum())
    out.backward()
    assert x.grad.dtype == np.float32
    assert_close(x.grad, np.full(BIG, 5.0), rtol=1e-6)


def test_guard_broadcast_add_gradients(one_worker):
    """GUARD: h + bias (broadcast) with h also read by another op: the broadcast side's gradient is
    summed back to its shape, h's is the sum of both reads."""
    rng = np.random.default_rng(3)
    x = gpuconv.tensor(rng.standard_normal(BIG).astype(np.float32), requires_grad=True)
    bias = gpuconv.tensor(np.ones((1, 1, 1, 1100), np.float32), requires_grad=True)
    h = x * 1.0
    out = (h + bias) + h
    dy = rng.standard_normal(BIG).astype(np.float32)
    out.backward(gpuconv.tensor(dy))
    assert_close(x.grad, 2 * dy.astype(np.float64), rtol=1e-6)
    assert_close(bias.grad, dy.astype(np.float64).sum(axis=(0, 1, 2), keepdims=True), rtol=1e-5)


# ==============================================================================================
# 5. ReLU writing into its output gradient (owns_dy)


def _conv(cin, cout, k, rng):
    return nn.Conv2d(cin, cout, k, padding=k // 2, rng=rng)


def relu_models():
    def chain():
        rng = np.random.default_rng(0)
        return nn.Sequential(_conv(3, 6, 3, rng), nn.ReLU(), nn.ReLU(), _conv(6, 6, 3, rng), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 12, rng=rng), nn.ReLU(),
                             nn.Linear(12, 5, rng=rng), nn.ReLU())

    def relu_before_flatten_last():
        rng = np.random.default_rng(1)
        return nn.Sequential(_conv(3, 4, 3, rng), nn.ReLU(), nn.Flatten(), nn.ReLU())

    def residual_relus():
        rng = np.random.default_rng(2)
        body = nn.Sequential(nn.ReLU(), _conv(3, 3, 3, rng), nn.ReLU())
        return nn.Sequential(_conv(3, 3, 1, rng), nn.Residual(body, activation=nn.ReLU()),
                             nn.Residual(nn.Sequential(_conv(3, 3, 3, rng), nn.ReLU()), nn.Sequential(nn.ReLU()),
                                         activation=nn.ReLU()),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4, rng=rng), nn.ReLU())

    def concat_relus():
        rng = np.random.default_rng(3)
        return nn.Sequential(nn.ReLU(),
                             nn.Concat(nn.Sequential(nn.ReLU()), nn.Sequential(_conv(3, 4, 1, rng), nn.ReLU(), nn.ReLU()),
                                       nn.Sequential(nn.Identity()), nn.Sequential(_conv(3, 2, 3, rng), nn.ReLU())),
                             nn.ReLU(),
                             nn.Concat(nn.Sequential(_conv(12, 3, 3, rng), nn.ReLU(), nn.MaxPool2d(2)),
                                       nn.Sequential(nn.MaxPool2d(2), nn.ReLU())),
                             nn.ReLU())

    def residual_of_concat():
        rng = np.random.default_rng(4)
        inner = nn.Concat(nn.Sequential(_conv(4, 2, 1, rng), nn.ReLU()), nn.Sequential(nn.ReLU(), _conv(4, 2, 3, rng)))
        return nn.Sequential(_conv(3, 4, 3, rng), nn.ReLU(),
                             nn.Residual(nn.Sequential(inner, nn.ReLU()), activation=nn.ReLU()),
                             nn.Concat(nn.Sequential(nn.Residual(nn.Sequential(nn.ReLU(), _conv(4, 4, 3, rng)))),
                                       nn.Sequential(nn.ReLU())),
                             nn.Flatten(), nn.ReLU(), nn.Linear(8 * 8 * 8, 3, rng=rng))

    def tanh_and_relu():
        rng = np.random.default_rng(5)
        return nn.Sequential(_conv(3, 4, 3, rng), nn.Tanh(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 6, rng=rng),
                             nn.ReLU(), nn.Sigmoid(), nn.ReLU())

    return dict(chain=chain, relu_before_flatten_last=relu_before_flatten_last, residual_relus=residual_relus,
                concat_relus=concat_relus, residual_of_concat=residual_of_concat, tanh_and_relu=tanh_and_relu)


def _relu_step(network, model, x, dy):
    model.zero_grad()
    xt = gpuconv.tensor(x, requires_grad=True)
    out = network(xt)
    out.backward(gpuconv.tensor(dy))
    return out.data.copy(), xt.grad.copy(), {n: None if p.grad is None else p.grad.copy()
                                              for n, p in model.named_parameters()}, out


@pytest.mark.parametrize("name", list(relu_models()))
def test_guard_relu_gradients_in_place_match_eager(name, kind):
    """GUARD: models with ReLUs everywhere owns_dy can be set (two in a row, after Flatten, last,
    in residual body/post/shortcut, ending Concat branches, an identity branch beside them, a
    ReLU whose input gradient another branch also reads): compiled logits, input gradient and every
    p.grad match eager (rtol 1e-4), twice in a row (buffers reused), and the caller's dy is
    untouched. Inputs shifted so that few activations are exactly zero."""
    make = relu_models()[name]
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((52, 3, 8, 8)) + 0.3).astype(np.float32)
    eager_model, fast_model = make(), make()
    fast = gpuconv.compile(fast_model)
    out_shape = eager_model(gpuconv.tensor(x)).shape
    dy = rng.standard_normal(out_shape).astype(np.float32)
    dy_keep = dy.copy()
    e = _relu_step(eager_model, eager_model, x, dy)
    for _ in range(2):
        c = _relu_step(fast, fast_model, x, dy)
        assert len(plans_on_tape(c[3])) == 1, "not one plan: the ReLUs ran eagerly"
        assert same_bits(dy, dy_keep), "the caller's dy was written into"
        assert_close(c[0], e[0], what="logits")
        assert_close(c[1], e[1], what="input gradient")
        for n, want in e[2].items():
            assert (c[2][n] is None) == (want is None), n
            if want is not None:
                assert_close(c[2][n], want, what=n)


# ==============================================================================================
# 6. InceptionNet


@pytest.mark.parametrize("bad", [dict(image_size=3), dict(image_size=0), dict(image_size=True),
                                 dict(in_channels=0), dict(in_channels=2.0), dict(image_size="32")])
def test_guard_inception_argument_errors(bad):
    """GUARD: sizes that leave nothing after two pools, non-int or non-positive arguments raise an
    ArgumentError naming the argument."""
    kwargs = dict(in_channels=3, num_classes=10, image_size=32) | bad
    with pytest.raises(ArgumentError, match=next(iter(bad)) if "image_size" not in bad or bad["image_size"] != 3
                       else "two pools"):
        build_model("inception", **kwargs)


@pytest.mark.parametrize("size", [4, 5, 7, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_guard_inception_sizes_and_channels(size, channels):
    """GUARD: InceptionNet on every size its check accepts (4, 5, 7, 28, 32) and 1 or 3 channels
    gives [N, classes] logits, finite, and its parameter count does not depend on the size."""
    model = build_model("inception", in_channels=channels, num_classes=7, image_size=size)
    x = np.random.default_rng(size).standard_normal((2, channels, size, size)).astype(np.float32)
    out = model(gpuconv.tensor(x))
    assert out.shape == (2, 7) and np.isfinite(out.data).all()
    count = sum(p.data.size for p in model.parameters())
    assert count == sum(p.data.size for p in InceptionNet(channels, 7, 32).parameters())


@pytest.mark.parametrize("size", [5, 32])
def test_guard_inception_compiled_training_steps_match_eager(size, kind):
    """GUARD: two SGD steps of InceptionNet compiled (one plan, worker processes / threads) against
    eager: logits, input gradient and every p.grad to rtol 1e-4 at each step."""
    from gpuconv import optim
    rng = np.random.default_rng(9)
    x = rng.standard_normal((48, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 10, 48)
    eager, model = InceptionNet(3, 10, size), InceptionNet(3, 10, size)
    fast = gpuconv.compile(model)
    opt_e, opt_c = optim.SGD(eager.parameters(), lr=0.05, momentum=0.9), optim.SGD(model.parameters(), lr=0.05,
                                                                                    momentum=0.9)
    for _ in range(2):
        results = []
        for network, m, opt in ((eager, eager, opt_e), (fast, model, opt_c)):
            opt.zero_grad()
            xt = gpuconv.tensor(x, requires_grad=True)
            out = network(xt)
            if network is fast:
                assert len(plans_on_tape(out)) == 1, "InceptionNet did not run as one plan"
            F.cross_entropy(out, labels).backward()
            results.append((out.data.copy(), xt.grad.copy(), [p.grad.copy() for p in m.parameters()]))
            opt.step()
        (eo, edx, eg), (co, cdx, cg) = results
        assert_close(co, eo, what="logits")
        assert_close(cdx, edx, what="dx")
        for i, (a, b) in enumerate(zip(cg, eg)):
            assert_close(a, b, rtol=2e-4, what=f"param {i}")


def test_guard_inception_checkpoint_round_trip(tmp_path):
    """GUARD: an InceptionNet state_dict saved and loaded into a fresh one (another seed) gives the
    same logits bit for bit."""
    from gpuconv.checkpoint import load_checkpoint, save_checkpoint
    model = InceptionNet(1, 10, 28, seed=1)
    path = tmp_path / "inc.npz"
    save_checkpoint(path, model, meta={"model": "inception"})
    state = load_checkpoint(path)[0]
    other = InceptionNet(1, 10, 28, seed=2)
    other.load_state_dict(state)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert same_bits(other(gpuconv.tensor(x)).data, model(gpuconv.tensor(x)).data)


@pytest.mark.parametrize("name", ["resnet8", "simplecnn", "inception"])
def test_finding_show_draws_feature_maps_of_every_zoo_model(name):
    """FOUND: `python -m gpuconv show` on an InceptionNet checkpoint draws a feature-map picture with
    no feature maps at all. show.feature_maps takes the children the model names in
    `feature_layers` (ResNet: conv1, layer1; SimpleCNN: block1, block2) and falls back to LeNet-5's
    {"conv1": "act1", "conv2": "act2"}; InceptionNet (models.py, 446fc9d) sets no feature_layers and
    has no child named act1/act2, so `maps` is {} and plot_feature_maps silently leaves the maps
    panel empty. (Checked through show.feature_maps, no matplotlib needed.)"""
    from gpuconv.show import feature_maps
    model = build_model(name, 3, 10, 32)
    image = np.random.default_rng(0).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    maps, probabilities = feature_maps(model, image)
    assert probabilities.shape == (10,)
    assert len(maps) >= 1, f"{name}: no feature maps for show to draw"
