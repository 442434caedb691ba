"""`python -m gpuconv show`: four PNGs of a known pixel size from a tiny run, and its clear errors.

The tiny run trains on a small fake MNIST (random digits with their own checksums), so these tests
need neither the real data set nor a network, and take a few seconds.
"""
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import gpuconv
from gpuconv import show
from gpuconv import __main__ as cli
from gpuconv.checkpoint import save_checkpoint
from gpuconv.data import mnist
from gpuconv.data.idx import encode_idx
from gpuconv.errors import ArgumentError, CheckpointError
from gpuconv.models import LeNet5
from gpuconv.train import main as train_main

pytest.importorskip("matplotlib", reason="the show tests need the plot extra: pip install 'gpuconv[plot]'")

N_TRAIN, N_TEST = 256, 128


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fake MNIST folder; the checksums of its files are trusted for the duration of this module."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("mnist")
    patch = pytest.MonkeyPatch()
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        images_name, labels_name = mnist.FILES[split]
        for name, array in ((images_name, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)),
                            (labels_name, rng.integers(0, 10, count, dtype=np.uint8))):
            data = encode_idx(array)
            (folder / name).write_bytes(data)
            patch.setitem(mnist.SHA256, name, hashlib.sha256(data).hexdigest())
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "ck.npz"
    assert train_main(["--epochs", "1", "--limit-train", str(N_TRAIN), "--limit-test", str(N_TEST),
                       "--batch-size", "32", "--checkpoint", str(path), "--device", "cpu",
                       "--data-dir", str(data_dir)]) == 0
    return path


def show_args(checkpoint, data_dir, out, *extra):
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--out", str(out), *extra]


def test_renders_all_four_pictures_with_their_pixel_sizes(checkpoint, data_dir, tmp_path, capsys):
    from matplotlib.image import imread

    # Through `python -m gpuconv show`'s entry point, as a user runs it.
    assert cli.main(["show", *show_args(checkpoint, data_dir, tmp_path / "pictures", "--image-index", "5")]) == 0
    printed = capsys.readouterr().out
    for name, filename in show.PICTURES.items():
        path = tmp_path / "pictures" / filename
        pixels = imread(path)  # decodes: a real PNG
        width, height = show.pixel_size(name)
        assert pixels.shape[:2] == (height, width), name
        assert pixels.std() > 0, f"{name} is blank"
        assert path.stat().st_size < 150_000
        assert f"{path} ({width}x{height} px)" in printed
    assert set(p.name for p in (tmp_path / "pictures").iterdir()) == set(show.PICTURES.values())


def test_pixel_sizes_are_fixed():
    assert show.pixel_size("filters") == (720, 200)
    assert show.pixel_size("feature_maps") == (1000, 440)
    assert show.pixel_size("training_curves") == (900, 340)
    assert show.pixel_size("confusion_matrix") == (600, 540)


def test_model_rebuilt_from_checkpoint_config(tmp_path):
    trained = LeNet5(activation="tanh", pool="avg", seed=3)
    path = tmp_path / "tanh.npz"
    save_checkpoint(path, trained, meta=dict(config=dict(activation="tanh", pool="avg")))
    model, meta = show.load_model(str(path))
    assert (model.activation, model.pool) == ("tanh", "avg")
    assert not model.training
    for (name, expected), (_, got) in zip(trained.state_dict().items(), model.state_dict().items()):
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_feature_maps_and_probabilities():
    model = LeNet5(seed=0).eval()
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    maps, probabilities = show.feature_maps(model, image)
    assert maps["conv1"].shape == (6, 28, 28) and maps["conv2"].shape == (16, 10, 10)
    assert maps["conv1"].min() >= 0  # after the ReLU, as the figure title says
    assert probabilities.shape == (10,) and abs(probabilities.sum() - 1) < 1e-6
    np.testing.assert_allclose(probabilities, show.predict(model, image[None])[0], rtol=1e-6)


