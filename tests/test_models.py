"""gpuconv.models: the zoo's shapes, parameter counts (He et al. 2016's table), the option-A shortcut,
a float64 gradient check of a residual block, and the summary command."""
import argparse

import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv.errors import ArgumentError
from gpuconv.gradcheck import numerical_grad
from gpuconv.cli import MAX_WIDTH, parse_widths
from gpuconv.models import (MODELS, BasicBlock, LeNet5, ResNet, ShortcutAFunction, SimpleCNN, build_model,
                            resnet20)
from gpuconv.summary_cli import main as summary_main


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_model_gives_logits_for_grey_and_colour_input(name, channels, size):
    model = build_model(name, channels, 10, size)
    x = np.random.default_rng(0).random((2, channels, size, size), dtype=np.float32)
    with gpuconv.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    assert np.isfinite(logits.numpy()).all()
    # the layer table's shapes come from each layer's own rule; they must end where forward ends
    assert model.layer_table((1, channels, size, size))[-1][2] == (1, 10)


def test_resnet_parameter_counts_match_the_paper():
    """He et al. 2016, table 6: ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M parameters
    (option A shortcuts carry none)."""
    for depth, millions in ((20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)):
        assert round(ResNet(depth).num_parameters() / 1e6, 2 if depth < 110 else 1) == millions
    assert resnet20().num_parameters() == 269_722
    assert LeNet5().num_parameters() == 61_706
    assert SimpleCNN().num_parameters() == 241_770
    assert SimpleCNN(widths=(32, 64)).num_parameters() == 421_738


def test_resnet_structure_and_state_dict_names():
    model = ResNet(8)
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer2.0.conv1.weight" in keys and "layer3.0.bn2.running_var" in keys and keys[-1] == "fc.bias"
    assert model.layer2[0].shortcut is not None and model.layer1[0].shortcut is None
    assert model.layer2[0].conv1.stride == (2, 2)


@pytest.mark.parametrize("depth", [0, 7, 9, 21, True, "20"])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ArgumentError, match="6n \\+ 2"):
        ResNet(depth)


def test_bad_model_arguments():
    with pytest.raises(ArgumentError, match="model: expected one of"):
        build_model("vgg16")
    with pytest.raises(ArgumentError, match="widths"):
        SimpleCNN(widths=())
    with pytest.raises(ArgumentError, match="leave nothing"):
        SimpleCNN(image_size=2, widths=(8, 8))


def test_shortcut_a_subsamples_and_zero_pads_channels():
    x = np.arange(2 * 4 * 5 * 5, dtype=np.float64).reshape(2, 4, 5, 5)
    out = ShortcutAFunction(8, 2).forward(x)
    assert out.shape == (2, 8, 3, 3)
    np.testing.assert_array_equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()


