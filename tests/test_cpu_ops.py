"""ConvOp's two row-path products (gpuconv.nn.cpu_ops): one GEMM per output row, or, with few
filters, one per pooling window's rows with a banded weight. Both against the layers."""
import numpy as np
import pytest

from gpuconv import ops as F
from gpuconv import nn
from gpuconv.nn import cpu_plan


def gradients(model, x, labels, fast):
    model.use_fast_cpu(fast)
    logits = model(x)
    _, dlogits = F.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits, need_dx=True)
    return [logits, dx] + [p.grad.copy() for p in model.parameters()]


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
    fast = gradients(model, x, labels, True)
    assert cpu_plan._plans[model].active and cpu_plan._plans[model].ops[0].banded == banded
    slow = gradients(model, x, labels, False)
    for actual, expected in zip(fast, slow):
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
