"""CUDA kernels on a real GPU against the NumPy path, and their determinism. Skipped without a GPU
(see conftest.py); the same kernels are exercised on the CPU by the emulator tests."""
import numpy as np
import pytest

import gpuconv
from gpuconv.ops import conv, pool

pytestmark = pytest.mark.gpu

# N, C, H, W, K, kernel, stride, padding, dilation, groups
CONV_CASES = [
    (4, 1, 28, 28, 6, (5, 5), (1, 1), (2, 2), (1, 1), 1),      # LeNet conv1: direct under auto
    (4, 6, 14, 14, 16, (5, 5), (1, 1), (0, 0), (1, 1), 1),     # LeNet conv2: im2col under auto
    (2, 3, 9, 11, 5, (3, 2), (2, 1), (1, 0), (1, 2), 1),       # everything asymmetric
    (2, 8, 10, 10, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),      # depthwise
    (3, 6, 7, 8, 9, (3, 3), (2, 2), (2, 2), (2, 2), 3),        # groups + dilation + stride
    (1, 70, 6, 6, 33, (1, 1), (1, 1), (0, 0), (1, 1), 1),      # many channels, 1x1
    (130, 2, 5, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),      # batch larger than one tile row
]
POOL_CASES = [  # shape, kernel, stride, padding
    ((4, 6, 28, 28), (2, 2), (2, 2), (0, 0)),
    ((2, 3, 9, 10), (3, 3), (2, 2), (1, 1)),                   # overlapping, padded
    ((2, 2, 7, 7), (3, 2), (1, 1), (1, 1)),                    # stride 1: heavy overlap
    ((1, 1, 33, 17), (4, 4), (3, 2), (2, 2)),
]


def _tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


def _to_gpu(*arrays):
    import cupy
    return [None if a is None else cupy.asarray(a) for a in arrays]


def _host(array):
    import cupy
    return cupy.asnumpy(array)


def _on_gpu(array):
    return gpuconv.backend.is_cupy_array(array)


@pytest.mark.parametrize("algo", ["auto", "direct", "im2col"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d_matches_numpy(case, algo, dtype, rng):
    n, c, h, w, k, kernel, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups) + kernel).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    y_ref = conv.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    grads_ref = conv.conv2d_backward(dy, x, weight, stride, padding, dilation, groups)

    x_d, w_d, b_d, dy_d = _to_gpu(x, weight, bias, dy)
    y = conv.conv2d(x_d, w_d, b_d, stride, padding, dilation, groups, algo=algo)
    grads = conv.conv2d_backward(dy_d, x_d, w_d, stride, padding, dilation, groups, algo=algo)
    assert _on_gpu(y) and y.dtype == dtype
    np.testing.assert_allclose(_host(y), y_ref, **_tolerance(dtype))
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(_host(got), want, **_tolerance(dtype))


