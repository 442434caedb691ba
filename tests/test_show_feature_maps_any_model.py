"""show.feature_maps on models that are not chains of their children: a forward of its own with
functional ops between the layers, a top-level Residual, a layer called twice. The maps are what
the named layers computed inside the model's own forward; the probabilities are the model's.
Before, feature_maps fed each child's output to the next child (session 11's "noticed"): such a
model raised a ShapeError, or its maps were not what its forward computes."""
import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import nn, show
from gpuconv.autograd import no_grad
from gpuconv.errors import ArgumentError


class OwnForward(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> global pool -> linear, the relus and pools functional."""

    feature_layers = {"first conv": "conv1", "second conv": "conv2"}

    def __init__(self):
        rng = np.random.default_rng(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6, 10)
        for p in self.parameters():
            p.data[...] = rng.standard_normal(p.data.shape).astype(np.float32) * 0.3

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(F.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def image():
    return np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)


def model_input(model):
    return gpuconv.tensor(show._model_input(image()[None], None))


def test_a_forward_of_its_own_gives_its_layers_outputs():
    model = OwnForward().eval()
    maps, probabilities = show.feature_maps(model, image())
    x = model_input(model)
    with no_grad():
        first = model.conv1(x)
        second = model.conv2(F.max_pool2d(F.relu(first), 2))
    np.testing.assert_array_equal(maps["first conv"], first.data[0])
    np.testing.assert_array_equal(maps["second conv"], second.data[0])
    assert list(maps) == ["first conv", "second conv"]
    np.testing.assert_allclose(probabilities, show.predict(model, image()[None])[0], rtol=1e-6)


def test_a_top_level_residual_by_dotted_names():
    body = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1))
    model = nn.Residual(body, activation=nn.ReLU())
    model.feature_layers = {"body's first conv": "body.0", "after the add": "activation"}
    maps, _ = show.feature_maps(model, image())
    x = model_input(model)
    with no_grad():
        first = body[0](x).data[0]
        out = model(x).data[0]
    np.testing.assert_array_equal(maps["body's first conv"], first)
    np.testing.assert_array_equal(maps["after the add"], out)


def test_a_layer_called_twice_gives_its_last_output():
    class Twice(nn.Module):
        feature_layers = {"shared": "conv"}

        def __init__(self):
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return F.flatten(self.conv(F.relu(self.conv(x))), 1)

    model = Twice()
    maps, _ = show.feature_maps(model, image())
    x = model_input(model)
    with no_grad():
        last = model.conv(F.relu(model.conv(x))).data[0]
    np.testing.assert_array_equal(maps["shared"], last)


def test_unknown_or_idle_layer_names_are_clear_errors():
    model = OwnForward()
    model.feature_layers = {"a": "conv1", "b": "conv9"}
    with pytest.raises(ArgumentError, match="no layer named 'conv9'.*named_modules"):
        show.feature_maps(model, image())
    model.idle = nn.ReLU()
    model.feature_layers = {"a": "conv1", "b": "idle"}
    with pytest.raises(ArgumentError, match="'idle' of OwnForward did not run"):
        show.feature_maps(model, image())


def test_the_layers_forward_is_theirs_again_even_after_an_error():
    model = OwnForward()
    own = lambda x: nn.Conv2d.forward(model.conv2, x)  # noqa: E731 (an instance forward the user set)
    model.conv2.forward = own
    show.feature_maps(model, image())
    assert "forward" not in model.conv1.__dict__
    assert model.conv2.__dict__["forward"] is own

    def broken(x):
        raise RuntimeError("the user's forward failed")
    model.fc.forward = broken
    with pytest.raises(RuntimeError, match="the user's forward failed"):
        show.feature_maps(model, image())
    assert "forward" not in model.conv1.__dict__
    assert model.conv2.__dict__["forward"] is own
