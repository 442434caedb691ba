"""See what a trained model learned: `python -m gpuconv show [--checkpoint PATH]`.

Any checkpoint `train` writes (LeNet-5, SimpleCNN, the ResNets; MNIST, Fashion-MNIST, CIFAR-10): the
model and the dataset are rebuilt from the checkpoint's config. Without --checkpoint, the newest
.npz under runs/ (where `train` writes by default) is drawn. Four PNG pictures from one checkpoint:
  filters.png           every filter of the first conv as a tile (grey, or RGB for colour input), on
                        one shared scale
  feature_maps.png      one test image, its predicted class, and the feature maps of two layers
  training_curves.png   loss and accuracy per epoch, as `train` recorded them
  confusion_matrix.png  true class against predicted class over the test set, with counts and the
                        dataset's class names

A checkpoint holds NumPy arrays only, so one trained on either device draws anywhere; the model runs
on the CPU unless --device says otherwise. matplotlib is optional (`pip install 'gpuconv[plot]'`) and
imported only when a picture is drawn, so `import gpuconv.show` works without it. Figures are drawn
with the Agg canvas at a fixed size and dpi (never bbox_inches="tight"), so every PNG has a known
pixel size.
"""
import argparse
import glob
import json
import os
import sys
import threading

import numpy as np

from .autograd import no_grad
from .backend import parse_device, to_device
from .checkpoint import HISTORY_FIELDS, load_checkpoint
from .data.loader import to_float_batch
from .data.registry import dataset_info
from .errors import ArgumentError, CheckpointError, MissingExtraError
from .models import MODEL_TITLES, build_model, simplecnn_widths_of
from .train import predict_logits
from .cli import HelpFormatter

DPI = 100
# (width, height) in inches; at DPI these give the pixel sizes in PICTURES.
FIGURE_SIZES = {
    "filters": (7.2, 2.0),
    "feature_maps": (10.0, 4.4),
    "training_curves": (9.0, 3.4),
    "confusion_matrix": (6.0, 5.4),
}
PICTURES = {name: f"{name}.png" for name in FIGURE_SIZES}
CLASS_NAMES = [str(digit) for digit in range(10)]
# Feature maps are taken after each conv's activation: what the next layer actually sees. A model
# of the zoo names its own (`feature_layers`: title -> child); this is LeNet-5's.
FEATURE_LAYERS = {"conv1": "act1", "conv2": "act2"}
MAX_MAPS = (16, 32)  # at most this many maps of the first and second layer are drawn
RUNS = "runs"


def pixel_size(name):
    """(width, height) in pixels of picture `name` ("filters", "feature_maps", ...)."""
    width, height = FIGURE_SIZES[name]
    return round(width * DPI), round(height * DPI)


def require_matplotlib():
    """Import matplotlib with the Agg canvas, or raise MissingExtraError naming the `plot` extra."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(
            f"drawing pictures needs matplotlib, which is not installed ({exc}); install the optional "
            "extra with: pip install 'gpuconv[plot]'") from None
    return matplotlib, Figure, FigureCanvasAgg


def new_figure(name):
    """A Figure on its own Agg canvas: no pyplot, no global state, no display needed."""
    _, Figure, FigureCanvasAgg = require_matplotlib()
    figure = Figure(figsize=FIGURE_SIZES[name], dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")  # fixed size: no bbox_inches="tight"
    return path


# ----- model and data -----
def newest_checkpoint(folder=RUNS):
    """The most recently written .npz under `folder` (where `train` writes by default)."""
    found = [path for path in glob.glob(os.path.join(glob.escape(folder), "**", "*.npz"), recursive=True)
             if os.path.isfile(path)]
    if not found:
        raise CheckpointError(f"no checkpoint given and none under {os.path.abspath(folder)}; train one first "
                              "with python -m gpuconv train (it writes runs/MODEL-DATASET.npz), or pass "
                              "--checkpoint PATH")
    return max(found, key=os.path.getmtime)


def checkpoint_config(meta):
    """The checkpoint's training config, with the defaults of checkpoints written before the zoo."""
    return dict(dict(dataset="mnist", model="lenet5", activation="relu", pool="max"), **meta.get("config", {}))


def simplecnn_widths(config, state, where="checkpoint"):
    """A SimpleCNN checkpoint's block widths (None for another model), read from its conv weights (a
    checkpoint written before the config recorded them has only those); a config that says otherwise
    is named here, before a model of its widths is built (a huge one would be a MemoryError)."""
    if config["model"] != "simplecnn":
        return None
    widths = simplecnn_widths_of(state)
    if config.get("widths") and (widths is None or list(config["widths"]) != list(widths)):
        raise CheckpointError(f"{where}: meta.config.widths: {list(config['widths'])} disagrees with the "
                              f"conv weights' {list(widths or ())}; the file was altered or mixed up")
    return widths