def test_conv2d_same_padding_even_kernel(dtype, rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
    weight = rng.standard_normal((4, 3, 4, 4)).astype(dtype)
    y_ref = conv.conv2d(x, weight, padding="same")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref, dw_ref, _ = conv.conv2d_backward(dy, x, weight, padding="same")
    x_d, w_d, dy_d = _to_gpu(x, weight, dy)
    np.testing.assert_allclose(_host(conv.conv2d(x_d, w_d, padding="same")), y_ref, **_tolerance(dtype))
    dx, dw, _ = conv.conv2d_backward(dy_d, x_d, w_d, padding="same")
    np.testing.assert_allclose(_host(dx), dx_ref, **_tolerance(dtype))
    np.testing.assert_allclose(_host(dw), dw_ref, **_tolerance(dtype))


def test_im2col_batch_chunks_match_one_chunk(monkeypatch, rng):
    from gpuconv.ops import conv_cuda
    x, weight, dy = _to_gpu(rng.standard_normal((5, 8, 6, 6)), rng.standard_normal((16, 8, 3, 3)),
                            rng.standard_normal((5, 16, 4, 4)))
    whole = conv.conv2d_backward(dy, x, weight, algo="im2col")
    monkeypatch.setattr(conv_cuda, "COLUMN_BUDGET_BYTES", 8 * 9 * 16 * 8 * 2)  # 2 samples a chunk
    chunked = conv.conv2d_backward(dy, x, weight, algo="im2col")
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(_host(a), _host(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["max", "avg", "avg_exclude_pad", "lp"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_pool2d_matches_numpy(case, mode, dtype, rng):
    shape, kernel, stride, padding = case
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[1::7] = flat[0:-1:7][:flat[1::7].size]  # ties: max must pick the first
    if mode == "max":
        forward = lambda a: pool.max_pool2d(a, kernel, stride, padding)  # noqa: E731
        backward = lambda g, a: pool.max_pool2d_backward(g, a, kernel, stride, padding)  # noqa: E731
    elif mode.startswith("avg"):
        include = mode == "avg"
        forward = lambda a: pool.avg_pool2d(a, kernel, stride, padding, include)  # noqa: E731
        backward = lambda g, a: pool.avg_pool2d_backward(g, a, kernel, stride, padding, include)  # noqa: E731
    else:
        forward = lambda a: pool.lp_pool2d(a, 2.0, kernel, stride)  # noqa: E731
        backward = lambda g, a: pool.lp_pool2d_backward(g, a, 2.0, kernel, stride)  # noqa: E731
    y_ref = forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = backward(dy, x)
    x_d, dy_d = _to_gpu(x, dy)
    np.testing.assert_allclose(_host(forward(x_d)), y_ref, **_tolerance(dtype))
    np.testing.assert_allclose(_host(backward(dy_d, x_d)), dx_ref, **_tolerance(dtype))


def test_max_pool_nan_propagates_to_output_and_gradient():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 1, 2] = np.nan
    dy = np.ones((1, 1, 3, 3), dtype=np.float32)
    y_ref = pool.max_pool2d(x, 2, 1)
    dx_ref = pool.max_pool2d_backward(dy, x, 2, 1)
    x_d, dy_d = _to_gpu(x, dy)
    np.testing.assert_array_equal(_host(pool.max_pool2d(x_d, 2, 1)), y_ref)
    np.testing.assert_array_equal(_host(pool.max_pool2d_backward(dy_d, x_d, 2, 1)), dx_ref)


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_gradients_are_bit_identical_run_to_run(algo, rng):
    x, weight, dy = _to_gpu(rng.standard_normal((64, 6, 14, 14)).astype(np.float32),
                            rng.standard_normal((16, 6, 5, 5)).astype(np.float32),
                            rng.standard_normal((64, 16, 10, 10)).astype(np.float32))
    first = conv.conv2d_backward(dy, x, weight, algo=algo)
    second = conv.conv2d_backward(dy, x, weight, algo=algo)
    for a, b in zip(first, second):
        assert _host(a).tobytes() == _host(b).tobytes()
    pooled = pool.max_pool2d(x, 3, 2, 1)
    g = rng.standard_normal(pooled.shape).astype(np.float32)
    g = _to_gpu(g)[0]
    assert (_host(pool.max_pool2d_backward(g, x, 3, 2, 1)).tobytes()
            == _host(pool.max_pool2d_backward(g, x, 3, 2, 1)).tobytes())


def test_kernels_compile_through_rawmodule_for_this_gpu():
    from gpuconv.cuda import runtime as compiler
    for source, kernels in compiler.KERNELS.items():
        for name in kernels:
            for dtype in ("float32", "float64"):
                assert compiler.get_kernel(source, name, dtype) is not None


def test_out_of_memory_names_the_op_and_suggests_a_smaller_batch(monkeypatch):
    import cupy
    from gpuconv.errors import GpuOutOfMemoryError

    def no_memory(*args, **kwargs):
        raise cupy.cuda.memory.OutOfMemoryError(1 << 40, 0)

    x, weight = _to_gpu(np.ones((2, 1, 8, 8), np.float32), np.ones((4, 1, 3, 3), np.float32))
    monkeypatch.setattr(cupy, "empty", no_memory)
    with pytest.raises(GpuOutOfMemoryError, match=r"conv2d.*x=\(2, 1, 8, 8\).*smaller batch"):
        conv.conv2d(x, weight, algo="direct")


def test_a_training_step_on_the_last_gpu_stays_there():
    """cuda:N for the highest N this machine has (cuda:0 on a one-GPU machine): parameters,
    gradients, optimizer state and the loss live on that device, and the step matches the CPU."""
    import cupy
    from gpuconv import functional as F, optim
    from gpuconv.models import LeNet5
    device = f"cuda:{cupy.cuda.runtime.getDeviceCount() - 1}"
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 16)
    results = {}
    for where in ("cpu", device):
        model = LeNet5(seed=0).to(where)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(model(gpuconv.to_device(x, where)), gpuconv.to_device(y, where))
        opt.zero_grad()
        loss.backward()
        opt.step()
        results[where] = (loss, model, opt)
    loss, model, opt = results[device]
    assert gpuconv.backend.device_of(loss.data) == device
    assert {gpuconv.backend.device_of(p.data) for p in model.parameters()} == {device}
    assert {gpuconv.backend.device_of(v) for v in opt.state["velocity"] if v is not None} == {device}
    assert loss.item() == pytest.approx(results["cpu"][0].item(), rel=1e-4)
    for (name, a), b in zip(results["cpu"][1].state_dict().items(), model.state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5, err_msg=name)


def test_kernels_are_cached_across_launches():
    from gpuconv.cuda import runtime
    x, w = _to_gpu(np.ones((2, 1, 8, 8), np.float32), np.ones((4, 1, 3, 3), np.float32))
    conv.conv2d(x, w, algo="direct")
    kernel = runtime.get_kernel("conv2d.cu", "conv2d_forward_direct", np.float32)
    conv.conv2d(x, w, algo="direct")
    assert runtime.get_kernel("conv2d.cu", "conv2d_forward_direct", np.float32) is kernel


@pytest.mark.parametrize("model_name", ["lenet5", "simplecnn"])
def test_a_captured_cuda_graph_step_replays_the_eager_steps(model_name):
    """gpuconv.cuda.graph on a GPU: record, capture (CUDA stream capture with the step's pool as CuPy's
    allocator), then replays; every step's loss and the final weights and buffers match the eager run."""
    import cupy
    from gpuconv import functional as F, optim
    from gpuconv.cuda.graph import StaticStep
    from gpuconv.models import build_model
    shape = (16, 1, 28, 28) if model_name == "lenet5" else (8, 3, 32, 32)
    rng = np.random.default_rng(0)
    batches = [(cupy.asarray(rng.random(shape, dtype=np.float32)), cupy.asarray(rng.integers(0, 10, shape[0])))
               for _ in range(6)]
    results = []
    for graph in (False, True):
        model = build_model(model_name, shape[1], 10, shape[2], seed=0).to("cuda")
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        logged = []
        step = StaticStep(lambda x, y: (lambda lg: (F.cross_entropy(lg, y), lg))(model(x)), optimizer, model,
                          log=logged.append)
        losses = []
        for index, (x, y) in enumerate(batches):
            optimizer.lr = 0.05 / (1 + index)  # the replay reads the lr of its step
            losses.append(float(cupy.asnumpy((step if graph else step.eager)(x, y)[0])))  # read before the next
        state = {k: cupy.asnumpy(v) for k, v in model.state_dict().items()}
        results.append((losses, state))
        if graph:
            assert logged == [] and step.replays == 4, logged
    (eager_losses, eager_state), (graph_losses, graph_state) = results
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-6)
    for key, value in eager_state.items():
        np.testing.assert_allclose(graph_state[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
