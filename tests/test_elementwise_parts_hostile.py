"""Hostile tests of ReLU and autograd's float32 Add in parts over the cores (223a757:
gpuconv/ops/cpu_parts.py elementwise, run through cpu_plan.run_in_parts) and of ops nested in their
own thread's region (84405e6: cpu_plan._RegionLock.held_here).

Findings fixed in the commit after 3709c5e (the hostile tester's): the error an errstate('raise')
add reports, an np.errstate callback or warning hook that runs ops (it ran on a region's worker and
hung), the caller's bufsize in the parts, Ctrl-C right after the region lock's acquire or inside
blas.num_threads. The caller's rounding mode and flush-to-zero set through C are carried into the worker parts
since the commit after 64e424d (gpuconv/fpenv.py). A fork from a signal handler while its thread
is inside a region left a child that waited for a worker that did not come along; the child now
runs that worker's part itself (cpu_plan._Worker.result).

The claims under attack: the bits and errors of one whole-array NumPy call, the caller's
floating-point settings honoured in the worker parts, no hang, the process's settings (the BLAS
thread count) restored exactly. Scenarios that could hang or that change per-thread state run in a
child process (tests/hostile_child.py: a fresh interpreter, one worker, a hard timeout).
"""
import threading

import numpy as np
import pytest

import gpuconv
import hostile_child
from gpuconv import autograd
from gpuconv.nn import cpu_plan
from gpuconv.ops import activation, cpu_parts

N = 2 * 1024 * 1024 + 777   # float32: 8 MiB and an odd rest, over both thresholds (relu: 8 MiB, add: 4 MiB)

PRELUDE = r'''
import ctypes, faulthandler, json, os, signal, sys, threading, time
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import autograd, blas
from gpuconv.nn import cpu_plan
from gpuconv.ops import activation, cpu_parts

N = 2 * 1024 * 1024 + 777


def emit(**results):
    print("RESULT " + json.dumps(results), flush=True)


def add(a, b):
    """autograd's Add (what Tensor + Tensor runs), on arrays."""
    return autograd.Add().forward(a, b)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint64)
'''


def run_child(tmp_path, body, hang_s=20, name="child"):
    return hostile_child.run_child(tmp_path, PRELUDE, body, hang_s, name)


def add(a, b):
    return autograd.Add().forward(a, b)


