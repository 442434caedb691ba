"""The array-level CPU ops (conv2d: gpuconv/ops/conv_cpu.py and conv.py's whole-batch path; batch
norm: norm_cpu.py) inside hostile programs: other threads running parallel regions at the same
time, an interrupt arriving between a region's hand-overs, a fork while another thread is in a
region. Every scenario runs in a child process of its own (a fresh interpreter, one worker:
GPUCONV_CPU_WORKERS=1) under a hard timeout, and prints one JSON line that the test asserts on; a
child that hangs dumps its threads' stacks (faulthandler) and the test fails saying "hang".
"""
import os

import pytest

import hostile_child

PRELUDE = r'''
import faulthandler, json, os, signal, sys, threading, time, zlib
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import blas
from gpuconv.nn import cpu_plan
from gpuconv.ops import conv, conv_cpu, norm_cpu


def arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shape)


def digest(a):
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


def emit(**results):
    print("RESULT " + json.dumps(results), flush=True)


def regions_in_another_thread(x, w):
    """Start a thread that runs conv2d(x, w) (parallel regions) until the returned stop() is called."""
    stop = threading.Event()

    def regions():
        while not stop.is_set():
            gpuconv.ops.conv2d(x, w, padding=1)

    other = threading.Thread(target=regions)
    other.start()

    def stop_and_join():
        stop.set()
        other.join()

    return stop_and_join


def residual_net(seed):
    """The README's residual CNN: conv + BatchNorm + ReLU, a residual conv, average pool, linear.
    At batch 64 on 28x28 its convs take conv_cpu's parts and its batch norm norm_cpu's."""
    from gpuconv import nn, functional as F

    class Net(nn.Module):
        def __init__(self):
            self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.res = nn.Conv2d(16, 16, 3, padding=1)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

        def forward(self, x):
            x = self.conv(x)
            x = F.relu(x + self.res(x))
            return self.fc(self.pool(x).flatten(1))

    net = Net()
    rng = np.random.default_rng(seed)
    for p in net.parameters():  # the same weights for every net of this seed
        p.data[...] = rng.standard_normal(p.data.shape).astype(p.data.dtype) * 0.3
    return net


def batch(seed, n=64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, n)


def step_grads(net, x, y, switch_to_eval=False):
    """One forward and backward -> a digest of every parameter's gradient; switch_to_eval calls
    net.eval() between the forward and the backward."""
    from gpuconv import functional as F
    for p in net.parameters():
        p.grad = None
    loss = F.cross_entropy(net(gpuconv.tensor(x)), y)
    if switch_to_eval:
        net.eval()
    loss.backward()
    return [digest(p.grad) for p in net.parameters()]


def uses_the_split_paths():
    """The residual conv runs in conv_cpu's parts, the batch norm in norm_cpu's."""
    return (conv_cpu.takes((64, 16, 28, 28), (16, 16, 3, 3), 1, (28, 28), 4)
            and 64 * 16 * 28 * 28 * 4 >= norm_cpu.MIN_BYTES)
'''


def run_child(tmp_path, body, hang_s=20, name="child"):
    return hostile_child.run_child(tmp_path, PRELUDE, body, hang_s, name)


