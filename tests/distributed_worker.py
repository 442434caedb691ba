"""One rank of the scenarios tests/test_distributed.py launches with `mpiexec -n 2`.

    python tests/distributed_worker.py SCENARIO [BACKEND]

equal:  N ranks at per-rank batch B for a few steps of SGD (Nesterov momentum, weight decay) and of
        Adam end with the weights one process reaches at batch N*B (computed on rank 0 beside the
        run), every rank holds the same weights, and sharded evaluation equals the whole one; also
        eager (not compiled) with small buckets, which start during backward, and with gradients
        accumulated over two backward passes per step (the first under no_sync() or not).
raise, die, hang: rank 1 raises, SIGKILLs itself, or sleeps at its third step; the others must stop.
raise-all: every rank raises at its third step (as a NaN loss would make them): all stop at once.
train-emulated ARGS...: `python -m gpuconv train ARGS` under kernel emulation with 2 pretend GPUs
        (gpuconv.cuda.emulation(devices=2)): rank r on cuda:r, NCCL's code path through the stand-in.
"""
import contextlib
import os
import signal
import sys
import time

import numpy as np

import gpuconv.distributed as dist
from gpuconv import compile as compile_model
from gpuconv import functional as F
from gpuconv import get_cpu_workers, optim, set_cpu_workers, to_device
from gpuconv.data import ArrayDataset, DataLoader
from gpuconv.models import LeNet5
from gpuconv.train import evaluate

B, SAMPLES = 8, 64


def data():
    rng = np.random.default_rng(123)
    return ArrayDataset(rng.integers(0, 256, (SAMPLES, 28, 28), dtype=np.uint8), rng.integers(0, 10, SAMPLES))


def make_optimizer(kind, model):
    if kind == "sgd":
        return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)


def train(net, optimizer, loader, scenario=None, rank=0, device="cpu", micro=1, no_sync=False):
    for step, (x, y) in enumerate(loader.batches(0)):
        x, y = to_device(x, device), to_device(y, device)
        if micro > 1:  # gradients accumulated over `micro` backward passes, then one step
            optimizer.zero_grad()
            for part in range(micro):
                rows = slice(part * len(y) // micro, (part + 1) * len(y) // micro)
                quiet = no_sync and part < micro - 1
                with net.no_sync() if quiet else contextlib.nullcontext():
                    (F.cross_entropy(net(x[rows]), y[rows]) * (1.0 / micro)).backward()
            optimizer.step()
            continue
        if scenario == "raise-all" and step == 2:
            raise ValueError(f"rank {rank} booms at step 3")
        if scenario and rank == 1 and step == 2:
            if scenario == "raise":
                raise ValueError("boom at step 3")
            if scenario == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if scenario == "hang":
                time.sleep(600)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main():
    scenario = sys.argv[1]
    if scenario == "train-emulated":
        from gpuconv.cuda import emulation
        from gpuconv.train import main as train_main
        with emulation(devices=2):
            code = train_main(sys.argv[2:])
            if dist.is_initialized():
                print(f"RANK {dist.get_rank()} ON {dist.group().device} OVER {dist.group().backend}", flush=True)
            return code
    backend = sys.argv[2] if len(sys.argv) > 2 else "mpi"
    set_cpu_workers(0)
    group = dist.init(backend=backend, device="cuda" if backend == "nccl" else "cpu")
    device = group.device
    rank, size = group.rank, group.world_size
    dataset = data()
    if scenario != "equal":
        model = LeNet5(seed=0)
        optimizer = make_optimizer("sgd", model)
        net = dist.DistributedDataParallel(compile_model(model), optimizer)
        train(net, optimizer, DataLoader(dataset, B, shuffle=True, seed=1, rank=rank, world_size=size),
              scenario, rank)
        print(f"rank {rank}: finished without noticing", flush=True)
        return
    os.environ.pop("GPUCONV_CPU_WORKERS", None)  # what train --distributed does to the executor:
    workers = dist.fit_cpu(group)                # its share of the cores, one less for the caller
    assert get_cpu_workers() == workers == dist.cpu_share(group)[0], (get_cpu_workers(), workers)
    set_cpu_workers(0)
    worst = {}
    # (name, optimizer, compiled, bucket bytes, backward passes per step)
    for name, kind, compiled, bucket_bytes, micro in [("sgd", "sgd", True, dist.BUCKET_BYTES, 1),
                                                      ("adam", "adam", True, dist.BUCKET_BYTES, 1),
                                                      ("sgd-eager-buckets", "sgd", False, 32 << 10, 1),
                                                      ("sgd-accumulated", "sgd", False, 32 << 10, 2),
                                                      ("sgd-no-sync", "sgd", False, 32 << 10, 2)]:
        model = LeNet5(seed=rank).to(device)  # rank 1 starts elsewhere: the broadcast must fix that
        optimizer = make_optimizer(kind, model)
        net = dist.DistributedDataParallel(compile_model(model) if compiled else model, optimizer,
                                           bucket_bytes=bucket_bytes)
        train(net, optimizer, DataLoader(dataset, B, shuffle=True, seed=1, rank=rank, world_size=size),
              device=device, micro=micro, no_sync=name == "sgd-no-sync")
        steps = SAMPLES // (B * size)
        if name == "sgd-eager-buckets":  # eager backward: buckets left while later layers' ran
            assert len(net.buckets) > 2 and net.early == steps * len(net.buckets) and net.restarts == 0, \
                (len(net.buckets), net.early, net.restarts)
        if name == "sgd-accumulated":  # the second backward reached started buckets: reduced again
            assert net.restarts == steps, (net.restarts, steps)
        if name == "sgd-no-sync":  # the first backward under no_sync(): each bucket sent once, early
            assert net.restarts == 0 and net.early == steps * len(net.buckets), (net.restarts, net.early)
        flat = np.concatenate([p.numpy().ravel() for p in model.parameters()]).astype(np.float64)
        spread = group.sum_host(flat) / size - flat  # zero when every rank holds the same weights
        assert np.abs(spread).max() == 0, f"{name}: the ranks' weights differ by {np.abs(spread).max()}"
        images, labels = dataset.get_batch(np.arange(SAMPLES))
        shard = evaluate(net, images, labels, batch_size=16, group=group)
        assert shard == evaluate(model, images, labels, batch_size=16), "sharded evaluation differs"
        if rank == 0:
            reference = LeNet5(seed=0).to(device)
            ref_optimizer = make_optimizer(kind, reference)
            train(compile_model(reference), ref_optimizer, DataLoader(dataset, B * size, shuffle=True, seed=1),
                  device=device)
            for (key, p), q in zip(model.named_parameters(), reference.parameters()):
                np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=2e-5, atol=2e-6, err_msg=f"{name} {key}")
                worst[name] = max(worst.get(name, 0.0), float(np.abs(p.numpy() - q.numpy()).max()))
    if backend == "nccl-standin":
        calls = group.transport.backend.calls
        assert ("all_reduce", "float32", 61706 + 1) in calls, calls[:5]
        assert any(c[0] == "broadcast" for c in calls)
    if rank == 0:
        print(f"EQUAL {size} ranks, {backend}: largest difference from one process {worst}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
