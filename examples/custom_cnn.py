"""A custom residual CNN with BatchNorm, defined with forward() only and trained for one epoch on MNIST.

    python examples/custom_cnn.py                      # one epoch, 60,000 images
    python examples/custom_cnn.py --limit-train 2000   # a quick smoke run (tests/test_examples.py runs
                                                       # a smaller one)
"""
import argparse
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import nn, optim
from gpuconv.data import MNIST, DataLoader
from gpuconv.data.loader import to_float_batch


class Block(nn.Module):
    def __init__(self, c):
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU()  # one instance, used twice

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))  # the residual add


class ResNetMini(nn.Module):
    def __init__(self, c=16, classes=10):
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.MaxPool2d(2))                          # 28x28 -> 14x14
        self.blocks = nn.Sequential(Block(c), nn.MaxPool2d(2), Block(c))   # 14x14 -> 7x7
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--limit-train", type=int, default=None, help="train on the first N images only")
parser.add_argument("--limit-test", type=int, default=None, help="test on the first N images only")
parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
args = parser.parse_args()

device = gpuconv.parse_device(args.device)
gpuconv.manual_seed(0)
model = ResNetMini().to(device)
optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
train_set, test_set = MNIST("train", limit=args.limit_train), MNIST("test", limit=args.limit_test)
loader = DataLoader(train_set, batch_size=64, shuffle=True, seed=0)  # float32 batches in [0, 1]
print(f"{model.num_parameters():,} parameters on {device}, {len(train_set):,} training images")

started = time.perf_counter()
model.train()
for step, (x, y) in enumerate(loader.batches(0), start=1):
    optimizer.lr = 0.05 * (1 - (step - 1) / len(loader))  # linear decay: BN's running stats catch up
    loss = F.cross_entropy(model(gpuconv.to_device(x, device)), gpuconv.to_device(y, device))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0 or step == len(loader):
        print(f"step {step}/{len(loader)}: loss {loss.item():.4f}, {time.perf_counter() - started:.0f} s")

model.eval()
with gpuconv.no_grad():
    images = to_float_batch(test_set.images)
    predictions = np.concatenate([model(gpuconv.to_device(images[i:i + 1000], device)).argmax(dim=1).numpy()
                                  for i in range(0, len(images), 1000)])
accuracy = float((predictions == test_set.labels).mean())
print(f"test accuracy: {accuracy:.4f} ({time.perf_counter() - started:.0f} s in all)")
