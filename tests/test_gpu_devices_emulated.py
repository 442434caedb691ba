"""cuda:N for N > 0, shown without a GPU: emulation pretends to have two CUDA devices. Its stand-in
for cupy.cuda.Device records which device is current at every allocation and launch, and its arrays
refuse, as CuPy's do, to be read while another device is current. A step on cuda:1 must then
allocate and launch on device 1 alone, and the model, the optimizer's state and a resumed
checkpoint must follow the data's device."""
import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import checkpoint, optim
from gpuconv.backend import device_of, device_scope, get_array_module, to_device
from gpuconv.cuda import emulated_devices, emulation
from gpuconv.errors import CudaUnavailableError, DeviceMismatchError
from gpuconv.models import LeNet5


def _batch(n=4):
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 28, 28), dtype=np.float32), np.arange(n) % 10


def _step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_a_step_on_cuda_1_allocates_and_launches_only_on_device_1():
    images, labels = _batch()
    with emulation(devices=2):
        model = LeNet5(seed=0).to("cuda:1")
        optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = to_device(images, "cuda:1"), to_device(labels, "cuda:1")
        assert emulated_devices.current_id() == 0  # the caller never made device 1 current
        with emulated_devices.recording() as events:
            _step(model, optimizer, x, y)
        kinds = {kind for kind, *_ in events}
        assert {"alloc", "launch"} <= kinds
        launches = [e.what for e in events if e.kind == "launch"]
        assert any(name.startswith("conv2d_forward_direct") for name in launches) and "gemm" in launches
        on_other = [e for e in events if e.device != 1]
        assert not on_other, on_other[:5]
        assert {device_of(p.data) for p in model.parameters()} == {"cuda:1"}
        assert {device_of(p.grad) for p in model.parameters()} == {"cuda:1"}
        velocity = [v for v in optimizer.state["velocity"] if v is not None]
        assert velocity and {device_of(v) for v in velocity} == {"cuda:1"}


def test_the_stand_in_refuses_what_cupy_refuses():
    """Without device_scope, an op on cuda:1 arrays while device 0 is current fails, as on a GPU."""
    with emulation(devices=2):
        a = to_device(np.ones(3, np.float32), "cuda:1")
        with pytest.raises(DeviceMismatchError, match="cuda:1.*cuda:0 is the current device"):
            a + a
        with device_scope(a):
            assert device_of(a + a) == "cuda:1"


def test_get_array_module_compares_device_ids():
    with emulation(devices=2):
        a, b = to_device(np.ones(2), "cuda:0"), to_device(np.ones(2), "cuda:1")
        get_array_module(a, a)
        with pytest.raises(DeviceMismatchError, match="cuda:0, cuda:1"):
            get_array_module(a, b)
        moved = to_device(a, "cuda:1")
        assert device_of(moved) == "cuda:1" and moved is not a and device_of(a) == "cuda:0"
        assert to_device(moved, "cuda:1") is moved
        with pytest.raises(CudaUnavailableError, match="indices 0..1"):
            gpuconv.parse_device("cuda:2")


def test_model_optimizer_state_and_resume_follow_the_datas_device(tmp_path):
    images, labels = _batch()
    with emulation(devices=2):
        model = LeNet5(seed=0).to("cuda:1")
        optimizer = optim.Adam(model.parameters(), lr=1e-3)
        _step(model, optimizer, to_device(images, "cuda:1"), to_device(labels, "cuda:1"))
        path = tmp_path / "run.npz"
        checkpoint.save_checkpoint(path, model, optimizer, {"epoch": 0})

        model_state, optim_state, _ = checkpoint.load_checkpoint(path)
        resumed = LeNet5(seed=1).to("cuda:1")
        resumed_optimizer = optim.Adam(resumed.parameters(), lr=1e-3)
        with emulated_devices.recording() as events:
            resumed.load_state_dict(model_state)
            resumed_optimizer.load_state_dict(optim_state)
        assert events and {e.device for e in events} == {1}
        assert {device_of(p.data) for p in resumed.parameters()} == {"cuda:1"}
        for name in ("m", "v"):
            assert {device_of(a) for a in resumed_optimizer.state[name]} == {"cuda:1"}
        for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
            np.testing.assert_array_equal(a, b, err_msg=key)


def test_a_step_on_cuda_1_matches_the_cpu():
    images, labels = _batch()
    cpu_model = LeNet5(seed=0)
    cpu_loss = _step(cpu_model, optim.SGD(cpu_model.parameters(), lr=0.1), images, labels).item()
    with emulation(devices=2):
        model = LeNet5(seed=0).to("cuda:1")
        loss = _step(model, optim.SGD(model.parameters(), lr=0.1), to_device(images, "cuda:1"),
                     to_device(labels, "cuda:1"))
        assert loss.item() == pytest.approx(cpu_loss, rel=1e-5)
        for (name, a), b in zip(cpu_model.state_dict().items(), model.state_dict().values()):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name)