def test_simplecnn_pool_before_relu_is_conv_bn_relu_pool():
    """Max pooling and ReLU commute, so the blocks compute exactly conv-BN-ReLU-pool."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 8, 8))
    a = F.relu(F.max_pool2d(gpuconv.tensor(x), 2)).numpy()
    b = F.max_pool2d(F.relu(gpuconv.tensor(x)), 2).numpy()
    np.testing.assert_array_equal(a, b)


def _cast(module, dtype):
    for p in module.parameters():
        p.data = p.data.astype(dtype)
    for _, owner, name in list(module.named_buffers()):
        if owner._buffers[name].dtype.kind == "f":
            owner._buffers[name] = owner._buffers[name].astype(dtype)
    return module


def test_basic_block_with_shortcut_a_gradcheck_float64():
    """The whole residual block (two convs, two BatchNorms in training mode, the option-A shortcut,
    the add and the ReLUs) against central differences, for the input and a conv weight."""
    rng = np.random.default_rng(0)
    block = _cast(BasicBlock(2, 4, stride=2, rng=rng, dtype=np.float64), np.float64)
    x0 = rng.standard_normal((3, 2, 4, 4))
    dy = rng.standard_normal((3, 4, 2, 2))

    def loss_of(x):
        return float((block(gpuconv.tensor(x)).numpy() * dy).sum())

    x = gpuconv.tensor(x0, requires_grad=True)
    out = block(x)
    (out * gpuconv.tensor(dy)).sum().backward()
    np.testing.assert_allclose(x.grad, numerical_grad(lambda a: loss_of(a), x0), rtol=1e-5, atol=1e-7)

    weight = block.conv1.weight
    analytic = weight.grad.copy()
    original = weight.data.copy()

    def loss_of_weight(w):
        weight.data = w
        try:
            return loss_of(x0)
        finally:
            weight.data = original
    np.testing.assert_allclose(analytic, numerical_grad(loss_of_weight, original), rtol=1e-5, atol=1e-7)


def test_summary_command_prints_resnet20_block_by_block(capsys):
    assert summary_main(["--model", "resnet20", "--dataset", "cifar10"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0: BasicBlock" in text and "layer3.2: BasicBlock" in text
    assert "(64, 8, 8)" in text and "269,722" in text and "input (1, 3, 32, 32)" in text
    assert summary_main([]) == 0
    assert "61,706" in capsys.readouterr().out  # the default is still LeNet-5 on 1x28x28


def test_summary_command_takes_simplecnn_widths(capsys):
    assert summary_main(["--model", "simplecnn", "--dataset", "fashion-mnist", "--widths", "48,96,192"]) == 0
    text = capsys.readouterr().out
    expected = SimpleCNN(1, 10, 28, widths=(48, 96, 192)).num_parameters()
    assert f"{expected:,}" in text and "(192, 3, 3)" in text
    with pytest.raises(ArgumentError, match="--widths: sets SimpleCNN's block widths, and --model is resnet8"):
        summary_main(["--model", "resnet8", "--widths", "8"])


def test_simplecnn_dropout_before_the_classifier_drops_in_training_only():
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    plain, dropped = SimpleCNN(seed=3), SimpleCNN(seed=3, dropout=0.5)
    assert dropped.num_parameters() == plain.num_parameters()
    assert list(dropped.state_dict()) == list(plain.state_dict())  # a checkpoint loads either way
    names = [name for name, _ in dropped.named_children()]
    assert names[-2:] == ["drop", "fc"] and "drop" not in [name for name, _ in plain.named_children()]
    plain.eval(), dropped.eval()
    np.testing.assert_array_equal(dropped(x).data, plain(x).data)  # eval: the identity
    plain.train(), dropped.train()
    assert not np.allclose(dropped(x).data, plain(x).data)
    with pytest.raises(ArgumentError, match=r"SimpleCNN dropout: expected a number in \[0, 1\), got 1.0"):
        SimpleCNN(dropout=1.0)


@pytest.mark.parametrize("text", ["100000000", "32,99999999999999999999", "3_2", "\u0663\u0662", "32,6\u00b9"])
def test_widths_option_refuses_huge_and_non_ascii_numbers_with_a_clear_error(text):
    # 100000000 was a NumPy MemoryError traceback (18 TiB for fc1); 3_2 became one block of 32 and
    # Arabic-Indic digits were read as 32, both silently, as Python's int() reads them
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected 1 to 4 positive ints up to 4096.*got {text!r}"):
        parse_widths(text)
    assert parse_widths(" 48, 96 ,192") == (48, 96, 192) and parse_widths(str(MAX_WIDTH)) == (MAX_WIDTH,)


@pytest.mark.parametrize("dropout", ["0.5", None, [0.5], True, -0.1, float("nan")])
def test_simplecnn_dropout_of_the_wrong_type_or_range_names_the_argument(dropout):
    with pytest.raises(ArgumentError, match=f"SimpleCNN dropout: expected a number in \\[0, 1\\), got "):
        SimpleCNN(dropout=dropout)
    assert SimpleCNN(dropout=np.float32(0.25)).fc_dropout == pytest.approx(0.25)
