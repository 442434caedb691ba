"""The two batch shapes a new user tries first: an empty batch (N = 0) and a single unbatched image.

Decisions, after PyTorch: an empty batch goes through every layer and op and gives an empty result
of the right shape, forward and backward (BatchNorm in training refuses it, as PyTorch does: there
are no batch statistics). A single (C, H, W) image is refused with a ShapeError that says to add
the batch dimension, for every layer (PyTorch's conv and pool layers would take it, but its Flatten
would then flatten the channels into the batch's place; one rule for all layers is simpler).
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import nn
from gpuconv.errors import ShapeError
from gpuconv.train import evaluate, predict_logits

LAYERS = {
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), (0, 4, 6, 6)),
    "Conv2d padded, strided, dilated": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), (0, 6, 4, 4)),
    "Conv2d grouped": (lambda: nn.Conv2d(3, 3, 3, groups=3, bias=False), (0, 3, 6, 6)),
    "Conv2d same": (lambda: nn.Conv2d(3, 4, 3, padding="same"), (0, 4, 8, 8)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (0, 3, 4, 4)),
    "MaxPool2d overlapping": (lambda: nn.MaxPool2d(3, stride=2, padding=1), (0, 3, 4, 4)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), (0, 3, 4, 4)),
    "LPPool2d": (lambda: nn.LPPool2d(2, 2), (0, 3, 4, 4)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(1), (0, 3, 1, 1)),
    "ReLU": (lambda: nn.ReLU(), (0, 3, 8, 8)),
    "LeakyReLU": (lambda: nn.LeakyReLU(), (0, 3, 8, 8)),
    "Tanh": (lambda: nn.Tanh(), (0, 3, 8, 8)),
    "Sigmoid": (lambda: nn.Sigmoid(), (0, 3, 8, 8)),
    "Identity": (lambda: nn.Identity(), (0, 3, 8, 8)),
    "Dropout": (lambda: nn.Dropout(0.5), (0, 3, 8, 8)),
    "Flatten": (lambda: nn.Flatten(), (0, 192)),
    "BatchNorm2d eval": (lambda: nn.BatchNorm2d(3).eval(), (0, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_batch_through_every_layer_forward_and_backward(name, dtype):
    make, expected = LAYERS[name]
    layer = make()
    for p in layer.parameters():  # float64 parameters for the float64 run
        p.data = p.data.astype(dtype)
    x = gpuconv.tensor(np.zeros((0, 3, 8, 8), dtype), requires_grad=True)
    y = layer(x)
    assert y.shape == expected and y.data.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, 3, 8, 8) and x.grad.dtype == dtype
    for p in layer.parameters():  # no images, no gradient: zeros of the parameter's shape
        assert p.grad is not None and p.grad.shape == p.data.shape and not p.grad.any()


def test_empty_batch_to_linear_and_loss():
    layer = nn.Linear(3, 2)
    x = gpuconv.tensor(np.zeros((0, 3), np.float32), requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert x.grad.shape == (0, 3) and layer.weight.grad.shape == (2, 3)
    # the mean over no samples is NaN, as in PyTorch; the sum is 0
    assert np.isnan(F.cross_entropy(y, np.zeros(0, np.int64)).item())
    assert F.cross_entropy(layer(np.zeros((0, 3), np.float32)), np.zeros(0, np.int64), reduction="sum").item() == 0


def test_batchnorm_in_training_refuses_an_empty_batch_as_pytorch_does():
    with pytest.raises(ShapeError, match="more than one value per channel"):
        nn.BatchNorm2d(3)(np.zeros((0, 3, 8, 8), np.float32))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_through_lenet(compiled, training):
    model = gpuconv.LeNet5(seed=0)
    model.train(training)
    net = gpuconv.compile(model) if compiled else model
    logits = net(np.zeros((0, 1, 28, 28), np.float32))
    assert logits.shape == (0, 10) and logits.data.dtype == np.float32
    if training:
        F.cross_entropy(logits, np.zeros(0, np.int64), reduction="sum").backward()
        assert all(p.grad.shape == p.data.shape and not p.grad.any() for p in model.parameters())
    # and the model still works on a real batch afterwards
    assert net(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)


def test_prediction_of_no_images_is_empty():
    model = gpuconv.LeNet5(seed=0)
    assert predict_logits(model, np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    assert evaluate(model, np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64)) == 0.0


@pytest.mark.parametrize("x_shape, w_shape, which", [((2, 0, 8, 8), (4, 0, 3, 3), "x: expected at least one input"),
                                                     ((2, 3, 8, 8), (0, 3, 3, 3), "weight: expected at least one output")])
def test_conv_without_channels_is_a_shape_error(x_shape, w_shape, which):
    with pytest.raises(ShapeError, match=which):
        gpuconv.ops.conv2d(np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32))


UNBATCHED = {
    "Conv2d": nn.Conv2d(3, 4, 3), "MaxPool2d": nn.MaxPool2d(2), "AvgPool2d": nn.AvgPool2d(2),
    "LPPool2d": nn.LPPool2d(2, 2), "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(1), "BatchNorm2d": nn.BatchNorm2d(3),
}


@pytest.mark.parametrize("name", sorted(UNBATCHED))
def test_a_single_image_is_refused_with_the_fix(name):
    with pytest.raises(ShapeError, match=r"got shape \(3, 8, 8\); a single sample needs a batch dimension: x\[None\]"):
        UNBATCHED[name](np.zeros((3, 8, 8), np.float32))
    assert UNBATCHED[name](np.zeros((3, 8, 8), np.float32)[None]).shape[0] == 1  # the fix works


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_single_digit_through_lenet_is_refused_with_the_fix(compiled):
    model = gpuconv.LeNet5(seed=0)
    net = gpuconv.compile(model) if compiled else model
    with pytest.raises(ShapeError, match=r"x\[None\]"):
        net(np.zeros((1, 28, 28), np.float32))


def test_a_single_feature_vector_is_refused_with_the_fix():
    with pytest.raises(ShapeError, match=r"got shape \(3,\); a single sample needs a batch dimension"):
        nn.Linear(3, 2)(np.zeros(3, np.float32))


def test_other_wrong_ranks_get_no_batch_hint():
    with pytest.raises(ShapeError) as info:
        nn.Conv2d(3, 4, 3)(np.zeros((8, 8), np.float32))
    assert "x[None]" not in str(info.value)