def same_bits(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# ----------------------------------------------------------------------------------------------
# findings (fail at 50c35ff)


def test_errstate_raise_reports_the_error_a_whole_array_add_reports(one_worker):
    """np.errstate(all='raise'): NumPy checks the flags after the whole call, in the order divide,
    over, under, invalid, so `a + b` with an inf + -inf near the start and an overflow near the end
    raises "overflow encountered in add". In parts, the first chunk raises on its own invalid
    before the overflow's chunk runs: "invalid value encountered in add"."""
    a, b = np.ones(N, np.float32), np.ones(N, np.float32)
    a[5], b[5] = np.inf, -np.inf      # invalid, in the first chunk
    a[-5] = b[-5] = 3e38              # overflow, in the last chunk (a worker's part)
    with np.errstate(all="raise"), pytest.raises(FloatingPointError) as whole:
        a + b
    with np.errstate(all="raise"), pytest.raises(FloatingPointError) as parts:
        add(a, b)
    assert str(parts.value) == str(whole.value) == "overflow encountered in add"


def test_the_callers_rounding_mode_holds_in_every_part(tmp_path):
    """fesetround() is per thread. Under FE_UPWARD in the caller, 1 + 1e-8 rounds up to the next
    float32 for every element of `a + b`; in parts only the caller's part does, the worker's part
    rounds to nearest (1.0): the bits depend on the worker count."""
    r = run_child(tmp_path, r'''
        libm = ctypes.CDLL("libm.so.6")
        x, y = np.ones(N, np.float32), np.full(N, 1e-8, np.float32)
        g = np.ones(N, np.float32)
        add(x, y); activation.relu_backward(g, x)          # the worker thread exists
        FE_UPWARD = 0x800                                    # x86
        assert libm.fesetround(FE_UPWARD) == 0
        try:
            whole, parts = x + y, add(x, y)
        finally:
            libm.fesetround(0)
        emit(whole_rounded_up=int(np.count_nonzero(whole != 1)), parts_rounded_up=int(np.count_nonzero(parts != 1)))
    ''', name="rounding")
    assert r["whole_rounded_up"] == N, r
    assert r["parts_rounded_up"] == r["whole_rounded_up"], r


def test_the_callers_flush_to_zero_holds_in_every_part(tmp_path):
    """Flush-to-zero / denormals-are-zero (MXCSR, per thread; set for instance by a library built
    with -ffast-math when it is loaded): `a + b` of subnormals is all zeros in the caller's thread,
    but the worker part, whose MXCSR is its own, keeps the subnormal sums."""
    r = run_child(tmp_path, r'''
        libm = ctypes.CDLL("libm.so.6")
        sub = np.full(N, 1e-39, np.float32)                  # subnormal
        add(sub, sub)                                         # the worker thread exists, MXCSR default
        env = ctypes.create_string_buffer(64)
        assert libm.fegetenv(env) == 0
        saved = env.raw
        mxcsr = int.from_bytes(saved[28:32], "little") | 0x8040   # FTZ | DAZ (x86-64 fenv_t)
        assert libm.fesetenv(ctypes.create_string_buffer(saved[:28] + mxcsr.to_bytes(4, "little") + saved[32:], 64)) == 0
        try:
            whole, parts = sub + sub, add(sub, sub)
        finally:
            libm.fesetenv(ctypes.create_string_buffer(saved, 64))
        emit(whole_nonzero=int(np.count_nonzero(whole)), parts_nonzero=int(np.count_nonzero(parts)))
    ''', name="ftz")
    assert r["whole_nonzero"] == 0, r
    assert r["parts_nonzero"] == 0, r


def test_an_errcall_callback_that_runs_an_op_does_not_hang(tmp_path):
    """np.errstate(over='call', call=f): the caller's f now runs in the worker thread for the
    worker's part, while the caller holds the region lock and waits for that worker. An f that
    runs a gpuconv op taking a region (a large ReLU, a logging hook doing the same) waits for the
    lock in the worker: the caller waits for the worker forever."""
    r = run_child(tmp_path, r'''
        big = np.full(N, 3e38, np.float32)
        other = np.linspace(-1, 1, N, dtype=np.float32)
        calls = []

        def on_error(kind, flag):
            calls.append(threading.current_thread().name)
            activation.relu(other)                      # 8 MiB: in parts, a region of its own

        with np.errstate(over="call", call=on_error):
            got = add(big, big)
        emit(calls=len(calls), threads=sorted(set(calls)), inf=bool(np.isinf(got).all()),
             lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=10, name="errcall")
    assert r["inf"] and r["lock_free"], r


def test_a_fork_in_a_signal_handler_inside_the_threads_region_leaves_a_working_child(tmp_path):
    """A signal handler that forks while its thread is inside a region (waiting for its worker, or
    running its own part): the child continues the interrupted add, but the worker thread did not
    come along. The child's add waited forever for a worker it does not have (3 of 3 children
    hung before the fix); now it runs the worker's part itself and gets the whole add's bits."""
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no os.fork")
    r = run_child(tmp_path, r'''
        a = np.linspace(-1, 1, 4 * N, dtype=np.float32)   # 32 MiB: long regions
        expected = a + a
        state = {"child": False, "forks": [], "running": True}

        def handler(signum, frame):
            if cpu_plan._region_lock.held_here() and len(state["forks"]) < 3:
                pid = os.fork()
                if pid == 0:
                    state["child"] = True
                    state["running"] = False
                    return          # the child goes on with the interrupted add
                state["forks"].append(pid)
            if state["running"]:
                signal.setitimer(signal.ITIMER_REAL, 0.003)

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.003)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and len(state["forks"]) < 3:
            got = add(a, a)
            if state["child"]:
                os._exit(0 if got.tobytes() == expected.tobytes() and not cpu_plan._region_lock.locked() else 3)
        state["running"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        statuses = [wait_or_kill(pid, 5) for pid in state["forks"]]
        emit(forks=len(state["forks"]), hung=sum(s is None for s in statuses),
             failed=sum(s is not None and s != 0 for s in statuses))
    ''', hang_s=40, name="fork_in_handler")
    assert r["forks"] >= 1, r
    assert r["hung"] == 0 and r["failed"] == 0, r


def test_ctrl_c_right_after_the_region_lock_is_taken_leaves_it_free(tmp_path):
    """_RegionLock.__enter__ used to take the lock, then record its owner: a KeyboardInterrupt
    raised by the SIGINT handler between the two (the eval loop runs pending handlers right after a
    call such as acquire() returns) left __enter__ with the lock held, so `with` never called
    __exit__: every later op that takes a region waited for it forever. Its __enter__ is now the C
    lock's own, with no line between; the interrupt is injected with a trace function at the first
    Python line that runs after the lock is taken (blas.num_threads, the region's next context
    manager), as the handler would run there."""
    r = run_child(tmp_path, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        a = np.linspace(-1, 1, N, dtype=np.float32)
        expected = a + a
        # the first line after the region lock's acquire: the lock is taken
        fired, interrupted = interrupted_at("num_threads", "getter, setter = _lookup()", lambda: add(a, a))
        locked = cpu_plan._region_lock.locked()
        done = threading.Event()
        result = {}

        def again():
            result["ok"] = add(a, a).tobytes() == expected.tobytes()
            done.set()

        threading.Thread(target=again, daemon=True).start()
        emit(fired=fired, interrupted=interrupted, locked_after=locked, finished=done.wait(5),
             ok=result.get("ok"))
    ''', name="ctrl_c_enter")
    assert r["fired"] and r["interrupted"], r
    assert not r["locked_after"] and r["finished"] and r["ok"], r


@pytest.mark.parametrize("line", ["_restores.append", "yield"])
def test_ctrl_c_inside_the_blas_switch_restores_the_blas_thread_count(tmp_path, line):
    """blas.num_threads set the count, then recorded the count to restore, both before its `try`:
    a KeyboardInterrupt between the two (right after the ctypes call returns) left the BLAS at one
    thread for the rest of the process, behind the user's back. Injected at the line that records
    the count (where 50c35ff had set it already) and at the yield (after it is set now)."""
    r = run_child(tmp_path, "\n        LINE = " + repr(line) + r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not blas.available():
            emit(skip=True)
            sys.exit(0)
        blas.set_num_threads(2)
        before = blas.get_num_threads()
        a = np.linspace(-1, 1, N, dtype=np.float32)
        fired, interrupted = interrupted_at("num_threads", LINE, lambda: add(a, a))
        emit(skip=False, fired=fired, interrupted=interrupted, before=before, after=blas.get_num_threads(),
             lock_free=not cpu_plan._region_lock.locked())
    ''', name="ctrl_c_blas")
    if r["skip"]:
        pytest.skip("no controllable OpenBLAS")
    assert r["fired"] and r["interrupted"], r
    assert r["after"] == r["before"], r


# ----------------------------------------------------------------------------------------------
# guards (pass at 50c35ff)


def _nans(n, seed):
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, n).astype(np.uint32) << 31
    return (signs | 0x7fc00000 | rng.integers(1, 1 << 22, n).astype(np.uint32)).view(np.float32)


@pytest.mark.parametrize("offset", [0, 4, 1], ids=["aligned", "offset-view", "unaligned"])
def test_nan_payloads_of_views_at_any_offset_and_any_bufsize(offset, one_worker):
    """NaN + NaN keeps a's payload in NumPy's SIMD blocks and b's in the rest: the parts must
    split where a whole call's blocks would, also for a view 4 bytes in (peeling), a misaligned
    buffer (buffered iteration in bufsize pieces) and a caller's np.setbufsize."""
    def place(values):
        raw = np.zeros(values.nbytes + 8, np.uint8)
        out = np.frombuffer(memoryview(raw)[offset:offset + values.nbytes], np.float32)
        out.view(np.uint32)[:] = values.view(np.uint32)
        return out

    a, b = place(_nans(N, 1)), place(_nans(N, 2))
    a[::7] = np.float32(-0.0)
    assert a.flags.c_contiguous and type(a) is np.ndarray
    for size in (None, 1008):
        old = np.getbufsize()
        if size:
            np.setbufsize(size)
        try:
            whole, parts = a + b, add(a, b)
            whole_r, parts_r = np.maximum(a, 0), activation.relu(a)
        finally:
            np.setbufsize(old)
        assert same_bits(parts, whole) and same_bits(parts_r, whole_r), (offset, size)


def test_the_callers_bufsize_holds_in_every_part(one_worker):
    """np.setbufsize (NumPy's ufunc buffer, per context like np.errstate, which elementwise()
    carries into the workers without it): a misaligned array goes through buffered iteration in
    bufsize pieces, and with 16-element buffers NaN + NaN keeps other payloads than in 8192-element
    ones. The worker's part runs with its own default bufsize: other bits than `a + b`."""
    raw_a, raw_b = np.zeros(4 * N + 8, np.uint8), np.zeros(4 * N + 8, np.uint8)
    a = np.frombuffer(memoryview(raw_a)[1:1 + 4 * N], np.float32)
    b = np.frombuffer(memoryview(raw_b)[1:1 + 4 * N], np.float32)
    a.view(np.uint32)[:] = _nans(N, 1).view(np.uint32)
    b.view(np.uint32)[:] = _nans(N, 2).view(np.uint32)
    assert not a.flags.aligned and a.flags.c_contiguous
    old = np.getbufsize()
    np.setbufsize(16)
    try:
        whole, parts = a + b, add(a, b)
    finally:
        np.setbufsize(old)
    assert same_bits(parts, whole)


def test_shared_memory_read_only_and_subclasses(one_worker):
    """a + a, a + a view of a's buffer, read-only inputs, a memmap (a subclass: the old path), all
    the bits of `a + b` and a new writable array each call, inputs untouched."""
    a = _nans(N, 3).copy()
    a[: N // 2] = np.linspace(-1, 1, N // 2, dtype=np.float32)
    a[7], a[8], a[9] = -0.0, np.float32(1e-45), -np.inf
    keep = a.tobytes()
    ro = a.copy()
    ro.flags.writeable = False
    for x, y in [(a, a), (a, a[::1]), (a, a.reshape(-1)[:]), (ro, ro), (ro, a)]:
        got = add(x, y)
        assert same_bits(got, x + y) and got.flags.writeable and got.flags.c_contiguous
        assert not np.shares_memory(got, a)
        assert same_bits(activation.relu(x), np.maximum(x, 0))
    assert a.tobytes() == keep


def test_a_memmap_takes_the_old_path(tmp_path, one_worker):
    m = np.memmap(tmp_path / "m.bin", np.float32, "w+", shape=(N,))
    m[:] = np.linspace(-2, 2, N, dtype=np.float32)
    assert not cpu_parts.elementwise_in_parts(m, m)
    assert same_bits(np.asarray(add(m, m)), np.asarray(m + m))
    assert same_bits(np.asarray(activation.relu(m)), np.asarray(np.maximum(m, 0)))


def test_add_and_relu_gradients_in_parts(one_worker):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 16, 32, 33)).astype(np.float32)   # 4.1 MiB
    y = rng.standard_normal(x.shape).astype(np.float32)
    assert x.nbytes >= cpu_parts.ELEMENTWISE_MIN_BYTES
    tx, ty = gpuconv.tensor(x, requires_grad=True), gpuconv.tensor(y, requires_grad=True)
    out = gpuconv.functional.relu(tx + ty)
    assert same_bits(out.data, np.maximum(x + y, 0))
    g = rng.standard_normal(x.shape).astype(np.float32)
    out.backward(gpuconv.tensor(g))
    expected = np.where(x + y > 0, g, 0).astype(np.float32)
    assert same_bits(tx.grad if isinstance(tx.grad, np.ndarray) else tx.grad.data, expected)
    assert same_bits(ty.grad if isinstance(ty.grad, np.ndarray) else ty.grad.data, expected)


def test_bits_while_another_thread_changes_the_worker_count():
    """One thread sets the worker count 0..3 in a loop while two others run ReLU, its backward and
    the add: every result has the bits of one whole-array call."""
    before = cpu_plan._worker_count
    a = np.linspace(-3, 3, N, dtype=np.float32)
    a[::5] = _nans(N, 4)[::5]
    g = _nans(N, 5)
    want = (np.maximum(a, 0).tobytes(), np.where(a > 0, g, 0).tobytes(), (a + g).tobytes())
    stop, bad = threading.Event(), []

    def flip():
        i = 0
        while not stop.is_set():
            cpu_plan.set_cpu_workers(i % 4)
            i += 1

    def run():
        for _ in range(6):
            got = (activation.relu(a).tobytes(), activation.relu_backward(g, a).tobytes(), add(a, g).tobytes())
            bad.extend(i for i in range(3) if got[i] != want[i])

    flipper = threading.Thread(target=flip)
    runners = [threading.Thread(target=run) for _ in range(2)]
    flipper.start()
    for t in runners:
        t.start()
    for t in runners:
        t.join(60)
    stop.set()
    flipper.join(10)
    cpu_plan._worker_count = before
    assert not bad
    assert not cpu_plan._region_lock.locked()


def test_a_real_ctrl_c_during_adds_in_parts(tmp_path):
    """SIGINT (the default handler) at random moments of large adds: each interrupted call raises
    KeyboardInterrupt, and afterwards the lock is free, the BLAS count is what it was and the next
    add gives the whole-array bits."""
    r = run_child(tmp_path, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        a = np.linspace(-1, 1, 2 * N, dtype=np.float32)
        expected = (a + a).tobytes()
        before = blas.get_num_threads()
        interrupts = 0
        for i in range(30):
            signal.setitimer(signal.ITIMER_REAL, 0.0005 + 0.0007 * (i % 10))
            signal.signal(signal.SIGALRM, lambda s, f: os.kill(os.getpid(), signal.SIGINT))
            try:
                for _ in range(3):
                    add(a, a)
            except KeyboardInterrupt:
                interrupts += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
        ok = add(a, a).tobytes() == expected
        emit(interrupts=interrupts, ok=ok, before=before, after=blas.get_num_threads(),
             lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=40, name="real_ctrl_c")
    assert r["interrupts"] >= 1 and r["ok"] and r["lock_free"] and r["after"] == r["before"], r


def test_a_fork_from_another_thread_during_relu_regions(tmp_path):
    """os.fork() from a thread while the main thread runs ReLU/add regions: the child's ReLU and
    add run (free lock, BLAS as outside regions) and give the parent's bits."""
    r = run_child(tmp_path, r'''
        a = np.linspace(-1, 1, 2 * N, dtype=np.float32)
        want = (np.maximum(a, 0).tobytes(), (a + a).tobytes())
        outside = blas.get_num_threads()
        statuses, stop = [], threading.Event()

        def forker():
            for _ in range(4):
                time.sleep(0.05)
                pid = os.fork()
                if pid == 0:
                    ok = (activation.relu(a).tobytes(), add(a, a).tobytes()) == want
                    ok = ok and blas.get_num_threads() == outside and not cpu_plan._region_lock.locked()
                    os._exit(0 if ok else 3)
                statuses.append(wait_or_kill(pid, 10))
            stop.set()

        t = threading.Thread(target=forker)
        t.start()
        while not stop.is_set():
            activation.relu(a); add(a, a)
        t.join()
        emit(statuses=statuses)
    ''', hang_s=60, name="fork_other_thread")
    assert r["statuses"] == [0, 0, 0, 0], r


def test_nested_signal_handlers_run_relu_and_add_inline(tmp_path):
    """A SIGALRM handler running a large add inside the main thread's region, itself interrupted by
    a SIGUSR1 handler running ReLU: both run inline with the whole-array bits, no hang."""
    r = run_child(tmp_path, r'''
        a = np.linspace(-1, 1, 2 * N, dtype=np.float32)
        want_add, want_relu = (a + a).tobytes(), np.maximum(a, 0).tobytes()
        state = {"outer": 0, "inner": 0, "inside": 0, "ok": True, "running": True}

        def inner(signum, frame):
            state["inner"] += 1
            state["ok"] &= activation.relu(a).tobytes() == want_relu

        def outer(signum, frame):
            state["outer"] += 1
            state["inside"] += cpu_plan._region_lock.held_here()
            os.kill(os.getpid(), signal.SIGUSR1)   # runs inside this handler, between bytecodes
            state["ok"] &= add(a, a).tobytes() == want_add
            if state["running"]:
                signal.setitimer(signal.ITIMER_REAL, 0.005)

        signal.signal(signal.SIGUSR1, inner)
        signal.signal(signal.SIGALRM, outer)
        signal.setitimer(signal.ITIMER_REAL, 0.005)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and state["inside"] < 3:
            activation.relu(a)
        state["running"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        emit(**state, lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=30, name="nested_handlers")
    assert r["inside"] >= 1 and r["inner"] >= 1 and r["ok"] and r["lock_free"], r
