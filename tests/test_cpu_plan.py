"""The fast CPU path (gpuconv.nn.cpu_plan) against the layer-by-layer reference.

Every test runs the same model twice, once by the plan and once by the layers
(use_fast_cpu(False)), and compares logits, every p.grad and the input gradient, with the
batch's parts after the first run in worker threads and in worker processes (cpu_procs).
"""
import numpy as np
import pytest

from gpuconv import blas, nn
from gpuconv import ops as F
from gpuconv import optim
from gpuconv.errors import DTypeError, ShapeError
from gpuconv.models import LeNet5
from gpuconv.nn import cpu_plan, cpu_procs

LENETS = [("relu", "max"), ("tanh", "avg")]


def mnist_like(rng, batch):
    """Images with an all-zero border, as MNIST's: conv outputs tie there (pooling ties)."""
    x = np.zeros((batch, 1, 28, 28), np.float32)
    x[:, :, 6:22, 5:23] = rng.random((batch, 1, 16, 18), dtype=np.float32)
    return x, rng.integers(0, 10, batch)


def run(model, x, labels, fast, need_dx=False):
    model.use_fast_cpu(fast)
    logits = model(x)
    _, dlogits = F.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits, need_dx=need_dx)
    return logits, {name: p.grad.copy() for name, p in model.named_parameters()}, dx


def assert_close(actual, expected, rtol=1e-5):
    """rtol of the largest magnitude: entries near zero cancel in sums, elementwise rtol is noise."""
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_same_run(model, x, labels, need_dx=False):
    fast = run(model, x, labels, True, need_dx)
    slow = run(model, x, labels, False, need_dx)
    assert_close(fast[0], slow[0])
    assert fast[1].keys() == slow[1].keys()
    for name in slow[1]:
        assert fast[1][name].shape == slow[1][name].shape and fast[1][name].dtype == np.float32, name
        assert_close(fast[1][name], slow[1][name])
    if need_dx:
        assert_close(fast[2], slow[2])
    else:
        assert fast[2] is None and slow[2] is None
    return fast


def planned(model, x=None):
    """Did the last forward (or one on x by the plan, if given) run by the plan?"""
    if x is not None:
        model.use_fast_cpu(True)
        model(x)
    plan = cpu_plan._plans.get(model)
    if plan is not None and plan.active:  # and the parts after the first ran where they should
        assert (plan.workers is not None) == (cpu_plan.processes and cpu_procs.supported() and plan.threads > 1)
    return plan is not None and plan.active


@pytest.fixture(autouse=True, params=[False, True], ids=["threads", "processes"])
def processes(request, monkeypatch):
    """Every test runs with the parts after the first in worker threads and in worker processes."""
    monkeypatch.setattr(cpu_plan, "processes", request.param)
    return request.param


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def threads(request, monkeypatch):
    """The plan splits the batch over BLAS-thread-many Python threads; test 1, 2 and 3 parts
    whatever this machine has."""
    monkeypatch.setattr(blas, "get_num_threads", lambda: request.param)
    monkeypatch.setattr(blas, "available", lambda: True)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    return request.param


@pytest.mark.parametrize("activation,pool", LENETS)
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_lenet_matches_the_layers(activation, pool, batch, threads, rng):
    model = LeNet5(activation, pool, seed=batch)
    x, labels = mnist_like(rng, batch)
    assert_same_run(model, x, labels, need_dx=batch == 7)
    assert planned(model, x)


@pytest.mark.parametrize("activation,pool", LENETS)
def test_lenet_against_float64_reference(activation, pool, rng):
    """The plan's float32 gradients are as close to float64 as the float32 layers' are."""
    model = LeNet5(activation, pool, seed=1)
    reference = LeNet5(activation, pool, dtype=np.float64).load_state_dict(model.state_dict())
    x, labels = mnist_like(rng, 64)
    _, exact, exact_dx = run(reference, x.astype(np.float64), labels, True, need_dx=True)
    assert not planned(reference)  # float64 always runs the layers
    _, fast, fast_dx = run(model, x, labels, True, need_dx=True)
    _, slow, _ = run(model, x, labels, False)
    for name in exact:
        scale = np.abs(exact[name]).max()
        fast_error = np.abs(fast[name] - exact[name]).max() / scale
        slow_error = np.abs(slow[name] - exact[name]).max() / scale
        assert fast_error < 1e-5, name
        assert fast_error < 4 * slow_error + 1e-6, name
    assert np.abs(fast_dx - exact_dx).max() / np.abs(exact_dx).max() < 1e-5


