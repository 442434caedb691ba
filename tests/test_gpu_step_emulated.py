"""Issue 17 (performance on a GPU, shown without one): the step's kernels under emulation. Max
pooling saves its argmax indices and the backward reads them; grid-stride loops count in 64 bits;
filter and bias gradients are two-pass deterministic reductions; the optimizer is one fused launch
over a flat parameter buffer, and its step after the first allocates nothing and reads nothing back
(the whole training step still allocates its activations and gradients from CuPy's pool)."""
import re

import numpy as np
import pytest

from gpuconv import functional as F
from gpuconv import ops
from gpuconv.autograd import Tensor
from gpuconv.backend import to_device
from gpuconv.cuda import emulated_devices, emulation
from gpuconv.cuda import runtime
from gpuconv.errors import ArgumentError


def _launches(events):
    return [e.what.split("<")[0] for e in events if e.kind == "launch"]


def test_max_pool_backward_reads_the_saved_indices_not_x():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    with emulation():
        y, indices = ops.max_pool2d(x, 2, 2, return_indices=True)
        assert indices.dtype == np.int32 and indices.shape == y.shape
        planes = x.reshape(6, -1)
        np.testing.assert_array_equal(np.take_along_axis(planes, indices.reshape(6, -1), 1).reshape(y.shape), y)
        # indices that name every window's bottom-right pixel, and an x full of NaN: the gradient
        # follows the indices, so the backward never looked at x
        oh, ow = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
        corner = np.broadcast_to(((2 * oh + 1) * 6 + 2 * ow + 1).astype(np.int32), y.shape).copy()
        dx = ops.max_pool2d_backward(dy, np.full_like(x, np.nan), 2, 2, indices=corner)
    expected = np.zeros_like(x)
    expected[:, :, 1::2, 1::2] = dy
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_indices_match_the_numpy_rule_with_ties_overlap_and_padding():
    x = np.zeros((1, 2, 5, 5), np.float32)  # all ties: the first of each window wins
    x[0, 1, 2, 2] = np.nan
    expected = ops.max_pool2d(x, 3, 2, 1, return_indices=True)[1]
    with emulation():
        got = ops.max_pool2d(x, 3, 2, 1, return_indices=True)[1]
    np.testing.assert_array_equal(got, expected)


def test_a_max_pool_backward_on_the_device_is_one_launch_without_the_forward():
    rng = np.random.default_rng(1)
    with emulation(devices=1):
        x = Tensor(to_device(rng.standard_normal((2, 3, 6, 6)).astype(np.float32), "cuda:0"), requires_grad=True)
        y = F.max_pool2d(x, 2)
        with emulated_devices.recording() as events:
            y.sum().backward()
    launches = [name for name in _launches(events) if "pool" in name]
    assert launches == ["max_pool2d_backward"], launches


def test_pool_refuses_an_output_plane_past_the_kernels_32_bit_range():
    from gpuconv.ops import pool_cuda
    # H*W fits an int, OH*OW (one more row and column with padding 1, kernel 2, stride 1) does not
    with pytest.raises(ArgumentError, match=r"OH\*OW = 2147534622"):
        pool_cuda._sizes((1, 1, 46340, 46341), (2, 2), (1, 1), (1, 1))
    assert pool_cuda._sizes((1, 1, 46340, 46340), (2, 2), (2, 2), (0, 0))[3:] == (23170, 23170)


_FOR = re.compile(r"for\s*\(\s*([A-Za-z_][\w ]*?)\s+(\w+)\s*=[^;]*;[^;]*;((?:[^()]|\([^()]*\))*)\)")


def grid_stride_counters(source):
    """(type, name) of every loop in a kernel source whose step involves gridDim, macros included."""
    text = runtime.read_source(source) if source.endswith(".cu") else source
    text = re.sub(r"//[^\n]*", "", text).replace("\\\n", " ")
    return [(kind.strip(), name) for kind, name, step in _FOR.findall(text) if "gridDim" in step]


@pytest.mark.parametrize("source", sorted(runtime.KERNELS))
def test_every_grid_stride_loop_counts_in_64_bits(source):
    """counter + gridDim*blockDim passes 2^31 once a count passes 2^30, although the count itself
    fits an int: an int counter wraps negative and the loop runs on (or reads out of bounds)."""
    counters = grid_stride_counters(source)
    assert counters, f"{source}: no grid-stride loop found; the pattern no longer matches the source"
    narrow = [c for c in counters if c[0] != "long long"]
    assert not narrow, f"{source}: grid-stride loops with a 32-bit counter: {narrow}"


