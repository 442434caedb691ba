"""LeNet-5's training step, one checkout against another, alternating fresh processes: each
process times 60 steps (median of the last 45) of the eager model at batch 64 or the compiled
one at batch 128. Prints new / old per round. Run from the repository root, OLD another checkout:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/lenet_step_ab.py OLD [eager|compiled] [ROUNDS]
"""
import os
import subprocess
import sys

CHILD = r"""
import sys, time, numpy as np, gpuconv
from gpuconv import functional as F, optim
from gpuconv.models import LeNet5
compiled = sys.argv[1] == "compiled"
batch = 128 if compiled else 64
model = LeNet5()
net = gpuconv.compile(model) if compiled else model
optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
rng = np.random.default_rng(0)
x = gpuconv.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
labels = rng.integers(0, 10, batch)
times = []
for _ in range(60):
    start = time.perf_counter()
    optimizer.zero_grad(); loss = F.cross_entropy(net(x), labels); loss.backward(); optimizer.step(); loss.item()
    times.append(time.perf_counter() - start)
print(1e3 * np.median(times[15:]))
"""


def step_ms(root, kind):
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True, env=env,
                          cwd=root, check=True, timeout=600)
    return float(done.stdout)


def main():
    old = os.path.abspath(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "compiled"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    new = os.getcwd()
    for _ in range(rounds):
        a, b = step_ms(new, kind), step_ms(old, kind)
        print(f"{kind}: new {a:.2f} ms, old {b:.2f} ms, new / old {a / b:.2f}")


if __name__ == "__main__":
    main()