def test_other_layer_settings_match(rng, threads):
    """Stride, padding, dilation, no bias, unfused conv, sigmoid, standalone pools, dropout in eval."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding="same", dilation=2, bias=False, rng=rng), nn.Sigmoid(),
        nn.AvgPool2d(2), nn.Conv2d(5, 6, 1, rng=rng), nn.ReLU(),
        nn.Conv2d(6, 4, 2, padding=1, rng=rng), nn.MaxPool2d(3), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(4, 7, rng=rng), nn.ReLU(), nn.Linear(7, 3, bias=False, rng=rng))
    model.eval()
    x = rng.standard_normal((9, 3, 23, 21)).astype(np.float32)
    x[:, :, :4] = 0  # ties in every pool
    assert_same_run(model, x, rng.integers(0, 3, 9), need_dx=True)
    assert planned(model, x)


@pytest.mark.parametrize("head", [
    lambda rng: [nn.Conv2d(1, 3, (3, 5), padding=(1, 2), rng=rng), nn.ReLU()],
    lambda rng: [nn.Conv2d(1, 3, (3, 5), padding=(2, 1), rng=rng), nn.MaxPool2d(3)],
    lambda rng: [nn.Conv2d(1, 3, 4, rng=rng), nn.ReLU(), nn.MaxPool2d((2, 3))],
    lambda rng: [nn.Conv2d(1, 3, 3, stride=2, rng=rng), nn.ReLU(), nn.MaxPool2d(2)],
], ids=["no-pool", "pool3", "pool2x3", "stride2"])
def test_single_channel_convs_match(head, rng, threads):
    """A one-channel conv with stride 1 runs without im2col (batched GEMMs over output rows)."""
    layers = head(rng)
    model = nn.Sequential(*layers, nn.Conv2d(3, 2, 2, rng=rng), nn.Flatten())
    x = rng.standard_normal((6, 1, 13, 14)).astype(np.float32)
    x[:, :, :3] = 0
    width = model.layer_table(x.shape)[-1][2][1]
    model.add("fc", nn.Linear(width, 3, rng=rng))
    assert_same_run(model, x, rng.integers(0, 3, 6), need_dx=True)
    assert planned(model, x)


@pytest.mark.parametrize("tail", [[], [nn.ReLU(), nn.MaxPool2d(2)], [nn.AvgPool2d(2)]],
                         ids=["conv", "conv-relu-pool", "conv-avgpool"])
def test_spatial_output_is_nchw(tail, rng, threads):
    """A model that ends in a spatial layer returns NCHW and takes an NCHW output gradient."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), *tail)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    dy = None
    results = []
    for fast in (True, False):
        model.use_fast_cpu(fast)
        y = model(x)
        dy = rng.standard_normal(y.shape).astype(np.float32) if dy is None else dy
        dx = model.backward(dy, need_dx=True)
        results.append((y, dx, model[0].weight.grad.copy(), model[0].bias.grad.copy()))
    for fast_value, slow_value in zip(*results):
        assert fast_value.shape == slow_value.shape
        assert_close(fast_value, slow_value)
    assert planned(model, x)


@pytest.mark.parametrize("tail", [[], [nn.Flatten()], [nn.Flatten(), nn.Dropout(0.0)]],
                         ids=["pool", "flatten", "flatten-identity"])
