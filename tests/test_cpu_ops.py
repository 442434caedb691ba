"""ConvOp's two row-path products (gpuconv.nn.cpu_ops): one GEMM per output row, or, with few
filters, one per pooling window's rows with a banded weight. Both against the eager model."""
import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import nn
from gpuconv.compiler import PlanFunction


def gradients(network, model, x, labels):
    """Logits, input gradient and every p.grad of one step of `network` (compiled or eager)."""
    model.zero_grad()
    inputs = gpuconv.tensor(x, requires_grad=True)
    logits = network(inputs)
    F.cross_entropy(logits, labels).backward()
    return isinstance(logits.creator, PlanFunction), [logits.data, inputs.grad] + [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("filters,banded", [(3, True), (9, False)])
@pytest.mark.parametrize("conv,pool", [
    (dict(kernel_size=3, padding=1), 2),
    (dict(kernel_size=(3, 2)), 3),
    (dict(kernel_size=4, padding=(2, 1)), (2, 3)),
    (dict(kernel_size=3, stride=2), 2),
    (dict(kernel_size=3, stride=(1, 2), bias=False), (3, 2)),
], ids=["pool2", "pool3", "pool2x3", "stride2", "pool3x2-nobias"])
def test_fused_conv_products_match_the_layers(filters, banded, conv, pool, rng):
    model = nn.Sequential(nn.Conv2d(2, filters, rng=rng, **conv), nn.ReLU(), nn.MaxPool2d(pool),
                          nn.Conv2d(filters, 3, 2, rng=rng), nn.Flatten())
    x = rng.standard_normal((5, 2, 15, 14)).astype(np.float32)
    x[:, :, :3] = 0  # pooling ties
    width = model.layer_table(x.shape)[-1][2][1]
    model.add("fc", nn.Linear(width, 3, rng=rng))
    labels = rng.integers(0, 3, 5)
    compiled = gpuconv.compile(model)
    planned, fast = gradients(compiled, model, x, labels)
    assert planned and compiled._plan.ops[0].banded == banded
    planned, slow = gradients(model, model, x, labels)
    assert not planned
    assert len(fast) == len(slow) == 2 + len(model.parameters())
    for actual, expected in zip(fast, slow):
        assert actual.shape == expected.shape
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