def test_the_counter_check_sees_an_int_counter():
    bad = ("for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < P; p += (int)blockDim.x * gridDim.x) {}\n"
           "#define EACH(i) for (unsigned i = threadIdx.x; i < n; \\\n i += blockDim.x * gridDim.x)")
    assert grid_stride_counters(bad) == [("int", "p"), ("unsigned", "i")]


def _conv_gradients(x, w, dy, padding, algo, order="forward"):
    with emulation(order=order, seed=3):
        _, dw, db = ops.conv2d_backward(dy, x, w, padding=padding, algo=algo, need_dx=False)
    return dw, db


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_filter_and_bias_gradients_are_two_pass_and_bit_identical_in_every_order(algo):
    """LeNet's conv1 at batch 4: 3136 products per sum, split over several slices (pass 1 writes a
    workspace of slices x (weights + biases), pass 2 adds each column in slice order); every run and
    every thread order gives the same bits, and NumPy's values to float32 rounding."""
    from gpuconv.ops import conv_cuda
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    w = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 6, 28, 28)).astype(np.float32)
    with emulation(devices=1), emulated_devices.recording() as events:
        _conv_gradients(to_device(x, "cuda:0"), to_device(w, "cuda:0"), to_device(dy, "cuda:0"), 2, algo)
    partial = [e for e in events if e.kind == "alloc" and "partial" in e.what]
    slices = conv_cuda._slices(4 * 28 * 28, 6 * 2 if algo == "direct" else 6)
    assert slices > 1 and len(partial) == 1
    assert partial[0].nbytes == slices * ((6 * 25 + 6) if algo == "direct" else 6) * 4
    names = _launches(events)
    assert names.count("reduce_slices") == 1 and not any(n.startswith("atomic") for n in names)
    runs = [_conv_gradients(x, w, dy, 2, algo, order) for order in ("forward", "reverse", "random", "random")]
    for dw, db in runs[1:]:
        assert dw.tobytes() == runs[0][0].tobytes() and db.tobytes() == runs[0][1].tobytes()
    _, dw_ref, db_ref = ops.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                            padding=2, need_dx=False)
    np.testing.assert_allclose(runs[0][0], dw_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(runs[0][1], db_ref, rtol=1e-4, atol=1e-3)


def test_conv_refuses_weights_and_biases_past_the_reductions_32_bit_count():
    from gpuconv.ops import conv_cuda
    # K*C*KH*KW = 2^31 - 1 fits an int; with the bias the reduction's element count does not
    with pytest.raises(ArgumentError, match=r"K\*C/groups\*KH\*KW \+ K = 2147483648"):
        conv_cuda._Geometry((1, 2**31 - 1, 1, 1), (1, 2**31 - 1, 1, 1), (1, 1), (0, 0), (1, 1), 1)


def test_slices_depend_on_the_shape_alone_and_stay_in_the_grid():
    from gpuconv.ops import conv_cuda
    assert conv_cuda._slices(100, 12) == 1  # fewer items than one block's threads
    assert conv_cuda._slices(128 * 784, 12) == -(-conv_cuda.REDUCTION_BLOCKS // 12)
    assert conv_cuda._slices(10**12, 1) <= 65535


# ----- the fused optimizer over a flat parameter buffer -----

def _model_and_grads(seed=0):
    from gpuconv.models import LeNet5
    model = LeNet5(seed=seed)
    rng = np.random.default_rng(seed + 1)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in model.parameters()] for _ in range(3)]
    return model, grads


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-3, weight_decay=1e-4)),
])
def test_the_fused_step_matches_the_numpy_optimizer(name, kwargs):
    from gpuconv import optim
    cpu_model, grads = _model_and_grads()
    cpu = getattr(optim, name)(cpu_model.parameters(), **kwargs)
    for step_grads in grads:
        for p, g in zip(cpu_model.parameters(), step_grads):
            p.grad = g.copy()
        cpu.step()
        cpu.lr *= 0.5  # a schedule between steps: the device reads the new lr
    with emulation(devices=1):
        gpu_model, _ = _model_and_grads()
        gpu_model.to("cuda:0")
        gpu = getattr(optim, name)(gpu_model.parameters(), **kwargs)
        with emulated_devices.recording() as events:
            for step_grads in grads:
                for p, g in zip(gpu_model.parameters(), step_grads):
                    p.grad = to_device(g, "cuda:0")
                gpu.step()
                gpu.lr *= 0.5
        launches = _launches(events)
        assert launches == [f"{name.lower()}_update"] * 3, launches
        flat = gpu.flat.data
        assert all(np.shares_memory(p.data, flat) for p in gpu_model.parameters())
        state = gpu.state_dict()
    for p_cpu, p_gpu in zip(cpu_model.parameters(), gpu_model.parameters()):
        np.testing.assert_allclose(np.asarray(p_gpu.data), p_cpu.data, rtol=1e-6, atol=1e-7)
    assert sorted(state) == sorted(cpu.state_dict())  # no state the settings do not use (SGD without momentum)
    for key, value in cpu.state_dict().items():
        np.testing.assert_allclose(state[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                          ("Adam", dict(lr=0.01))])