@pytest.mark.parametrize("batch", [1, 50])
def test_output_gradient_is_never_written(tail, batch, rng):
    """Ops may reuse an output gradient the plan made in place; the caller's is only read (with
    one image, its batch-innermost view is contiguous like the plan's own)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), *tail)
    x = rng.standard_normal((batch, 1, 12, 12)).astype(np.float32)
    y = model(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    kept = dy.copy()
    model.backward(dy, need_dx=True)
    np.testing.assert_array_equal(dy, kept)
    assert planned(model, x)


def test_dense_only_model(rng, threads):
    model = nn.Sequential(nn.Linear(10, 8, rng=rng), nn.ReLU(), nn.Linear(8, 4, rng=rng))
    x = rng.standard_normal((12, 10)).astype(np.float32)
    assert_same_run(model, x, rng.integers(0, 4, 12), need_dx=True)
    assert planned(model, x)


@pytest.mark.parametrize("make", [
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.LPPool2d(2, 2), nn.Flatten(),
                              nn.Linear(2 * 13 * 13, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, rng=rng), nn.MaxPool2d(3, stride=2),
                              nn.Flatten(), nn.Linear(2 * 12 * 12, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.Flatten(), nn.Dropout(0.5),
                              nn.Linear(2 * 26 * 26, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 2, padding="same", rng=rng), nn.Flatten(),
                              nn.Linear(2 * 28 * 28, 3, rng=rng)),
], ids=["lppool", "overlapping-pool", "dropout-training", "asymmetric-same"])
def test_unsupported_layers_fall_back_to_the_layers(make, rng):
    model = make(rng)
    x, labels = mnist_like(rng, 4)
    labels %= 3
    _, grads, _ = run(model, x, labels, True)
    assert not planned(model)
    assert model[0]._x is x  # the layers ran, forward and backward
    assert all(grads[name].shape == p.shape for name, p in model.named_parameters())


def test_switches_off(rng):
    model = LeNet5()
    x, labels = mnist_like(rng, 4)
    model.use_fast_cpu(False)
    model(x)
    assert not planned(model)
    model.use_fast_cpu(True)
    model(x)
    assert planned(model)
    cpu_plan.enabled = False
    try:
        model(x)
        assert not planned(model) and model.conv1._x is x
    finally:
        cpu_plan.enabled = True


def test_changing_batch_sizes_reuses_and_reallocates(rng, threads):
    model = LeNet5(seed=2)
    for batch in (32, 7, 32, 33, 1, 32):
        x, labels = mnist_like(rng, batch)
        assert_same_run(model, x, labels)


@pytest.mark.parametrize("max_chunk", [3, 5])
def test_small_chunks_within_a_thread(max_chunk, rng, monkeypatch):
    """Each thread runs its share in chunks; the gradients of all chunks add up."""
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", max_chunk)
    model = LeNet5(seed=3)
    for batch in (17, 4):
        x, labels = mnist_like(rng, batch)
        assert_same_run(model, x, labels, need_dx=True)


def test_backward_order_changes_no_number(rng, monkeypatch):
    """Every other thread computes the conv weight gradients after all the input gradients (the
    dense layers' wait in every thread). Either order must give the same bits: run one thread
    both ways."""
    monkeypatch.setattr(blas, "get_num_threads", lambda: 1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, dilation=2, rng=rng), nn.Tanh(),  # im2col path
                          nn.Conv2d(5, 6, 3, stride=2, rng=rng),  # rows path, stride 2
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 12, rng=rng), nn.ReLU(), nn.Linear(12, 10, rng=rng))
    x, labels = mnist_like(rng, 9)
    runs = []
    for deferring in (False, True):
        run(model, x, labels, True)
        cpu_plan._plans[model].deferring = [deferring]
        runs.append(run(model, x, labels, True, need_dx=True))
    (logits, grads, dx), (logits2, grads2, dx2) = runs
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(dx, dx2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads2[name])
    assert_same_run(model, x, labels, need_dx=True)


def test_gradients_are_new_arrays_every_step(rng):
    model = LeNet5()
    x1, y1 = mnist_like(rng, 16)
    x2, y2 = mnist_like(rng, 16)
    _, first, _ = run(model, x1, y1, True)
    kept = {name: p.grad for name, p in model.named_parameters()}
    run(model, x2, y2, True)
    for name, p in model.named_parameters():
        assert p.grad is not kept[name]
        assert p.grad.flags.c_contiguous and p.grad.shape == p.data.shape, name
        np.testing.assert_array_equal(kept[name], first[name])  # step 2 did not write into step 1's


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_twice_after_one_forward(rng, mode):
    """The pooling backward overwrites the conv output it routes from, so which taps hold the
    maximum is kept first: by the forward in training mode, by the first backward in eval mode.
    Biases are not zero, so an output written over the maxima would give other flags."""
    model = LeNet5()
    for conv in (model.conv1, model.conv2):
        conv.bias.data[:] = rng.uniform(-0.5, 0.5, conv.bias.data.shape)
    getattr(model, mode)()
    x, labels = mnist_like(rng, 8)
    logits = model(x)
    _, dlogits = F.softmax_cross_entropy(logits, labels)
    first = model.backward(dlogits, need_dx=True)
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    second = model.backward(dlogits, need_dx=True)
    np.testing.assert_array_equal(first, second)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, grads[name])
    _, reference, reference_dx = run(model, x, labels, False, need_dx=True)
    assert_close(first, reference_dx)
    for name in grads:
        assert_close(grads[name], reference[name])


def test_sgd_training_follows_the_layers(rng):
    fast, slow = LeNet5(seed=5), LeNet5(seed=5).use_fast_cpu(False)
    optimizers = [optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fast, slow)]
    for _ in range(5):
        x, labels = mnist_like(rng, 32)
        for model, optimizer in zip((fast, slow), optimizers):
            _, dlogits = F.softmax_cross_entropy(model(x), labels)
            model.backward(dlogits, need_dx=False)
            optimizer.step()
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert_close(a, b, rtol=1e-4)


def test_non_finite_input_runs_the_layers(rng):
    model = LeNet5()
    x, labels = mnist_like(rng, 4)
    x[1, 0, 10, 10] = np.nan
    logits = model(x)
    assert not planned(model) and np.isnan(logits[1]).all()
    _, dlogits = F.softmax_cross_entropy(np.nan_to_num(logits), labels)
    model.backward(dlogits, need_dx=False)  # the layers' backward, which holds their NaN rules
    assert model.conv1.weight.grad.shape == (6, 1, 5, 5)


def test_bad_output_gradient_is_rejected(rng):
    model = LeNet5()
    x, _ = mnist_like(rng, 4)
    model(x)
    with pytest.raises(ShapeError, match="dy"):
        model.backward(np.ones((3, 10), np.float32))
    with pytest.raises(DTypeError, match="dy"):
        model.backward(np.ones((4, 10), np.float64))


def test_blas_thread_control_restores_the_count():
    if not blas.available():
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set")
    before = blas.get_num_threads()
    with blas.num_threads(1):
        assert blas.get_num_threads() == 1
    assert blas.get_num_threads() == before


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_parallel_region_raises_a_part_error_after_every_part_ran(failing):
    """The caller's part or a worker's part may raise: the error reaches the caller once every
    part has finished, and the workers run the next region normally."""
    ran = []

    def work(part):
        ran.append(part)
        if part == failing:
            raise ValueError(f"part {part}")
        return part * 10

    with pytest.raises(ValueError, match=f"part {failing}"):
        cpu_plan._run_parallel(work, [0, 1, 2])
    assert sorted(ran) == [0, 1, 2]
    assert cpu_plan._run_parallel(lambda part: part * 10, [0, 1, 2]) == [0, 10, 20]


def test_switch_interval_is_restored(rng):
    import sys
    before = sys.getswitchinterval()
    model = LeNet5()
    x, labels = mnist_like(rng, 64)
    run(model, x, labels, True)
    assert sys.getswitchinterval() == before


def test_worker_never_returns_a_result_left_by_an_abandoned_wait():
    import time
    worker = cpu_plan._Worker()
    worker.submit(lambda part: part, 1)  # its result is never collected (an interrupted wait)
    time.sleep(0.05)
    worker.submit(lambda part: part, 2)
    assert worker.result() == 2


def test_worker_threads_where_processes_are_not_supported(rng, monkeypatch):
    """Off Linux x86-64 (cpu_procs.supported() False) the plan runs worker threads, processes on or not."""
    monkeypatch.setattr(blas, "get_num_threads", lambda: 2)
    monkeypatch.setattr(blas, "available", lambda: True)
    monkeypatch.setattr(cpu_plan, "processes", True)
    monkeypatch.setattr(cpu_procs, "supported", lambda: False)
    model = LeNet5(seed=5)
    x, labels = mnist_like(rng, 60)
    assert_same_run(model, x, labels, need_dx=True)
    assert planned(model, x) and cpu_plan._plans[model].workers is None