def load_model(checkpoint, device="cpu"):
    """Rebuild the model as the checkpoint's config describes it, load its weights -> (model, meta)."""
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint!r}: no such file; train one first with "
                              "python -m gpuconv train --checkpoint PATH")
    state, _, meta = load_checkpoint(checkpoint)
    config = checkpoint_config(meta)
    info = dataset_info(config["dataset"])
    model = build_model(config["model"], info.in_channels, len(info.cls.classes), info.image_size,
                        activation=config["activation"], pool=config["pool"],
                        widths=simplecnn_widths(config, state, checkpoint))
    model.load_state_dict(state)
    model.eval()
    return model.to(parse_device(device)), meta


def load_history(checkpoint, meta):
    """Per-epoch records from the checkpoint's meta, else from PATH-without-.npz + ".history.json"."""
    if meta.get("history"):
        return _drawable(list(meta["history"]), f"checkpoint {checkpoint}: meta.history")
    path = os.path.splitext(checkpoint)[0] + ".history.json"
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"training history {path}: expected the JSON list train writes beside the "
                              f"checkpoint, could not read it ({type(e).__name__}: {e}); delete or fix the file") from e
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise CheckpointError(f"training history {path}: expected a JSON list of per-epoch records, "
                              f"got {type(history).__name__}")
    for index, record in enumerate(history):  # each field's type and range, as for a checkpoint's meta
        for field, (check, bounds) in HISTORY_FIELDS.items():
            if field in record:
                check(f"training history {path}", f"history[{index}].{field}", record[field], **bounds)
    return _drawable(history, f"training history {path}: history")


# what plot_training_curves reads from every record (the accuracies it draws only where present)
DRAWN_FIELDS = ("epoch", "train_loss")


def _drawable(history, where):
    for index, record in enumerate(history):
        missing = [field for field in DRAWN_FIELDS if field not in record]
        if missing:
            raise CheckpointError(f"{where}[{index}]: expected an epoch record with {', '.join(DRAWN_FIELDS)}; "
                                  f"missing {', '.join(missing)}")
    return history


def check_image_index(image_index, count):
    if isinstance(image_index, bool) or not isinstance(image_index, (int, np.integer)) \
            or not 0 <= image_index < count:
        raise ArgumentError(f"--image-index: expected an int in 0..{count - 1} (the test set has {count} "
                            f"images), got {image_index!r}")
    return int(image_index)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _model_input(images, transform):
    x = to_float_batch(images)
    return x if transform is None else transform(x)


def predict(model, images, batch_size=1000, transform=None):
    """Class probabilities (N, classes) as NumPy for uint8 images ((N, 28, 28) or (N, C, H, W)), on
    the model's device; `transform` is the dataset's normalisation (DatasetInfo.eval_transform())."""
    if len(images) == 0:
        return np.zeros((0, 10))
    return softmax(predict_logits(model, _model_input(images, transform), batch_size).astype(np.float64))


def feature_maps(model, image, transform=None):
    """Run one uint8 image ((28, 28) or (C, H, W)) through the model -> (maps, probabilities):
    maps[title] is the (C, H, W) NumPy output of the layer the model's `feature_layers` names for
    that title (LeNet-5: the activations after conv1 and conv2; a dotted name reaches inside a
    block, as named_modules() spells it).

    The model runs its own forward, and each named layer's output is kept as it passes (the last
    one, for a layer called twice), so a model whose forward is not a chain of its children (a
    forward of its own, a top-level Residual or Concat) shows what its layers computed. A compiled
    model (gpuconv.compile) runs its module eagerly here: a plan calls no layer's forward.
    Meanwhile the named layers' forward is wrapped: feature_maps calls take turns (a lock), and
    the model should not run in another thread during one."""
    from .compiler import CompiledModel
    if isinstance(model, CompiledModel):
        model = model.module
    with _feature_maps_lock:
        return _feature_maps(model, image, transform)


_feature_maps_lock = threading.RLock()  # re-entrant: a model's forward may call feature_maps on a part of it


