"""Issue 17: a training step captured as a CUDA graph (gpuconv.cuda.graph), shown without a GPU. Under
kernel emulation the step is recorded once, captured (each device op kept as a node and not run, as
CUDA's stream capture does) and replayed by running the nodes alone; after the first call it
allocates nothing and reads nothing back to the host, and it gives the eager step's numbers bit for
bit. What a graph cannot hold runs eagerly."""
import collections
import dataclasses

import numpy as np
import pytest

from gpuconv import functional as F
from gpuconv import optim, train
from gpuconv.backend import to_device
from gpuconv.cuda import emulated_devices, emulation
from gpuconv.cuda.graph import StaticStep
from gpuconv.data import MNIST, registry
from gpuconv.errors import ArgumentError
from gpuconv.models import LeNet5, SimpleCNN

CASES = {  # model, optimizer, batch shape
    "lenet5-sgd": (lambda: LeNet5(seed=0), lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                                weight_decay=5e-4), (8, 1, 28, 28)),
    "simplecnn-adam": (lambda: SimpleCNN(3, 10, 16, widths=(4, 8), seed=0),  # BatchNorm
                       lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=1e-4), (4, 3, 16, 16)),
}


def _setup(case, **step_kwargs):
    make_model, make_optimizer, shape = CASES[case]
    model = make_model().to("cuda:0")
    optimizer = make_optimizer(model.parameters())

    def forward(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return model, optimizer, StaticStep(forward, optimizer, model, **step_kwargs), shape


def _batches(shape, count, seed=0):
    rng = np.random.default_rng(seed)
    return [(to_device(rng.random(shape, dtype=np.float32), "cuda:0"), to_device(rng.integers(0, 10, shape[0]),
                                                                                 "cuda:0")) for _ in range(count)]


def _state(model, optimizer):
    """Everything a step changes, as host bytes: weights, BatchNorm buffers, optimizer state."""
    arrays = [p.data for p in model.parameters()] + [m._buffers[n] for _, m, n in model.named_buffers()]
    return [np.asarray(a).tobytes() for a in arrays] + [
        np.asarray(v).tobytes() for _, v in sorted(optimizer.state_dict().items())]


def _run(case, shapes, graph, lrs=None, **step_kwargs):
    """Steps on batches of `shapes` -> (losses, state, events of each call, the StaticStep)."""
    model, optimizer, step, shape = _setup(case, **step_kwargs)
    losses, calls = [], []
    for index, batch_shape in enumerate(shapes):
        x, y = _batches(batch_shape or shape, 1, seed=index)[0]
        optimizer.lr = (lrs or {}).get(index, optimizer.lr)  # a schedule: the replay reads the new lr
        with emulated_devices.recording() as events:
            loss, _ = step(x, y) if graph else step.eager(x, y)
        losses.append(np.asarray(loss).tobytes())
        calls.append(events)
    return losses, _state(model, optimizer), calls, step


def _kinds(events):
    return collections.Counter(e.kind for e in events)


@pytest.mark.parametrize("case", sorted(CASES))
def test_after_the_first_call_the_step_allocates_nothing_and_reads_nothing_back(case):
    with emulation(devices=1):
        _, _, eager_calls, _ = _run(case, [None] * 3, graph=False)
        _, _, calls, step = _run(case, [None] * 5, graph=True)
    assert _kinds(calls[0])["alloc"] > 0  # the recording step allocates its buffers once
    for events in calls[1:]:
        kinds = _kinds(events)
        assert kinds["alloc"] == 0 and kinds["read"] == 0, [e for e in events if e.kind in ("alloc", "read")][:5]
        # the optimizer's hyperparameters (8 values) are the one host-to-device copy, before the launch
        assert [(e.what, e.nbytes) for e in events if e.kind == "write"] == [("set", 8 * 4)]
    assert step.replays == 3 and step.eager_reason is None
    # the replay launches the eager step's kernels, in its order (and the two input copies besides)
    launches = [[e.what for e in events if e.kind == "launch"] for events in (eager_calls[-1], calls[-1])]
    assert launches[0] == launches[1] and len(launches[0]) > 10
    ops = [[e.what for e in events if e.kind == "op"] for events in (eager_calls[-1], calls[-1])]
    assert ops[1] == ["copy", "copy"] + ops[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_replayed_steps_equal_the_eager_steps_bit_for_bit(case):
    """Five steps with the lr changed twice: losses, weights, BatchNorm running statistics and batch
    count, and the optimizer's state (Adam's step count) are the eager run's, byte for byte."""
    lrs = {2: 0.02, 4: 0.005}
    with emulation(devices=1):
        eager = _run(case, [None] * 5, graph=False, lrs=lrs)
        graph = _run(case, [None] * 5, graph=True, lrs=lrs)
    assert graph[3].replays == 3
    assert graph[0] == eager[0]
    assert graph[1] == eager[1]


def test_a_replay_runs_no_python_model_code():
    with emulation(devices=1):
        model, optimizer, step, shape = _setup("lenet5-sgd")
        batches = _batches(shape, 3)
        step(*batches[0])
        step(*batches[1])

        def forward(*_):
            raise AssertionError("the replay ran the model's Python")
        step.forward = forward
        loss, logits = step(*batches[2])
        assert np.isfinite(np.asarray(loss)) and logits.shape == (8, 10)


def test_a_batch_of_another_shape_runs_eagerly_and_the_graph_goes_on():
    shapes = [None, None, (3, 1, 28, 28), None, None]  # a partial batch between replays
    with emulation(devices=1):
        eager = _run("lenet5-sgd", shapes, graph=False)
        graph = _run("lenet5-sgd", shapes, graph=True)
    assert graph[0] == eager[0] and graph[1] == eager[1]
    calls = graph[2]
    assert _kinds(calls[2])["alloc"] > 0  # eager: CuPy's pool, as without a graph
    assert _kinds(calls[3])["alloc"] == _kinds(calls[4])["alloc"] == 0
    assert graph[3].replays == 2 and graph[3].eager_reason is None


def test_a_step_that_reads_back_to_the_host_is_not_captured_and_runs_eagerly():
    """float(loss) in the step: fine eagerly, refused by the capture (as CUDA refuses a sync while
    capturing); the capture ran nothing, so that step and the rest run eagerly with the same numbers."""
    logged = []
    with emulation(devices=1):
        results = []
        for graph in (False, True):
            model, optimizer, step, shape = _setup("lenet5-sgd", log=logged.append)
            forward = step.forward

            def reading(x, y, forward=forward):
                loss, logits = forward(x, y)
                float(loss.data)  # a host sync
                return loss, logits
            step.forward = reading
            losses = [np.asarray((step if graph else step.eager)(x, y)[0]).tobytes() for x, y in _batches(shape, 4)]
            results.append((losses, _state(model, optimizer)))
    assert results[1] == results[0]
    assert len(logged) == 1 and "capturing the step failed (CaptureError: a captured step cannot read" in logged[0]
    assert step.eager_reason is not None and step.pool is None and step.replays == 0


def test_dropout_runs_eagerly_with_the_reason_said_once():
    logged = []
    with emulation(devices=1):
        model = SimpleCNN(3, 10, 16, widths=(4, 8), seed=0, dropout=0.5).to("cuda:0")
        optimizer = optim.SGD(model.parameters(), lr=0.05)
        step = StaticStep(lambda x, y: (lambda lg: (F.cross_entropy(lg, y), lg))(model(x)), optimizer, model,
                          log=logged.append)
        for x, y in _batches((4, 3, 16, 16), 3):
            step(x, y)
    assert logged == ["cuda graph: the model has dropout, and a graph would replay one mask every step; "
                      "this run's steps stay eager"]
    assert step.graph is None and step.replays == 0


def test_weights_loaded_after_the_capture_send_the_steps_back_to_eager():
    """load_state_dict gives the parameters new arrays, which the graph does not read: replaying
    would train the old buffers, so the step runs eagerly, with the loaded weights."""
    logged = []
    with emulation(devices=1):
        model, optimizer, step, shape = _setup("lenet5-sgd", log=logged.append)
        batches = _batches(shape, 4)
        for x, y in batches[:3]:
            step(x, y)
        assert step.replays == 1
        saved = {k: np.asarray(v) for k, v in LeNet5(seed=1).state_dict().items()}
        model.load_state_dict(saved)
        reference = LeNet5(seed=1).to("cuda:0")
        expected = F.cross_entropy(reference(batches[3][0]), batches[3][1]).data
        loss, _ = step(*batches[3])
    assert np.asarray(loss).tobytes() == np.asarray(expected).tobytes()
    assert step.replays == 1 and len(logged) == 1 and "changed since the capture" in logged[0]


# ----- the Trainer -----

class _TinyMNIST(MNIST):
    """40 random images a split, made here instead of read (a synthetic dataset fails MNIST's checksums)."""

    def __init__(self, split="train", data_dir=None, limit=None):
        rng = np.random.default_rng(0 if split == "train" else 1)
        images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40, dtype=np.uint8)
        super(MNIST, self).__init__(split, images, labels, limit)


def test_the_trainer_with_cuda_graph_trains_an_epoch_with_the_eager_numbers(tmp_path, monkeypatch):
    """40 images in batches of 16: two replayed-path steps and a partial batch of 8 (eager), two
    epochs (the cosine schedule changes the lr between them). The history and the checkpoint match."""
    monkeypatch.setitem(registry.DATASETS, "mnist", dataclasses.replace(registry.DATASETS["mnist"], cls=_TinyMNIST))
    config = dict(device="cuda:0", epochs=2, batch_size=16, lr=0.05)
    runs, logged = {}, []
    with emulation(devices=1):
        for graph in (False, True):
            checkpoint = tmp_path / f"run-{graph}.npz"
            trainer = train.Trainer(dict(config, cuda_graph=graph, checkpoint=str(checkpoint)), log=logged.append)
            trainer.fit()
            history = [{k: v for k, v in record.items() if k not in ("seconds", "images_per_s")}
                       for record in trainer.history]
            runs[graph] = (history, _state(trainer.model, trainer.optimizer), trainer.step)
            if graph:
                assert trainer.graph_step.replays == 2 and trainer.graph_step.eager_reason is None
    assert runs[True] == runs[False]
    assert not [line for line in logged if line.startswith("cuda graph")]
    with np.load(tmp_path / "run-True.npz") as a, np.load(tmp_path / "run-False.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            if "meta" not in key:
                assert a[key].tobytes() == b[key].tobytes(), key


def test_cuda_graph_is_refused_on_the_cpu():
    with pytest.raises(ArgumentError, match="cuda_graph: --cuda-graph captures .* trains on cpu; pass --device cuda"):
        train.Trainer(dict(device="cpu", cuda_graph=True, limit_train=8, limit_test=8), log=lambda *_: None)
    assert train.build_parser().parse_args(["--cuda-graph"]).cuda_graph is True
    assert train.build_parser().parse_args([]).cuda_graph is False


def test_the_cupy_names_the_capture_uses_exist():
    """The GPU path (graph._capture_cuda, StepPool.malloc) cannot run here; a renamed CuPy API fails
    in this test instead of on the first GPU."""
    cupy = pytest.importorskip("cupy")
    import inspect
    for owner, name in ((cupy.cuda, "Stream"), (cupy.cuda, "Graph"), (cupy.cuda, "using_allocator"),
                        (cupy, "get_default_memory_pool"), (cupy.cuda.Stream, "begin_capture"),
                        (cupy.cuda.Stream, "end_capture"), (cupy.cuda.Graph, "launch"),
                        (cupy.cuda.MemoryPool, "malloc")):
        assert hasattr(owner, name), f"{owner.__name__}.{name}"
    assert "non_blocking" in inspect.signature(cupy.cuda.Stream).parameters
    assert "stream" in (cupy.cuda.Graph.launch.__doc__ or "")


@pytest.mark.parametrize("change", ["weight_decay", "nesterov", "adam_weight_decay"])
def test_optimizer_settings_the_graph_was_captured_without_send_the_steps_back_to_eager(change):
    """The fused launch's flags (momentum, Nesterov, weight decay on or off) are captured with it;
    the hyperparameters' values are written each replay, the flags are not. Weight decay switched
    on (or Nesterov) after the capture must not be dropped silently: the steps run eagerly and
    give the eager run's numbers."""
    make = (lambda ps: optim.Adam(ps, lr=1e-2)) if change == "adam_weight_decay" else (
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9))
    name, value = ("nesterov", True) if change == "nesterov" else ("weight_decay", 1e-2)
    results, logged = [], []
    with emulation(devices=1):
        for graph in (False, True):
            model = LeNet5(seed=0).to("cuda:0")
            optimizer = make(model.parameters())
            step = StaticStep(lambda x, y: (lambda lg: (F.cross_entropy(lg, y), lg))(model(x)), optimizer, model,
                              log=logged.append)
            for index, (x, y) in enumerate(_batches((8, 1, 28, 28), 5)):
                if index == 3:  # after the capture (call 2) and one replay
                    setattr(optimizer, name, value)
                (step if graph else step.eager)(x, y)
            results.append(_state(model, optimizer))
    assert results[1] == results[0]
    assert step.replays == 1 and len(logged) == 1 and "optimizer" in logged[0], logged


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_cuda_graph_with_distributed_is_refused_before_mpi_starts(device, monkeypatch):
    """The combination is refused whatever the device, before MPI is set up: on the CPU the advice
    used to be "pass --device cuda", which the next run then refused for --distributed."""
    def init(**_):
        raise AssertionError("distributed.init ran before the refusal")
    monkeypatch.setattr(train.distributed, "init", init)
    with emulation(devices=1), pytest.raises(ArgumentError, match="--cuda-graph with --distributed is not supported"):
        train.Trainer(dict(device=device, cuda_graph=True, distributed=True, limit_train=8, limit_test=8),
                      log=lambda *_: None)


def test_a_first_batch_smaller_than_the_next_ones_is_not_the_one_captured():
    """A run resumed at its last, partial batch calls the step with that batch first: the recording
    made of it gives way to the full batches that follow, which are captured and replayed (it used to
    stay, so the full batches all ran eagerly and only the partial ones were captured)."""
    shapes = [(3, 1, 28, 28), None, None, None, None, (3, 1, 28, 28), None]
    with emulation(devices=1):
        eager = _run("lenet5-sgd", shapes, graph=False)
        graph = _run("lenet5-sgd", shapes, graph=True)
    assert graph[0] == eager[0] and graph[1] == eager[1]
    assert graph[3].replays == 3 and graph[3].eager_reason is None
    assert graph[3].inputs[0].shape == (8, 1, 28, 28)


def test_a_layer_setting_changed_after_the_capture_sends_the_steps_back_to_eager():
    """BatchNorm's momentum is a kernel argument the capture baked in: changed after it (found by a
    hostile test: 0.1 -> 0.5 at step 3 differed from eager), the steps run eagerly, with eager's
    numbers, and the log says why once."""
    results, logged = [], []
    with emulation(devices=1):
        for graph in (False, True):
            model, optimizer, step, shape = _setup("simplecnn-adam", log=logged.append)
            for index, (x, y) in enumerate(_batches(shape, 5)):
                if index == 3:  # after the capture (call 2) and one replay
                    model.bn1.momentum = 0.5
                (step if graph else step.eager)(x, y)
            results.append(_state(model, optimizer))
    assert results[1] == results[0]
    assert step.replays == 1 and len(logged) == 1 and "settings" in logged[0], logged
