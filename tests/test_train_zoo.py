"""`train` beyond LeNet-5 on MNIST, on generated data (no real CIFAR-10 exists on these machines):
ResNet-20 on CIFAR-10 binary files, the default checkpoint under runs/, show on it, an exact resume
with augmentation on, and the loud failure of a --data-dir that is wrong."""
import numpy as np
import pytest

from gpuconv import __main__ as cli
from gpuconv import train
from gpuconv.checkpoint import load_checkpoint
from gpuconv.data import cifar
from gpuconv.errors import ArgumentError, CheckpointError, DataNotFoundError
from gpuconv.summary_cli import main as summary_main


@pytest.fixture
def cifar_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _, tarball = cifar.write_fake(tmp_path / "gen", train_per_batch=12, test=16)
    monkeypatch.setattr(cifar, "TARBALL_MD5", cifar.md5_of(tarball))
    cifar._tarballs.clear()
    return tarball


def test_resnet20_on_cifar10_smoke_run_from_the_command_line(cifar_tarball, tmp_path, capsys):
    checkpoint = tmp_path / "r20.npz"
    code = train.main(["--dataset", "cifar10", "--model", "resnet20", "--device", "cpu", "--epochs", "1",
                       "--batch-size", "16", "--limit-train", "48", "--limit-test", "16",
                       "--data-dir", str(cifar_tarball), "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0] == ("training ResNet-20 (269,722 parameters) on cpu, 48 training and 16 test images of "
                      "CIFAR-10")
    assert "RandomCrop(size=(32, 32), padding=4), RandomHorizontalFlip(p=0.5), Normalize(" in out[1]
    assert out[-2].startswith("epoch 1/1: train loss")
    assert out[-1].startswith("test accuracy: 0.") and len(out[-1]) == len("test accuracy: 0.XXXX")
    state, _, meta = load_checkpoint(checkpoint)
    assert meta["config"]["dataset"] == "cifar10" and meta["config"]["model"] == "resnet20"
    assert meta["config"]["augment"] is True and state["layer3.2.bn2.running_var"].shape == (64,)
    # resuming it as another model, dataset or augmentation is refused, naming the setting
    with pytest.raises(CheckpointError, match="random_erasing=0.0.*random_erasing=0.5"):
        train.Trainer(dict(dataset="cifar10", model="resnet20", device="cpu", data_dir=str(cifar_tarball),
                           batch_size=16, checkpoint=str(checkpoint), resume=True, random_erasing=0.5),
                      log=lambda *_: None)
    with pytest.raises(ArgumentError, match=r"random_erasing: expected a probability in \[0, 1\], got 1.5"):
        train.Trainer(dict(dataset="cifar10", model="resnet20", device="cpu", data_dir=str(cifar_tarball),
                           random_erasing=1.5), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="model='resnet20'.*model='resnet8'"):
        train.Trainer(dict(dataset="cifar10", model="resnet8", device="cpu", data_dir=str(cifar_tarball), batch_size=16,
                           checkpoint=str(checkpoint), resume=True), log=lambda *_: None)


def test_default_checkpoint_under_runs_and_show_finds_the_newest(cifar_tarball, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="show needs the plot extra")
    monkeypatch.chdir(tmp_path)
    args = ["--dataset", "cifar10", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
            "--limit-train", "32", "--limit-test", "16", "--data-dir", str(cifar_tarball)]
    assert train.main(args + ["--model", "resnet8", "--no-augment"]) == 0
    assert train.main(args + ["--model", "simplecnn", "--label-smoothing", "0.1", "--crop-padding", "0",
                              "--random-erasing", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "RandomHorizontalFlip(p=0.5), Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616)), " \
           "RandomErasing(p=0.3, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0)])" in out
    assert "checkpoint: runs/resnet8-cifar10.npz" in out and "checkpoint: runs/simplecnn-cifar10.npz" in out
    assert "training batches: Compose([Normalize(" in out  # the normalisation, also without augmentation
    assert "training batches: Compose([RandomHorizontalFlip(p=0.5), Normalize(" in out  # flip only
    saved = load_checkpoint(tmp_path / "runs" / "simplecnn-cifar10.npz")[2]["config"]
    assert saved["crop_padding"] == 0 and saved["random_erasing"] == 0.3
    assert (tmp_path / "runs" / "resnet8-cifar10.npz").is_file()
    assert load_checkpoint(tmp_path / "runs" / "resnet8-cifar10.npz")[2]["config"]["augment"] is False

    assert cli.main(["show", "--data-dir", str(cifar_tarball), "--out", "pictures"]) == 0
    out = capsys.readouterr().out
    assert "simplecnn-cifar10.npz: SimpleCNN on CIFAR-10" in out  # the newest
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "confusion_matrix.png", "feature_maps.png", "filters.png", "training_curves.png"]
    assert cli.main(["show", "--checkpoint", "runs/resnet8-cifar10.npz", "--data-dir", str(cifar_tarball),
                     "--out", "r8"]) == 0


def test_show_without_any_checkpoint_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["show"]) == 1
    err = capsys.readouterr().err
    assert "CheckpointError: no checkpoint given and none under" in err and "python -m gpuconv train" in err


def test_resume_with_augmentation_equals_uninterrupted_training(cifar_tarball, tmp_path, monkeypatch):
    config = dict(dataset="cifar10", model="simplecnn", device="cpu", epochs=2, batch_size=8, limit_train=40,
                  limit_test=8, data_dir=str(cifar_tarball), lr=0.02, random_erasing=0.5)
    full = tmp_path / "full.npz"
    train.Trainer(dict(config, checkpoint=str(full)), log=lambda *_: None).fit()

    interrupted = tmp_path / "interrupted.npz"
    real_step, calls = train.Trainer.train_step, []

    def step_then_interrupt(self, x, y):
        if len(calls) == 7:  # batch 2 of epoch 2 (5 batches an epoch)
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, x, y)

    monkeypatch.setattr(train.Trainer, "train_step", step_then_interrupt)
    trainer = train.Trainer(dict(config, checkpoint=str(interrupted)), log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.save()
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.Trainer(dict(config, checkpoint=str(interrupted), resume=True), log=lambda *_: None).fit()
    a, b = load_checkpoint(full)[0], load_checkpoint(interrupted)[0]
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("problem", ["missing-folder", "empty-folder"])
def test_wrong_data_dir_fails_loudly_on_the_command_line(tmp_path, capsys, problem):
    folder = tmp_path / "data"
    if problem == "empty-folder":
        folder.mkdir()
    for dataset in ("mnist", "fashion-mnist", "cifar10"):
        code = cli.main(["train", "--dataset", dataset, "--data-dir", str(folder), "--limit-train", "8",
                         "--checkpoint", str(tmp_path / "x.npz")])
        err = capsys.readouterr().err
        assert code == 1, dataset
        assert "DataNotFoundError" in err and str(folder) in err and "data_dir that was given" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("dataset, augment", [("mnist", None), ("fashion-mnist", False)])
def test_crop_padding_without_augmentation_is_refused_not_ignored(dataset, augment):
    # it was accepted and saved in the checkpoint's config, and no batch was ever cropped
    with pytest.raises(ArgumentError, match=f"crop_padding: 2 crops augmented batches only.*{dataset}.*add --augment"):
        train.Trainer(dict(dataset=dataset, device="cpu", augment=augment, crop_padding=2,
                           data_dir="/nonexistent"), log=lambda *_: None)
    code = cli.main(["train", "--dataset", dataset, "--crop-padding", "2", "--data-dir", "/nonexistent"]
                    + (["--no-augment"] if augment is False else []))
    assert code == 1
    # 0 asks for nothing, so it stays accepted without augmentation (it gets as far as the data)
    with pytest.raises(DataNotFoundError):
        train.Trainer(dict(dataset=dataset, device="cpu", augment=augment, crop_padding=0,
                           data_dir="/nonexistent"), log=lambda *_: None)


@pytest.mark.parametrize("dataset, augment", [("mnist", None), ("cifar10", False)])
def test_random_erasing_without_augmentation_is_refused_not_ignored(dataset, augment):
    # it was accepted, saved in the checkpoint's config as 0.5, and no image was ever erased
    with pytest.raises(ArgumentError, match=f"random_erasing: 0.5 erases augmented batches only.*{dataset}"
                                            ".*add --augment"):
        train.Trainer(dict(dataset=dataset, device="cpu", augment=augment, random_erasing=0.5,
                           data_dir="/nonexistent"), log=lambda *_: None)
    code = cli.main(["train", "--dataset", dataset, "--random-erasing", "0.5", "--data-dir", "/nonexistent"]
                    + (["--no-augment"] if augment is False else []))
    assert code == 1


def test_simplecnn_widths_from_the_command_line_are_saved_resumed_and_shown(cifar_tarball, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="show needs the plot extra")
    checkpoint = tmp_path / "wide.npz"
    args = ["--dataset", "cifar10", "--model", "simplecnn", "--device", "cpu", "--batch-size", "16",
            "--limit-train", "32", "--limit-test", "16", "--data-dir", str(cifar_tarball), "--checkpoint", str(checkpoint)]
    assert train.main(args + ["--epochs", "1", "--widths", "8,12"]) == 0
    assert "training SimpleCNN (" in capsys.readouterr().out
    state, _, meta = load_checkpoint(checkpoint)
    assert meta["config"]["widths"] == [8, 12] and state["conv2.weight"].shape == (12, 8, 3, 3)
    assert "conv3.weight" not in state
    # resuming asks for the same widths, named in the error; given, the run continues
    with pytest.raises(CheckpointError, match=r"widths=\[8, 12\].*widths=\[32, 64, 128\]; pass --widths 8,12$"):
        train.Trainer(dict(dataset="cifar10", model="simplecnn", device="cpu", data_dir=str(cifar_tarball),
                           batch_size=16, checkpoint=str(checkpoint), resume=True), log=lambda *_: None)
    assert train.main(args + ["--epochs", "2", "--widths", "8,12", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert cli.main(["show", "--checkpoint", str(checkpoint), "--data-dir", str(cifar_tarball),
                     "--out", str(tmp_path / "pictures")]) == 0
    # a checkpoint written before the config had widths: they are read from its weights
    from gpuconv.checkpoint import save_checkpoint
    from gpuconv.models import SimpleCNN
    from gpuconv import optim
    old = tmp_path / "old.npz"
    model = SimpleCNN(3, 10, 32, widths=(8, 12))
    meta = dict(meta, config={k: v for k, v in meta["config"].items() if k != "widths"})
    save_checkpoint(old, model, optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), meta)
    with pytest.raises(CheckpointError, match=r"widths=\[8, 12\].*widths=\[32, 64, 128\]"):
        train.Trainer(dict(dataset="cifar10", model="simplecnn", device="cpu", data_dir=str(cifar_tarball),
                           batch_size=16, checkpoint=str(old), resume=True), log=lambda *_: None)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "lenet5", "--widths", "8,12"], "widths: sets SimpleCNN's block widths"),
    (["--model", "simplecnn", "--widths", "8,0"], "argument --widths: expected 1 to 4 positive ints"),
    (["--model", "simplecnn", "--widths", "1,2,3,4,5"], "argument --widths: expected 1 to 4 positive ints"),
    (["--model", "simplecnn", "--widths", "eight"], "argument --widths: expected 1 to 4 positive ints")])