def _feature_maps(model, image, transform):
    x = to_device(_model_input(image[None], transform), model.device)
    titles = getattr(model, "feature_layers", FEATURE_LAYERS)
    layers = dict(model.named_modules())
    missing = [name for name in titles.values() if name not in layers]
    if missing:
        raise ArgumentError(
            f"feature_maps(model): {type(model).__name__} has no layer named {', '.join(map(repr, missing))} "
            f"(the names of model.feature_layers, or LeNet-5's {FEATURE_LAYERS} for a model without one); "
            "set model.feature_layers = {title: layer name}, names as model.named_modules() gives them")
    kept, watched = {}, {}  # id(layer) -> (layer, its titles)
    for title, name in titles.items():
        watched.setdefault(id(layers[name]), (layers[name], []))[1].append(title)
    own = {key: layer.__dict__.get("forward", _NONE) for key, (layer, _) in watched.items()}
    try:
        for layer, its_titles in watched.values():
            layer.forward = _keeping_output(layer.forward, its_titles, kept)  # shadows the class's
        with no_grad():
            logits = model(x).data
    finally:
        for key, (layer, _) in watched.items():
            if own[key] is _NONE:
                del layer.forward
            else:
                layer.forward = own[key]
    never = [titles[title] for title in titles if title not in kept]
    if never:
        raise ArgumentError(f"feature_maps(model): layer {', '.join(map(repr, never))} of {type(model).__name__} "
                            "did not run in its forward; name layers the forward calls in model.feature_layers")
    maps = {title: to_device(kept[title], "cpu")[0] for title in titles}
    return maps, softmax(to_device(logits, "cpu").astype(np.float64))[0]


_NONE = object()


def _keeping_output(forward, titles, kept):
    def keeping(*args, **kwargs):
        y = forward(*args, **kwargs)
        for title in titles:
            kept[title] = y.data
        return y
    return keeping


