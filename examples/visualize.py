"""Draw what a trained LeNet-5 learned, from a script: the steps `python -m gpuconv show` takes.

    python -m gpuconv train --epochs 2 --checkpoint runs/lenet.npz   # any checkpoint, CPU or GPU
    python examples/visualize.py runs/lenet.npz pictures/ [IMAGE_INDEX]

Needs matplotlib: pip install 'gpuconv[plot]'.
"""
import os
import sys

from gpuconv import show
from gpuconv.data import MNIST

if len(sys.argv) < 2:
    sys.exit(__doc__)
checkpoint = sys.argv[1]
out_dir = sys.argv[2] if len(sys.argv) > 2 else "pictures"
image_index = int(sys.argv[3]) if len(sys.argv) > 3 else 0

show.require_matplotlib()  # a clear message naming the `plot` extra, before any slow work

# The checkpoint holds NumPy arrays and the config it was trained with: rebuild, load, run on the CPU.
model, meta = show.load_model(checkpoint, device="cpu")
test_set = MNIST("test")
image_index = show.check_image_index(image_index, len(test_set))

# 1. conv1's 6 filters, 5x5 each, on one grey scale.
show.plot_filters(model, os.path.join(out_dir, "filters.png"))

# 2. One test digit through the network, layer by layer: conv1 and conv2 outputs after the activation.
image, label = test_set.images[image_index], int(test_set.labels[image_index])
maps, probabilities = show.feature_maps(model, image)
print(f"test image {image_index}: label {label}, predicted {probabilities.argmax()} "
      f"(p = {probabilities.max():.3f}); conv1 maps {maps['conv1'].shape}, conv2 maps {maps['conv2'].shape}")
show.plot_feature_maps(model, image, label, os.path.join(out_dir, "feature_maps.png"),
                       activation=meta.get("config", {}).get("activation", "relu"))

# 3. Loss and accuracy per epoch, as `train` recorded them in the checkpoint (or PATH.history.json).
history = show.load_history(checkpoint, meta)
show.plot_training_curves(history, os.path.join(out_dir, "training_curves.png"))

# 4. Which digits it confuses, over the whole test set.
predicted = show.predict(model, test_set.images).argmax(axis=1)
counts = show.confusion_matrix(test_set.labels, predicted)
show.plot_confusion_matrix(counts, os.path.join(out_dir, "confusion_matrix.png"))

print(f"test accuracy {counts.trace() / counts.sum():.4f}; pictures in {out_dir}/")
