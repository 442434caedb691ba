"""The BatchNorm-recalibration probe of docs/performance.md ("Choosing the Fashion-MNIST recipe",
second round): evaluate a held-out checkpoint as saved, then with its BatchNorm running statistics
recomputed (cumulative average) on N clean training images, since the saved ones are averaged over
randomly erased batches. A record of how the figure was made, not part of gpuconv.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python docs/experiments/fashion_precise_bn.py CHECKPOINT WIDTHS N...

e.g. CHECKPOINT = runs/heldout-F.npz (from fashion_heldout.py), WIDTHS = 32,64,128, N = 10000.
"""
import sys, numpy as np
import gpuconv.models as M
from gpuconv.checkpoint import load_checkpoint
from gpuconv.data import FashionMNIST
from gpuconv.data.loader import to_float_batch
from gpuconv.data.registry import dataset_info
from gpuconv.autograd import no_grad
path, widths = sys.argv[1], tuple(int(w) for w in sys.argv[2].split(","))
state, _, meta = load_checkpoint(path)
model = M.SimpleCNN(1, 10, 28, widths=widths); model.load_state_dict(state)
full = FashionMNIST("train"); info = dataset_info("fashion-mnist"); norm = info.eval_transform()
val_x = norm(to_float_batch(full.images[50000:])); val_y = full.labels[50000:]
def acc():
    model.eval(); correct = 0
    with no_grad():
        for i in range(0, 10000, 500):
            correct += int((np.asarray(model(val_x[i:i+500]).data).argmax(1) == val_y[i:i+500]).sum())
    return correct / 10000
print("as saved", acc(), flush=True)
for name in sys.argv[3:]:
    model.load_state_dict(state)
    bns = [m for m in model.modules() if type(m).__name__ == "BatchNorm2d"]
    for b in bns: b.momentum = None; b.num_batches_tracked[...] = 0; b.running_mean[...] = 0; b.running_var[...] = 1
    model.train()
    rng = np.random.default_rng(0); idx = rng.permutation(50000)[:int(name)]
    x = norm(to_float_batch(full.images[idx]))
    with no_grad():
        for i in range(0, len(idx), 200): model(x[i:i+200])
    print("precise BN over", name, "clean images:", acc(), flush=True)