def confusion_matrix(labels, predicted, num_classes=10):
    """counts[true, predicted], like sklearn.metrics.confusion_matrix."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts


# ----- pictures -----
def _tile(axes, image, vmin, vmax, title=None):
    shown = axes.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=9)
    return shown


def _show_image(axes, image):
    """A uint8 image (H, W) in grey or (3, H, W) in colour."""
    if image.ndim == 3 and image.shape[0] == 3:
        axes.imshow(np.transpose(image, (1, 2, 0)), interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
    else:
        _tile(axes, image.reshape(image.shape[-2:]), 0, 255)


def plot_filters(model, path):
    """Every filter of the first conv (conv1) as a tile, all on one scale centred on zero: grey
    for one input channel, colour (each channel mapped from [-limit, limit] to [0, 1]) for three."""
    weights = to_device(model.conv1.weight.data, "cpu")
    count, channels = weights.shape[:2]
    limit = float(np.abs(weights).max()) or 1.0
    columns = min(count, 16)
    rows = -(-count // columns)
    figure = new_figure("filters")
    grid = figure.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.08],
                               left=0.02, right=0.93, top=0.72 if rows == 1 else 0.82, bottom=0.06,
                               wspace=0.15, hspace=0.15)
    shown = None
    for index, kernel in enumerate(weights):
        axes = figure.add_subplot(grid[index // columns, index % columns])
        title = f"filter {index}" if count <= 8 else None
        if channels == 3:
            _tile(axes, np.transpose((kernel + limit) / (2 * limit), (1, 2, 0)), 0, 1, title)
        else:
            shown = _tile(axes, kernel[0], -limit, limit, title)
    if shown is not None:
        figure.colorbar(shown, cax=figure.add_subplot(grid[:, -1])).ax.tick_params(labelsize=8)
    kind = f"{channels}x" if channels not in (1, 3) else ""
    colours = "black = negative, white = positive" if channels != 3 else "RGB, grey = 0"
    if channels not in (1, 3):
        kind += "(first input channel) "
    figure.suptitle(f"conv1 weights: {count} filters of {kind}{weights.shape[2]}x{weights.shape[3]} "
                    f"({colours})", fontsize=11)
    return save_figure(figure, path)


def plot_feature_maps(model, image, label, path, activation="relu", class_names=CLASS_NAMES,
                      transform=None, title="LeNet-5"):
    """The image, its predicted class and probability, and the feature maps of the two layers the
    model names (LeNet-5: conv1 and conv2 after the activation; at most MAX_MAPS of each)."""
    maps, probabilities = feature_maps(model, image, transform)
    predicted = int(probabilities.argmax())
    class_names = list(class_names)
    figure = new_figure("feature_maps")
    long_names = max(map(len, class_names)) > 2
    outer = figure.add_gridspec(1, 2, width_ratios=[1, 4.2], left=0.05 if long_names else 0.03, right=0.97,
                                top=0.87, bottom=0.16 if long_names else 0.06, wspace=0.12)
    left = outer[0, 0].subgridspec(2, 1, height_ratios=[1.3, 1], hspace=0.45)
    digit = figure.add_subplot(left[0])
    _show_image(digit, image)
    verdict = "right" if predicted == label else "wrong"
    digit.set_title(f"true {class_names[label]}, predicted {class_names[predicted]}\n"
                    f"p = {probabilities[predicted]:.3f} ({verdict})", fontsize=10 if len(class_names[label]) < 8 else 8)
    bars = figure.add_subplot(left[1])
    colours = ["tab:green" if c == predicted else "tab:grey" for c in range(len(probabilities))]
    bars.bar(range(len(probabilities)), probabilities, color=colours)
    bars.set_xticks(range(len(probabilities)), class_names, fontsize=6 if long_names else 8,
                    rotation=90 if long_names else 0)
    bars.set_ylim(0, 1)
    bars.tick_params(axis="y", labelsize=8)
    bars.set_title("class probabilities", fontsize=9)

    right = outer[0, 1].subgridspec(2, 1, height_ratios=[1.15, 1.85], hspace=0.3)
    for row, (conv, stack) in enumerate(list(maps.items())[:2]):
        total = len(stack)
        stack = stack[:MAX_MAPS[row]]
        columns = len(stack) if len(stack) <= 8 else (8 if len(stack) <= 16 else 16)
        rows = -(-len(stack) // columns)
        grid = right[row].subgridspec(rows, columns + 1, width_ratios=[1] * columns + [0.08],
                                      wspace=0.08, hspace=0.12)
        vmax = float(stack.max()) if stack.max() > stack.min() else float(stack.min()) + 1.0
        vmin = float(stack.min())
        for index, fmap in enumerate(stack):
            shown = _tile(figure.add_subplot(grid[index // columns, index % columns]), fmap, vmin, vmax)
        colorbar = figure.colorbar(shown, cax=figure.add_subplot(grid[:, -1]))
        colorbar.ax.tick_params(labelsize=7)
        # A title on the first tile's row, spanning the maps: set on an invisible axes over them.
        header = figure.add_subplot(grid[0, :columns], frame_on=False)
        header.set_xticks([])
        header.set_yticks([])
        header.patch.set_alpha(0)
        shown_count = f"{len(stack)} maps" if len(stack) == total else f"the first {len(stack)} of {total} maps"
        header.set_title(f"{conv} after {activation}: {shown_count} of {stack.shape[1]}x{stack.shape[2]} "
                         "(one shared scale)", fontsize=10)
    figure.suptitle(f"What {title} sees in one test image", fontsize=12)
    return save_figure(figure, path)


def plot_training_curves(history, path):
    """Training loss, and train/test accuracy, per epoch."""
    figure = new_figure("training_curves")
    loss_axes, accuracy_axes = figure.subplots(1, 2, gridspec_kw=dict(left=0.08, right=0.98, top=0.82,
                                                                       bottom=0.16, wspace=0.25))
    epochs = [record["epoch"] for record in history]
    if not history:
        for axes in (loss_axes, accuracy_axes):
            axes.text(0.5, 0.5, "no training history recorded\nin the checkpoint or its .history.json",
                      ha="center", va="center", transform=axes.transAxes, fontsize=9)
    else:
        losses = [record["train_loss"] for record in history]
        loss_axes.plot(epochs, losses, "o-", color="tab:blue", label=f"train (last {losses[-1]:.4f})")
        for key, colour, label in (("train_accuracy", "tab:blue", "train"), ("test_accuracy", "tab:orange", "test")):
            if all(key in record for record in history):
                values = [100 * record[key] for record in history]
                accuracy_axes.plot(epochs, values, "o-", color=colour, label=f"{label} (last {values[-1]:.2f}%)")
        accuracy_axes.legend(fontsize=8, loc="best")
        loss_axes.legend(fontsize=8, loc="upper right")
    loss_axes.set_title("training loss (cross-entropy)", fontsize=10)
    accuracy_axes.set_title("accuracy", fontsize=10)
    accuracy_axes.set_ylabel("%")
    loss_axes.set_ylabel("mean loss per epoch")
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.margins(y=0.2)
        if epochs:
            axes.set_xticks(epochs if len(epochs) <= 12 else axes.get_xticks())
            axes.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    figure.suptitle(f"Training history ({len(history)} epoch{'s' if len(history) != 1 else ''})", fontsize=12)
    return save_figure(figure, path)


def plot_confusion_matrix(counts, path, class_names=CLASS_NAMES):
    """counts[true, predicted] with the count in every non-empty cell, rows and columns named."""
    figure = new_figure("confusion_matrix")
    class_names = list(class_names)
    long_names = max(map(len, class_names)) > 2
    axes = figure.add_axes([0.19, 0.16, 0.63, 0.72] if long_names else [0.12, 0.1, 0.7, 0.78])
    colorbar_axes = figure.add_axes([0.85, 0.1, 0.03, 0.78])
    shown = axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    figure.colorbar(shown, cax=colorbar_axes).ax.tick_params(labelsize=8)
    threshold = counts.max() / 2
    for true in range(counts.shape[0]):
        for predicted in range(counts.shape[1]):
            if counts[true, predicted]:
                axes.text(predicted, true, str(counts[true, predicted]), ha="center", va="center", fontsize=8,
                          color="white" if counts[true, predicted] > threshold else "black")
    axes.set_xticks(range(counts.shape[1]), class_names[:counts.shape[1]], fontsize=7 if long_names else None,
                    rotation=45 if long_names else 0, ha="right" if long_names else "center")
    axes.set_yticks(range(counts.shape[0]), class_names[:counts.shape[0]], fontsize=7 if long_names else None)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    total, correct = int(counts.sum()), int(np.trace(counts))
    axes.set_title(f"Confusion matrix: {correct:,} of {total:,} test images right "
                   f"({100 * correct / max(total, 1):.2f}%)", fontsize=10)
    return save_figure(figure, path)


def render_all(checkpoint, out_dir, image_index=0, data_dir=None, limit_test=None, device="cpu", log=print):
    """Draw all four pictures from `checkpoint` into `out_dir` -> {picture name: path}."""
    require_matplotlib()  # fail before any slow work
    model, meta = load_model(checkpoint, device)
    config = checkpoint_config(meta)
    info = dataset_info(config["dataset"])
    test_set = info.cls("test", data_dir=data_dir, limit=limit_test)
    image_index = check_image_index(image_index, len(test_set))
    activation = config["activation"] if config["model"] == "lenet5" else "relu"
    transform = info.eval_transform()
    paths = {name: os.path.join(out_dir, filename) for name, filename in PICTURES.items()}
    log(f"{checkpoint}: {MODEL_TITLES[config['model']]} on {info.title}")

    plot_filters(model, paths["filters"])
    plot_feature_maps(model, test_set.images[image_index], int(test_set.labels[image_index]),
                      paths["feature_maps"], activation, test_set.classes, transform,
                      MODEL_TITLES[config["model"]])
    history = load_history(checkpoint, meta)
    if not history:
        log(f"warning: {checkpoint!r} has no training history (nor a .history.json beside it); "
            "the training-curves picture says so")
    plot_training_curves(history, paths["training_curves"])
    predicted = predict(model, test_set.images, transform=transform).argmax(axis=1)
    plot_confusion_matrix(confusion_matrix(test_set.labels, predicted, len(test_set.classes)),
                          paths["confusion_matrix"], test_set.classes)
    for name, path in paths.items():
        width, height = pixel_size(name)
        log(f"wrote {path} ({width}x{height} px)")
    return paths


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpuconv show", formatter_class=HelpFormatter,
                                description="Draw conv1 filters, feature maps, training curves and a "
                                            "confusion matrix from a checkpoint, as PNG files (needs "
                                            "pip install 'gpuconv[plot]').")
    p.add_argument("--checkpoint", default=None,
                   help="a .npz written by python -m gpuconv train (default: the newest under runs/)")
    p.add_argument("--image-index", type=int, default=0, help="which test image to show feature maps for")
    p.add_argument("--out", default="pictures", help="folder for the PNG files (created if missing)")
    p.add_argument("--device", default="cpu", help="where to run the model: cpu (default), cuda, cuda:N, auto")
    p.add_argument("--data-dir", default=None,
                   help="where the checkpoint's dataset is (default: found automatically; when given, the only "
                        "place looked at)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.limit_test is not None and args.limit_test < 1:
        raise ArgumentError(f"--limit-test: expected an int >= 1, got {args.limit_test}")
    checkpoint = args.checkpoint if args.checkpoint is not None else newest_checkpoint()
    render_all(checkpoint, args.out, image_index=args.image_index, data_dir=args.data_dir,
               limit_test=args.limit_test, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