def test_confusion_matrix_counts():
    counts = show.confusion_matrix([0, 1, 1, 2, 9], [0, 1, 2, 2, 0])
    assert counts.shape == (10, 10) and counts.sum() == 5
    assert counts[0, 0] == 1 and counts[1, 1] == 1 and counts[1, 2] == 1 and counts[2, 2] == 1 and counts[9, 0] == 1


def test_history_from_json_beside_the_checkpoint(tmp_path):
    path = tmp_path / "run.npz"
    save_checkpoint(path, LeNet5(), meta=dict(config={}))
    assert show.load_history(str(path), {}) == []
    records = [dict(epoch=1, train_loss=0.5, train_accuracy=0.8, test_accuracy=0.9)]
    (tmp_path / "run.history.json").write_text(json.dumps(records))
    assert show.load_history(str(path), {"history": []}) == records
    assert show.load_history(str(path), {"history": records * 2}) == records * 2  # meta wins


@pytest.mark.parametrize("text, expected", [('[{"epoch": 1', "could not read it.*JSONDecodeError"),
                                             (b"\xff\xfe[", "could not read it.*UnicodeDecodeError"),
                                             ('{"epoch": 1}', "expected a JSON list.*got dict"),
                                             ('[1, 2]', "expected a JSON list of per-epoch records"),
                                             # records show cannot draw were a KeyError / ValueError traceback
                                             ('[{}]', "history\\[0\\]: expected an epoch record with epoch, "
                                                      "train_loss; missing epoch, train_loss"),
                                             ('[{"epoch": 1, "train_loss": "a"}]',
                                              "history\\[0\\].train_loss: expected a finite number >= 0, got str")])
def test_a_damaged_history_file_is_a_clear_error_naming_it(tmp_path, text, expected):
    path = tmp_path / "run.npz"
    history = tmp_path / "run.history.json"
    history.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=f"training history {history}: .*{expected}"):
        show.load_history(str(path), {})


def test_history_records_in_the_meta_that_cannot_be_drawn_are_a_clear_error():
    with pytest.raises(CheckpointError, match=r"checkpoint run.npz: meta.history\[1\]: .*missing train_loss"):
        show.load_history("run.npz", {"history": [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2}]})


def test_training_curves_without_history_still_drawn(tmp_path):
    from matplotlib.image import imread

    path = show.plot_training_curves([], str(tmp_path / "curves.png"))
    assert imread(path).shape[:2] == show.pixel_size("training_curves")[::-1]


@pytest.mark.parametrize("index", [N_TEST, -1, 10**6])
def test_bad_image_index_names_argument_and_range(checkpoint, data_dir, tmp_path, index):
    with pytest.raises(ArgumentError, match=rf"--image-index: expected an int in 0\.\.{N_TEST - 1}.*got {index}"):
        show.main(show_args(checkpoint, data_dir, tmp_path, "--image-index", str(index)))
    assert not list(tmp_path.iterdir())  # checked before anything is drawn