def test_the_fused_step_leaves_non_finite_values_as_the_numpy_optimizer_does(name, kwargs):
    """An inf weight or gradient goes through the unused terms' flags: without weight decay the
    kernel must not add 0 * w (0 * inf is NaN), without momentum it must not compute g * 0 + g."""
    from gpuconv import optim
    from gpuconv.nn import Parameter
    start = np.array([1.0, np.inf, -np.inf, 2.0], np.float32)
    grad = np.array([np.inf, 0.5, 0.25, -np.inf], np.float32)

    def run(emulated):
        p = Parameter(to_device(start, "cuda:0") if emulated else start.copy(), "p")
        opt = getattr(optim, name)([p], **kwargs)
        for _ in range(2):
            p.grad = to_device(grad, "cuda:0") if emulated else grad.copy()
            opt.step()
        assert (opt.flat is not None) == emulated  # the fused kernel ran on the device
        return np.asarray(p.data)

    with np.errstate(invalid="ignore"):
        expected = run(False)
        with emulation(devices=1):
            got = run(True)
    np.testing.assert_array_equal(got, expected)  # NaN where NaN, inf where inf


def test_the_flat_buffers_follow_a_replaced_parameter_and_a_missing_gradient_falls_back():
    from gpuconv import optim
    with emulation(devices=1):
        model, grads = _model_and_grads()
        model.to("cuda:0")
        params = list(model.parameters())
        opt = optim.SGD(params, lr=0.1, momentum=0.9)
        for p, g in zip(params, grads[0]):
            p.grad = to_device(g, "cuda:0")
        opt.step()
        first_flat = opt.flat
        # load_state_dict replaces .data: the next step packs again, with the loaded values
        state = {k: np.asarray(v) + 1 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        for p, g in zip(params, grads[1]):
            p.grad = to_device(g, "cuda:0")
        expected = [np.asarray(p.data) - np.float32(0.1) * (0.9 * np.asarray(v) + g)
                    for p, v, g in zip(params, first_flat.state_views["velocity"], grads[1])]
        opt.step()
        assert opt.flat is not first_flat
        for p, want in zip(params, expected):
            np.testing.assert_allclose(np.asarray(p.data), want, rtol=1e-6, atol=1e-6)
        # a parameter without a gradient is skipped, as PyTorch does: the step goes parameter by parameter
        before = np.asarray(params[0].data).copy()
        for p, g in zip(params, grads[2]):
            p.grad = to_device(g, "cuda:0")
        params[0].grad = None
        with emulated_devices.recording() as events:
            opt.step()
        assert "sgd_update" not in _launches(events)
        np.testing.assert_array_equal(np.asarray(params[0].data), before)


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
                                          ("Adam", dict(lr=1e-3))])
def test_the_fused_step_after_the_first_allocates_nothing(name, kwargs):
    """The first step packs the flat buffers; later steps copy the hyperparameters into the existing
    device array and launch: no device allocation, no host read."""
    from gpuconv import optim
    with emulation(devices=1):
        model, grads = _model_and_grads()
        model.to("cuda:0")
        opt = getattr(optim, name)(model.parameters(), **kwargs)
        for step, step_grads in enumerate(grads):
            for p, g in zip(model.parameters(), step_grads):
                if step == 0:
                    p.grad = to_device(g, "cuda:0")
                else:  # what backward does once the buffers exist: writes into the gradient's view
                    p.grad[...] = to_device(g, "cuda:0")
            with emulated_devices.recording() as events:
                opt.step()
            opt.lr *= 0.5
            kinds = [e.kind for e in events]
            assert kinds.count("launch") == 1, kinds
            if step == 0:
                assert kinds.count("alloc") > 0  # the packing
            else:  # the hyperparameters' host-to-device write and the launch, nothing else
                assert sorted(kinds) == ["launch", "write"], events
                assert [e.nbytes for e in events if e.kind == "write"] == [8 * 4]