def test_conv2d_bits_do_not_depend_on_another_threads_region(tmp_path):
    """A conv that runs in one part (a batch of one image) or in conv.py's whole-batch path (a
    small conv) uses the BLAS as it is; another thread's parallel region sets that BLAS to one
    thread for its length, and OpenBLAS's sums differ in the last bits between thread counts at
    these shapes. So, while another thread ran batch-8 convs, the same conv gave 2-4 different
    results, depending on when it ran (README: "results never depend on timing")."""
    r = run_child(tmp_path, r'''
        one_part = arrays([(1, 64, 64, 64), (64, 64, 3, 3)], seed=1)      # conv_cpu, one part
        small = arrays([(1, 16, 32, 32), (16, 16, 3, 3)], seed=2)         # conv.py's whole batch
        big = arrays([(8, 32, 64, 64), (32, 32, 3, 3)], seed=3)           # conv_cpu, two parts
        assert conv_cpu.takes(one_part[0].shape, one_part[1].shape, 1, (64, 64), 4)
        assert not conv_cpu.takes(small[0].shape, small[1].shape, 1, (32, 32), 4)
        alone = [digest(gpuconv.ops.conv2d(x, w, padding=1)) for x, w in (one_part, small)]
        stop = regions_in_another_thread(*big)
        seen, calls, deadline = [set(), set()], 0, time.monotonic() + 3
        while time.monotonic() < deadline:
            for i, (x, w) in enumerate((one_part, small)):
                seen[i].add(digest(gpuconv.ops.conv2d(x, w, padding=1)))
            calls += 1
        stop()
        emit(alone=alone, seen=[sorted(s) for s in seen], calls=calls)
    ''')
    assert r["calls"] >= 3, r
    for name, alone, seen in zip(("one part", "whole batch"), r["alone"], r["seen"]):
        assert seen == [alone], f"{name}: {len(seen)} different results of the same conv beside another thread's regions"


def test_linear_bits_do_not_depend_on_another_threads_region(tmp_path):
    """linear's products use the BLAS as it is, like the small convs above: a weight gradient with
    a batch of 1000 (a K of 1000) gave other bits while another thread's region had set the BLAS
    to one thread, until linear ran under the regions' lock too."""
    r = run_child(tmp_path, r'''
        x, w, dy = arrays([(1000, 400), (120, 400), (1000, 120)], seed=4)
        with blas.num_threads(1):
            one_thread = digest(gpuconv.ops.linear_backward(dy, x, w)[1])
        alone = digest(gpuconv.ops.linear_backward(dy, x, w)[1])
        stop = regions_in_another_thread(*arrays([(8, 32, 64, 64), (32, 32, 3, 3)], seed=3))
        seen, calls, deadline = set(), 0, time.monotonic() + 3
        while time.monotonic() < deadline:
            seen.add(digest(gpuconv.ops.linear_backward(dy, x, w)[1]))
            seen.add(digest(gpuconv.ops.linear(x, w)))
            calls += 1
        stop()
        emit(alone=alone, forward=digest(gpuconv.ops.linear(x, w)), one_thread=one_thread, seen=sorted(seen),
             calls=calls, blas_threads=blas.get_num_threads())
    ''')
    assert r["calls"] >= 3, r
    assert r["blas_threads"] > 1, "the scenario needs a multi-threaded BLAS"
    assert r["one_thread"] != r["alone"], "this shape no longer tells the BLAS thread counts apart"
    assert r["seen"] == sorted({r["alone"], r["forward"]}), \
        f"{len(r['seen'])} different results of two linear calls beside another thread's regions"