def test_checkpoint_not_found(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match="nope.npz.*no such file.*gpuconv train --checkpoint"):
        show.main(["--checkpoint", str(missing), "--out", str(tmp_path)])
    assert cli.main(["show", "--checkpoint", str(missing)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gpuconv\[plot\]'"):
        show.main(show_args(checkpoint, data_dir, tmp_path))
    assert cli.main(["show", *show_args(checkpoint, data_dir, tmp_path)]) == 1
    assert "gpuconv[plot]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_import_does_not_need_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; import gpuconv.show; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_renders_on_the_gpu(checkpoint, data_dir, tmp_path):
    assert gpuconv.cuda_available()
    assert show.main(show_args(checkpoint, data_dir, tmp_path, "--device", "cuda")) == 0
    assert (tmp_path / "feature_maps.png").exists()


# ---------------------------------------------------------------- the zoo's checkpoints

from gpuconv.models import ResNet, SimpleCNN  # noqa: E402


@pytest.mark.parametrize("model, config, image_shape, keys", [
    (SimpleCNN(seed=1), dict(dataset="fashion-mnist", model="simplecnn"), (28, 28),
     {"block1": (32, 14, 14), "block2": (64, 7, 7)}),
    # SimpleCNN had two blocks by default before it had three: such a checkpoint raised
    # "state_dict does not fit SimpleCNN: missing keys ['conv3.weight', ...]; was it saved from another model?"
    (SimpleCNN(widths=(32, 64), seed=1), dict(dataset="fashion-mnist", model="simplecnn"), (28, 28),
     {"block1": (32, 14, 14), "block2": (64, 7, 7)}),
    (ResNet(8, in_channels=3, seed=1), dict(dataset="cifar10", model="resnet8"), (3, 32, 32),
     {"conv1": (16, 32, 32), "layer1": (16, 32, 32)}),
])
def test_zoo_checkpoints_rebuild_and_give_feature_maps(tmp_path, model, config, image_shape, keys):
    path = tmp_path / "zoo.npz"
    save_checkpoint(path, model, meta=dict(config=config))
    loaded, _ = show.load_model(str(path))
    assert type(loaded) is type(model)
    for (name, expected), (_, got) in zip(model.state_dict().items(), loaded.state_dict().items()):
        np.testing.assert_array_equal(got, expected, err_msg=name)
    image = np.random.default_rng(0).integers(0, 256, image_shape, dtype=np.uint8)
    maps, probabilities = show.feature_maps(loaded, image)
    assert {k: v.shape for k, v in maps.items()} == keys and probabilities.shape == (10,)


def test_zoo_pictures_with_class_names_and_colour_filters(tmp_path):
    from matplotlib.image import imread

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
    resnet = ResNet(8, in_channels=3).eval()
    paths = [show.plot_filters(resnet, str(tmp_path / "filters.png")),
             show.plot_feature_maps(SimpleCNN().eval(), np.zeros((28, 28), np.uint8), 9,
                                    str(tmp_path / "feature_maps.png"), class_names=classes, title="SimpleCNN"),
             show.plot_feature_maps(resnet, np.zeros((3, 32, 32), np.uint8), 2,
                                    str(tmp_path / "feature_maps_rgb.png"), class_names=classes),
             show.plot_confusion_matrix(show.confusion_matrix([0, 9], [0, 8]), str(tmp_path / "cm.png"), classes)]
    for path, name in zip(paths, ["filters", "feature_maps", "feature_maps", "confusion_matrix"]):
        assert imread(path).shape[:2] == show.pixel_size(name)[::-1]


@pytest.mark.parametrize("widths", [[4, 16], [100000000, 8], [4]])
def test_a_checkpoint_whose_config_widths_disagree_with_its_weights_is_named(tmp_path, widths):
    # [100000000, 8] built a SimpleCNN of that width before any shape was compared: a NumPy
    # MemoryError traceback; [4, 16] and [4] failed on shapes without naming meta.config.widths
    from gpuconv import optim
    from gpuconv.models import SimpleCNN
    model = SimpleCNN(widths=(4, 8))
    path = tmp_path / "wide.npz"
    save_checkpoint(path, model, optim.SGD(model.parameters(), lr=0.1),
                    {"config": {"model": "simplecnn", "dataset": "fashion-mnist", "widths": widths}})
    expected = rf"{re.escape(str(path))}: meta.config.widths: {re.escape(str(widths))} .*conv weights' \[4, 8\]"
    with pytest.raises(CheckpointError, match=expected):
        show.load_model(str(path))
    save_checkpoint(path, model, optim.SGD(model.parameters(), lr=0.1),
                    {"config": {"model": "simplecnn", "dataset": "fashion-mnist", "widths": [4, 8]}})
    assert show.load_model(str(path))[0].widths == (4, 8)
