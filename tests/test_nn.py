"""Layers, Sequential, LeNet-5: textbook parameter counts, summary, gradients, state_dict, devices."""
import numpy as np
import pytest

import gpuconv
from gpuconv import nn
from gpuconv.errors import ArgumentError, CheckpointError, CudaUnavailableError, DeviceMismatchError
from gpuconv.gradcheck import assert_allclose_grad, numerical_grad
from gpuconv.models import LeNet5


# ----- textbook counts -----
def test_conv_parameter_count_5x5_from_3_to_10_channels_is_760():
    assert nn.Conv2d(3, 10, 5).num_parameters() == 10 * (3 * 5 * 5) + 10 == 760


def test_shared_weights_20_maps_of_5x5_on_28x28_cost_520_against_23550_dense():
    conv = nn.Conv2d(1, 20, 5)
    dense = nn.Linear(784, 30)
    assert conv.num_parameters() == 520
    assert dense.num_parameters() == 23_550
    # weight sharing: the conv's count does not depend on the image size
    assert conv.output_shape((1, 1, 28, 28)) == (1, 20, 24, 24)
    assert conv.output_shape((1, 1, 280, 280)) == (1, 20, 276, 276)


def test_lenet5_layer_shapes_parameters_and_flops():
    info = LeNet5().summary((1, 1, 28, 28), print_fn=None)
    shapes = {row["name"]: row["output_shape"][1:] for row in info["layers"]}
    assert shapes["conv1"] == (6, 28, 28) and shapes["pool1"] == (6, 14, 14)
    assert shapes["conv2"] == (16, 10, 10) and shapes["pool2"] == (16, 5, 5)
    assert shapes["flatten"] == (400,) and shapes["fc3"] == (10,)
    params = {row["name"]: row["params"] for row in info["layers"]}
    assert params == {**params, "conv1": 156, "conv2": 2416, "fc1": 48120, "fc2": 10164, "fc3": 850}
    assert info["total_params"] == 61_706
    # conv2: 16 maps x 10x10 positions x (6*5*5 multiply-adds x 2 + bias)
    flops = {row["name"]: row["flops"] for row in info["layers"]}
    assert flops["conv2"] == 16 * 100 * (2 * 150 + 1)
    assert "total" in info["text"] and "61,706" in info["text"]


def test_summary_shapes_match_a_real_forward_pass(rng):
    model = LeNet5(activation="tanh", pool="avg")
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    for name, layer in model.named_children():
        expected = layer.output_shape(x.shape)
        x = layer(x)
        assert x.shape == expected, name


# ----- gradients of every layer, float64 central differences -----
def module_gradcheck(module, x, rng, rtol=1e-5, atol=1e-7):
    inputs = gpuconv.tensor(x, requires_grad=True)
    y = module(inputs)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    dx = inputs.grad
    analytic = {name: p.grad.copy() for name, p in module.named_parameters()}

    def loss_for_input(value):
        return module(value).data

    assert_allclose_grad("input", dx, numerical_grad(loss_for_input, x, dy=dy), rtol, atol)
    for name, p in module.named_parameters():
        original = p.data

        def loss_for_param(value, p=p):
            p.data = value
            out = module(x).data
            p.data = original
            return out

        assert_allclose_grad(name, analytic[name], numerical_grad(loss_for_param, original, dy=dy), rtol, atol)


LAYERS = [
    pytest.param(lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, dtype=np.float64), (2, 2, 7, 6), id="conv-s2-p1"),
    pytest.param(lambda: nn.Conv2d(4, 4, (3, 2), dilation=2, groups=2, dtype=np.float64), (2, 4, 8, 7), id="conv-d2-g2"),
    pytest.param(lambda: nn.Conv2d(2, 3, 4, padding="same", dtype=np.float64), (1, 2, 6, 5), id="conv-same-even"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, stride=3, bias=False, dtype=np.float64), (2, 2, 9, 8), id="conv-s3-nobias"),
    pytest.param(lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6), id="maxpool-overlap"),
    pytest.param(lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 3, 7, 6), id="avgpool"),
    pytest.param(lambda: nn.LPPool2d(2, 2), (2, 3, 6, 6), id="l2pool"),
    pytest.param(lambda: nn.Linear(7, 5, dtype=np.float64), (3, 7), id="linear"),
    pytest.param(lambda: nn.Tanh(), (3, 4), id="tanh"),
    pytest.param(lambda: nn.Sigmoid(), (3, 4), id="sigmoid"),
    pytest.param(lambda: nn.ReLU(), (3, 4), id="relu"),
    pytest.param(lambda: nn.Flatten(), (2, 3, 2, 2), id="flatten"),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_layer_gradients_match_central_differences(make, shape, rng):
    x = rng.standard_normal(shape) + 0.05  # keep ReLU/max away from exact kinks
    if "LPPool" in repr(make()):
        x = np.abs(x) + 0.1
    module_gradcheck(make(), x, rng)