def test_an_interrupt_between_the_hand_overs_leaves_the_next_call_working(tmp_path):
    """Ctrl-C arriving right after the caller handed a part to a worker (before it waits) used to
    leave the region without waiting for that worker; the next call then handed the worker a new
    part while the old one still ran, and the worker, clearing its call after the old part, wiped
    the new one: it died (TypeError unpacking None) and the caller waited for it forever. The
    interrupt is injected with a trace function at the line after the first hand-over, as a
    signal handler raising KeyboardInterrupt would run there."""
    r = run_child(tmp_path, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        x, w = arrays([(2, 64, 128, 128), (64, 64, 3, 3)])   # each part ~0.2 s
        expected = conv.conv2d_forward_numpy(x, w, None, (1, 1), (1, 1), (1, 1), 1)
        small = arrays([(4, 64, 64, 64), (64, 64, 3, 3)], seed=1)
        gpuconv.ops.conv2d(small[0], small[1], padding=1)  # the worker thread exists
        worker = cpu_plan._pools[cpu_plan.OP_THREADS][0]
        state = {"fired": False, "ticket": worker.ticket}

        def local(frame, event, arg):
            if event == "line" and not state["fired"] and worker.ticket > state["ticket"]:
                state["fired"] = True
                raise KeyboardInterrupt
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_name == "_run_parallel" else None

        sys.settrace(tracer)
        try:
            gpuconv.ops.conv2d(x, w, padding=1)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        started = time.monotonic()
        got = gpuconv.ops.conv2d(small[0], small[1], padding=1)   # at once, while the old part may run
        ok_small = bool(np.allclose(got, conv.conv2d_forward_numpy(small[0], small[1], None, (1, 1), (1, 1),
                                                                   (1, 1), 1), rtol=1e-4, atol=1e-3))
        again = gpuconv.ops.conv2d(x, w, padding=1)
        emit(fired=state["fired"], interrupted=interrupted, ok_small=ok_small,
             ok_again=bool(np.allclose(again, expected, rtol=1e-4, atol=1e-3)),
             blas=blas.get_num_threads(), lock_free=not cpu_plan._region_lock.locked())
    ''')
    assert r["fired"] and r["interrupted"], r
    assert r["ok_small"] and r["ok_again"], r
    assert r["lock_free"], r


def test_an_interrupt_inside_a_hand_over_neither_hangs_nor_loses_the_part(tmp_path):
    """Ctrl-C arriving inside _Worker.submit, after the call was counted but before the worker was
    woken: the caller waits for every counted call (a worker left running would write into the
    next step's buffers), and that wait used to last forever, as the worker never woke. The wait
    now wakes the worker itself; the interrupted conv still raises KeyboardInterrupt, and the
    worker runs nothing of it later. The interrupt comes at the wake-up line, as a signal
    handler's exception could."""
    r = run_child(tmp_path, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        x, w = arrays([(4, 32, 64, 64), (32, 32, 3, 3)])
        expected = conv.conv2d_forward_numpy(x, w, None, (1, 1), (1, 1), (1, 1), 1)
        gpuconv.ops.conv2d(x, w, padding=1)  # the worker thread exists
        worker = cpu_plan._pools[cpu_plan.OP_THREADS][0]
        started = time.monotonic()
        fired, interrupted = interrupted_at("submit", "self._wake()", lambda: gpuconv.ops.conv2d(x, w, padding=1))
        seconds = time.monotonic() - started
        ran = worker.last_run == worker.ticket   # the counted call ran before the caller went on
        again = gpuconv.ops.conv2d(x, w, padding=1)
        time.sleep(0.2)                          # a spare wake-up, if any, has been taken
        emit(fired=fired, interrupted=interrupted, seconds=seconds, ran=ran,
             ok_again=bool(np.allclose(again, expected, rtol=1e-4, atol=1e-3)),
             runs_after=worker.last_run == worker.ticket, idle=worker.call is None,
             blas=blas.get_num_threads(), lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=15)
    assert r["fired"] and r["interrupted"], r
    assert r["ran"] and r["seconds"] < 5, r
    assert r["ok_again"] and r["runs_after"] and r["idle"], r
    assert r["lock_free"], r


def test_a_signal_handler_running_ops_inside_its_threads_region_does_not_hang(tmp_path):
    """A signal handler runs on the main thread between bytecodes, also while that thread is inside
    a parallel region (holding the region lock, waiting for its worker). A handler calling ops that
    take regions themselves (a large ReLU, an add, a conv, batch norm) used to wait for the lock
    its own thread held: a hang. They now run inline, in the thread alone; a compiled model, whose
    plan cannot, raises saying why."""
    r = run_child(tmp_path, r'''
        from gpuconv import functional as F, nn
        x, w = arrays([(8, 32, 64, 64), (32, 32, 3, 3)])          # a conv of several regions
        big = arrays([(128, 16, 32, 32)], seed=1)[0]               # 8 MiB: ReLU and add in parts
        expected = (np.maximum(big, 0), big + big, gpuconv.ops.conv2d(big[:4], w[:, :16], padding=1))
        state = {"calls": 0, "in_region": 0, "ok": True, "plan_error": None}
        model = gpuconv.compile(nn.Sequential(nn.Conv2d(16, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Flatten(), nn.Linear(4 * 16 * 16, 3)))

        def handler(signum, frame):
            state["calls"] += 1
            inside = cpu_plan._region_lock.held_here()
            state["in_region"] += inside
            t = gpuconv.tensor(big)
            got = (F.relu(t).data, (t + t).data, gpuconv.ops.conv2d(big[:4], w[:, :16], padding=1))
            state["ok"] &= all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(got, expected))
            gpuconv.ops.batch_norm2d(big, None, None)
            if inside and state["plan_error"] is None:
                try:
                    model(big[:64])
                    state["plan_error"] = "ran"
                except RuntimeError as error:
                    state["plan_error"] = str(error)
            if state["running"]:
                signal.setitimer(signal.ITIMER_REAL, 0.01)  # one at a time: the handler takes longer than 10 ms

        state["running"] = True
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and state["in_region"] < 5:
            gpuconv.ops.conv2d(x, w, padding=1)
        state["running"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        emit(calls=state["calls"], in_region=state["in_region"], ok=state["ok"], plan_error=state["plan_error"],
             lock_free=not cpu_plan._region_lock.locked(), blas=blas.get_num_threads())
    ''', hang_s=60)
    assert r["in_region"] >= 1, r  # the scenario happened: a handler ran inside its thread's region
    assert r["ok"] and r["lock_free"], r
    assert r["plan_error"] is not None and "inside a parallel region" in r["plan_error"], r


def test_a_fork_while_another_thread_is_in_a_region(tmp_path):
    """os.fork() while another thread runs a conv region: the child inherits the region's lock
    held by a thread it does not have, and its own conv2d waited for that lock forever; it also
    kept the region's 1-thread BLAS for good. The child must run conv2d (and batch norm) and have
    the BLAS count the parent has outside regions."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    r = run_child(tmp_path, r'''
        big = arrays([(8, 32, 64, 64), (32, 32, 3, 3)], seed=3)
        x, w = arrays([(8, 16, 64, 64), (16, 16, 3, 3)], seed=4)
        expected = conv.conv2d_forward_numpy(x, w, None, (1, 1), (1, 1), (1, 1), 1)
        outside = blas.get_num_threads()
        stop = regions_in_another_thread(*big)
        while not cpu_plan._region_lock.locked():
            time.sleep(0.0002)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # (no faulthandler here: re-arming its watchdog in a forked child hangs)
            try:
                y = gpuconv.ops.conv2d(x, w, padding=1)
                bn = gpuconv.ops.batch_norm2d(big[0], None, None)[0]
                report = dict(ok=bool(np.allclose(y, expected, rtol=1e-4, atol=1e-3)),
                              bn=bool(np.isfinite(bn).all()), blas=blas.get_num_threads())
            except BaseException as error:
                report = dict(error=repr(error))
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
        os.close(write_end)
        wait_or_kill(pid, 8)  # a child that hung is killed: its report is then "hang"
        stop()
        child = json.loads(os.read(read_end, 1 << 16).decode() or '"hang"')
        emit(child=child, outside=outside, parent_blas=blas.get_num_threads())
    ''')
    assert r["child"] != "hang", "hang: the forked child's conv2d waited for a lock no thread of it holds"
    assert "error" not in r["child"], r["child"]
    assert r["child"]["ok"] and r["child"]["bn"], r
    assert r["child"]["blas"] == r["outside"] == r["parent_blas"], r


def test_training_beside_another_threads_blas_work_gives_the_same_bits(tmp_path):
    """Another thread multiplies matrices with NumPy's BLAS the whole time (its thread count is the
    process's, which every region sets to 1 for its length): the residual net's gradients are the
    same bits as alone, over several batches, and the BLAS count is the program's afterwards."""
    r = run_child(tmp_path, r'''
        assert uses_the_split_paths()
        net = residual_net(1)
        batches = [batch(i) for i in range(3)]
        alone = [step_grads(net, *b) for b in batches]
        before = blas.get_num_threads()
        stop, products = threading.Event(), []

        def blas_work():
            a = np.random.default_rng(9).standard_normal((300, 300))
            while not stop.is_set():
                products.append(float((a @ a)[0, 0]))

        other = threading.Thread(target=blas_work)
        other.start()
        beside = [step_grads(net, *b) for b in batches for _ in range(2)]
        stop.set()
        other.join()
        emit(alone=alone, beside=beside, products=len(products), same_products=len(set(products)) <= 2,
             before=before, after=blas.get_num_threads())
    ''')
    assert r["products"] > 0, r
    for i, grads in enumerate(r["beside"]):
        assert grads == r["alone"][i // 2], f"batch {i // 2}: other gradient bits beside another thread's BLAS work"
    assert r["after"] == r["before"]


def test_two_threads_training_their_own_models_each_get_the_bits_of_training_alone(tmp_path):
    r = run_child(tmp_path, r'''
        from gpuconv import optim, functional as F

        def train(seed, steps=4):
            net = residual_net(seed)
            opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            for i in range(steps):
                x, y = batch(100 * seed + i)
                loss = F.cross_entropy(net(gpuconv.tensor(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return [digest(p.data) for p in net.parameters()]

        alone = [train(1), train(2)]
        results, errors = {}, []

        def run(seed):
            try:
                results[seed] = train(seed)
            except BaseException as error:
                errors.append(repr(error))

        threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        emit(alone=alone, together=[results.get(1), results.get(2)], errors=errors)
    ''', hang_s=60)
    assert not r["errors"], r["errors"]
    assert r["together"] == r["alone"], "a model trained beside another thread's training ended on other weights"


def test_eval_between_forward_and_backward_keeps_the_training_gradient(tmp_path):
    """As in PyTorch, the backward of a forward run in training mode differentiates through the
    batch statistics even if the model was switched to eval() in between."""
    r = run_child(tmp_path, r'''
        x, y = batch(5)
        train_mode = step_grads(residual_net(3), x, y)
        switched = step_grads(residual_net(3), x, y, switch_to_eval=True)
        emit(train_mode=train_mode, switched=switched)
    ''')
    assert r["switched"] == r["train_mode"]


def test_a_pipe_to_a_subprocess_sees_its_eof_beside_the_ops_threads(tmp_path):
    """The ops' worker threads exist (a split conv ran) when the program starts a subprocess and
    closes its end of the pipe: the subprocess sees end-of-file and exits."""
    r = run_child(tmp_path, r'''
        import subprocess
        net = residual_net(4)
        step_grads(net, *batch(0))
        assert any(t.name == "gpuconv-ops" for t in threading.enumerate())
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print(len(sys.stdin.read()))"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        step_grads(net, *batch(1))  # a region while the subprocess waits for its input
        out, _ = proc.communicate("x" * 1000, timeout=10)
        emit(out=out.strip(), rc=proc.returncode)
    ''')
    assert r == {"out": "1000", "rc": 0}


@pytest.mark.parametrize("size", ["whole-array", "norm_cpu"])
def test_batch_norm_refuses_a_weight_of_another_dtype(size):
    """A float64 weight with a float32 x gave a float64 y from the whole-array expressions (arrays
    under norm_cpu.MIN_BYTES) and a float32 y from norm_cpu (larger ones): the output's dtype
    depended on the batch size. conv2d refuses mixed dtypes with a DTypeError; so must batch norm."""
    import numpy as np

    from gpuconv.errors import DTypeError
    from gpuconv.ops import norm, norm_cpu
    n = 2 if size == "whole-array" else norm_cpu.MIN_BYTES // (4 * 4 * 8 * 8) + 1
    x = np.ones((n, 4, 8, 8), np.float32)
    assert norm._on_cpu(x) == (size == "norm_cpu")
    with pytest.raises(DTypeError, match="weight"):
        norm.batch_norm2d(x, np.ones(4), None)
    with pytest.raises(DTypeError, match="bias"):
        norm.batch_norm2d(x, None, np.zeros(4))
    invstd = np.ones(4, np.float32)
    with pytest.raises(DTypeError, match="weight"):
        norm.batch_norm2d_backward(x, x, np.ones(4), np.zeros(4, np.float32), invstd)