def test_bad_widths_are_refused_naming_the_option(argv, expected, capsys):
    try:
        code = cli.main(["train", "--data-dir", "/nonexistent", "--dataset", "cifar10"] + argv)
    except SystemExit as exit:  # argparse's own usage error
        code = exit.code
    assert code in (1, 2)
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("widths", [[10**8], [8, 0], [1, 2, 3, 4, 5], [], "8,12", [8.0], [True]])
def test_bad_widths_in_a_python_config_are_refused_before_any_memory_is_taken(widths, cifar_tarball):
    # the limits of --widths hold for a config given from Python too: a width of 10**8 used to
    # reach NumPy and end in a MemoryError
    with pytest.raises(ArgumentError, match=r"widths: expected a list of 1 to 4 ints in \[1, 4096\]"):
        train.Trainer(dict(dataset="cifar10", model="simplecnn", device="cpu", data_dir=str(cifar_tarball),
                           widths=widths, limit_train=8, limit_test=8))


@pytest.mark.parametrize("model", ["simplecnn", "resnet8", "inception"])
@pytest.mark.parametrize("option", [("--activation", "tanh"), ("--pool", "avg")])
def test_activation_and_pool_are_refused_for_models_with_fixed_layers(model, option, capsys):
    """--activation and --pool choose LeNet-5's layers; the other models' are fixed, and a run that
    asked for tanh used to train with ReLU without a word."""
    code = cli.main(["train", "--data-dir", "/nonexistent", "--dataset", "cifar10", "--model", model, *option])
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert "activation, pool: choose LeNet-5's" in err and model in err and option[1] in err
    with pytest.raises(ArgumentError, match=f"--activation, --pool: choose LeNet-5's, and --model is {model}"):
        summary_main(["--model", model, "--dataset", "cifar10", *option])


def test_a_checkpoint_that_recorded_an_ignored_activation_still_resumes(cifar_tarball, tmp_path, capsys):
    """Before --activation and --pool were refused for models with fixed layers, a run could record
    activation='tanh' for a SimpleCNN that trained with ReLU: resuming it must not ask for tanh."""
    from gpuconv.checkpoint import save_checkpoint
    checkpoint = tmp_path / "old.npz"
    args = ["--dataset", "cifar10", "--model", "simplecnn", "--widths", "8", "--device", "cpu", "--batch-size", "16",
            "--limit-train", "32", "--limit-test", "16", "--data-dir", str(cifar_tarball), "--checkpoint", str(checkpoint)]
    assert train.main(args + ["--epochs", "1"]) == 0
    state, optim_state, meta = load_checkpoint(checkpoint)
    meta["config"].update(activation="tanh", pool="avg")  # as such a run wrote it
    from gpuconv.models import SimpleCNN
    from gpuconv import optim
    model = SimpleCNN(3, 10, 32, widths=(8,))
    model.load_state_dict(state)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt.load_state_dict(optim_state)
    save_checkpoint(checkpoint, model, opt, meta)
    capsys.readouterr()
    assert train.main(args + ["--epochs", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