def test_lenet5_end_to_end_gradients_float64(rng):
    model = LeNet5(activation="tanh", pool="avg", dtype=np.float64)
    x = gpuconv.tensor(rng.random((2, 1, 28, 28)), requires_grad=True)
    y = model(x)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    assert x.grad.shape == x.shape and x.grad.dtype == np.float64
    for name in ("conv1.weight", "conv2.bias", "fc1.weight"):
        p = dict(model.named_parameters())[name]
        index = (0,) * p.data.ndim
        original = p.data[index]
        eps = 1e-6
        p.data[index] = original + eps
        plus = float((model(x).data * dy).sum())
        p.data[index] = original - eps
        minus = float((model(x).data * dy).sum())
        p.data[index] = original
        assert p.grad[index] == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8), name


def test_first_layer_skips_its_input_gradient(rng, monkeypatch):
    """An input that does not require grad gets none, and the first conv's backward is not asked
    for its data gradient at all; one that requires grad gets it."""
    asked = []
    conv2d_backward = gpuconv.ops.conv2d_backward

    def spy(dy, x, w, **kwargs):
        asked.append(kwargs["need_dx"])
        return conv2d_backward(dy, x, w, **kwargs)

    monkeypatch.setattr(gpuconv.ops, "conv2d_backward", spy)
    model = LeNet5()
    image = rng.random((2, 1, 28, 28), dtype=np.float32)
    for requires_grad in (False, True):
        asked.clear()
        x = gpuconv.tensor(image, requires_grad=requires_grad)
        y = model(x)
        y.backward(np.ones_like(y.data))
        assert asked == [True, requires_grad]  # conv2 first, then conv1
        assert (x.grad is None) if not requires_grad else (x.grad.shape == (2, 1, 28, 28))


# ----- state, modes, devices -----
def test_state_dict_round_trip_and_same_init_for_same_seed():
    a, b, c = LeNet5(seed=3), LeNet5(seed=3), LeNet5(seed=4)
    for (name, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        np.testing.assert_array_equal(va, vb)
        if name.endswith("weight"):
            assert not np.array_equal(va, vc)
    c.load_state_dict(a.state_dict())
    for va, vc in zip(a.state_dict().values(), c.state_dict().values()):
        np.testing.assert_array_equal(va, vc)


def test_load_state_dict_names_missing_and_mismatched_parameters():
    model = LeNet5()
    state = model.state_dict()
    del state["fc3.bias"]
    with pytest.raises(CheckpointError, match="fc3.bias"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["conv2.weight"] = np.zeros((16, 6, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"conv2\.weight.*\(16, 6, 5, 5\).*\(16, 6, 3, 3\)"):
        model.load_state_dict(state)
    with pytest.raises(CheckpointError, match="unexpected"):
        nn.Sequential(nn.Linear(3, 2)).load_state_dict(state)


def test_train_eval_switch_dropout():
    model = nn.Sequential(nn.Dropout(0.5, seed=1))
    x = np.ones((4, 100), np.float32)
    assert not np.array_equal(model(x).data, x)
    model.eval()
    assert not model[0].training
    np.testing.assert_array_equal(model(x).data, x)


def test_to_cpu_is_a_no_op_and_cuda_says_why_it_is_unavailable():
    model = LeNet5().to("cpu")
    assert model.device == "cpu"
    if not gpuconv.cuda_available():
        with pytest.raises(CudaUnavailableError, match="CUDA is unavailable"):
            model.to("cuda")
        assert gpuconv.parse_device("auto") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", 3, "cuda:-1"])
def test_bad_device_strings_are_rejected(bad):
    with pytest.raises((ArgumentError, CudaUnavailableError)):
        gpuconv.parse_device(bad)


@pytest.mark.gpu
def test_numpy_input_into_a_model_on_cuda_names_both_devices():
    model = LeNet5().to("cuda")
    with pytest.raises(DeviceMismatchError, match="cpu.*cuda"):
        model(np.zeros((1, 1, 28, 28), np.float32))


@pytest.mark.gpu
def test_cupy_input_into_a_model_on_the_cpu_names_both_devices():
    import cupy
    with pytest.raises(DeviceMismatchError, match="cuda:0.*cpu"):
        LeNet5()(cupy.zeros((1, 1, 28, 28), cupy.float32))


def test_model_split_across_devices_is_reported(monkeypatch):
    model = LeNet5()
    monkeypatch.setattr(gpuconv.nn.module, "device_of", lambda a: "cuda:0" if a.ndim == 4 else "cpu")
    with pytest.raises(DeviceMismatchError, match="several devices"):
        model.device


def test_layer_constructor_errors_name_the_argument():
    with pytest.raises(ArgumentError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ArgumentError, match="kernel_size"):
        nn.Conv2d(3, 4, 0)
    with pytest.raises(ArgumentError, match="in_features"):
        nn.Linear(0, 3)
    with pytest.raises(ArgumentError, match="activation"):
        LeNet5(activation="gelu")
    with pytest.raises(ArgumentError, match="Dropout p"):
        nn.Dropout(1.0)


def test_im2col_memory_cost_is_one_receptive_field_per_output_position():
    conv2 = LeNet5().conv2
    # 6 channels x 5x5 taps for each of the 10x10 output positions: 15,000 floats, 4x the input
    assert conv2.im2col_elements((1, 16, 10, 10)) == 6 * 25 * 100
    assert "im2col KiB" in LeNet5().summary((1, 1, 28, 28), print_fn=None)["text"]
