"""The held-out search behind the Fashion-MNIST recipe (docs/performance.md, "Choosing the
Fashion-MNIST recipe"): train on the first 50,000 images of the training set, report accuracy on
the last 10,000 (the test set is never looked at). A record of how the figures were made, not
part of gpuconv.

    OPENBLAS_NUM_THREADS=1 python docs/experiments/fashion_heldout.py NAME 'TRAIN-CONFIG-JSON' ['MODEL-JSON']

TRAIN-CONFIG-JSON overrides train's settings (e.g. {"random_erasing": 0.5, "batch_size": 64});
MODEL-JSON, e.g. {"widths": [32, 64]}, builds SimpleCNN with other block widths.
"""
import json
import sys
import time

import gpuconv.models as M
import gpuconv.train as T
from gpuconv.data import FashionMNIST
from gpuconv.data.loader import ArrayDataset, to_float_batch
from gpuconv.data.registry import dataset_info

name, overrides = sys.argv[1], json.loads(sys.argv[2])
model_spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}


def build_data(config):
    info = dataset_info(config["dataset"])
    full = FashionMNIST("train")
    train = ArrayDataset(full.images[:50000], full.labels[:50000])
    val = ArrayDataset(full.images[50000:], full.labels[50000:])
    val_images = info.eval_transform()(to_float_batch(val.images))
    augment = info.augment if config["augment"] is None else bool(config["augment"])
    return train, val, val_images, info.train_transform(augment, config["crop_padding"], config["random_erasing"])


def build_model(name, in_channels=1, num_classes=10, image_size=28, seed=0, **_):
    return M.SimpleCNN(in_channels, num_classes, image_size, widths=tuple(model_spec["widths"]),
                       hidden=model_spec.get("hidden", 128), seed=seed, dropout=model_spec.get("dropout", 0.0))


T.build_data = build_data  # the held-out split stands in for the test set
if "widths" in model_spec:
    T.build_model = build_model
config = dict(dataset="fashion-mnist", model="simplecnn", epochs=15, batch_size=128, lr=0.02, crop_padding=0,
              checkpoint=f"runs/heldout-{name}.npz", device="cpu")
config.update(overrides)
start = time.time()
trainer = T.Trainer(config, log=lambda *a, **k: print(*a, **k, flush=True))
print("transform", trainer.transform, flush=True)
trainer.fit()
print(f"{name}: wall {time.time() - start:.0f} s; held-out accuracy by epoch",
      [round(h["test_accuracy"], 4) for h in trainer.history], flush=True)