def test_backward_writes_gradients_into_the_flat_buffer():
    from gpuconv import optim
    from gpuconv.models import LeNet5
    rng = np.random.default_rng(2)
    with emulation(devices=1):
        model = LeNet5(seed=0).to("cuda:0")
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = to_device(rng.random((2, 1, 28, 28), dtype=np.float32), "cuda:0")
        y = to_device(np.array([1, 2]), "cuda:0")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert all(p.grad is view for p, view in zip(model.parameters(), opt.flat.grad_views))


# ----- fused bias + ReLU epilogues -----

def _output_and_grads(forward, arrays, dy):
    """forward(*tensors) on copies of arrays, backward(dy) -> [output, grad of each input]."""
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    y = forward(*tensors)
    y.backward(dy)
    return [np.asarray(y.data)] + [np.asarray(t.grad) for t in tensors]


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_conv_with_a_relu_epilogue_matches_conv_then_relu_forward_and_backward(algo):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 9, 9))
    w = rng.standard_normal((16, 4, 5, 5))
    b = rng.standard_normal(16)
    dy = rng.standard_normal((3, 16, 5, 5))
    x[0, 0, 0, :5] = np.nan  # NaN stays NaN through ReLU, as np.maximum does

    expected = _output_and_grads(lambda xt, wt, bt: F.relu(F.conv2d(xt, wt, bt, algo=algo)), (x, w, b), dy)
    with emulation():
        got = _output_and_grads(lambda xt, wt, bt: F.conv2d(xt, wt, bt, algo=algo, activation="relu"),
                                (x, w, b), dy)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_linear_with_a_relu_epilogue_matches_linear_then_relu():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((6, 20)), rng.standard_normal((7, 20)), rng.standard_normal(7)
    dy = rng.standard_normal((6, 7))

    expected = _output_and_grads(lambda xt, wt, bt: F.relu(F.linear(xt, wt, bt)), (x, w, b), dy)
    with emulation():
        got = _output_and_grads(lambda xt, wt, bt: F.linear(xt, wt, bt, activation="relu"), (x, w, b), dy)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ArgumentError, match="activation: expected None or 'relu', got 'tanh'"):
        ops.linear(x, w, b, activation="tanh")


def test_the_relu_epilogue_gives_numpys_positive_zero_for_a_negative_zero():
    """np.maximum(-0.0, 0) is +0.0 (the CPU path); the epilogue's `v < 0` kept -0.0 (y + b is -0.0
    when both are -0.0), so the sign of a zero depended on the device. Now `v <= 0` (NaN stays NaN)."""
    from gpuconv.ops import elementwise_cuda
    y = np.array([[-0.0, 0.0, -0.0, np.nan], [1.0, -0.0, -2.0, 3.0]])
    b = np.array([-0.0, -0.0, 0.0, 1.0])
    expected = np.maximum(y + b, 0)
    assert np.signbit(y + b)[0, 0] and not np.signbit(expected).any()
    with emulation():
        got = np.array(elementwise_cuda.bias_act(y.copy(), b, 1, 1))
    np.testing.assert_array_equal(got, expected)  # NaN where NaN
    assert not np.signbit(got[~np.isnan(got)]).any(), got


def test_a_lenet_forward_on_the_device_runs_no_separate_relu_or_bias_add():
    from gpuconv.models import LeNet5
    images = np.random.default_rng(6).random((2, 1, 28, 28), dtype=np.float32)
    with emulation(devices=1):
        model = LeNet5(seed=0).to("cuda:0")
        x = to_device(images, "cuda:0")
        with emulated_devices.recording() as events:
            y = model(x)
    ops_run = [e.what for e in events if e.kind == "op"]
    assert "maximum" not in ops_run and "add" not in ops_run, ops_run
    assert _launches(events).count("bias_act") == 3  # fc1, fc2 (with ReLU) and fc3
    np.testing.assert_allclose(np.asarray(y.data), LeNet5(seed=0)(images).data, rtol=1e-5, atol=1e-6)
