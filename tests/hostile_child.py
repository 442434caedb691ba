"""Running a hostile scenario in a child process, for tests/test_executor_hostile.py and
tests/test_ops_cpu_hostile.py: a fresh interpreter with one worker (GPUCONV_CPU_WORKERS=1) under a
hard timeout, whose last "RESULT <json>" line is the scenario's outcome. A child that hangs dumps
its threads' stacks (faulthandler, armed by the script from HOSTILE_HANG_S) and the test fails
saying "hang"; a dead thread, a non-zero exit or no result fails it too."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Helpers every child script gets after its prelude.
CHILD_HELPERS = r'''
def wait_or_kill(pid, seconds, poll=0.02):
    """A forked child's wait status once it exits, or None if it is still running after `seconds`
    (it is then killed and reaped)."""
    import os as _os, signal as _signal, time as _time
    deadline = _time.monotonic() + seconds
    while _time.monotonic() < deadline:
        done, status = _os.waitpid(pid, _os.WNOHANG)
        if done:
            return status
        _time.sleep(poll)
    _os.kill(pid, _signal.SIGKILL)
    _os.waitpid(pid, 0)
    return None


def interrupted_at(function_name, line_start, call):
    """call() with a KeyboardInterrupt raised at the first line of a function named `function_name`
    whose code starts with `line_start`, where a signal handler's exception could arrive ->
    (whether it fired, whether call() was interrupted)."""
    import linecache as _linecache, sys as _sys
    state = {"fired": False}

    def local(frame, event, arg):
        if event == "line" and not state["fired"]:
            if _linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip().startswith(line_start):
                state["fired"] = True
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_name == function_name else None

    _sys.settrace(tracer)
    try:
        call()
        return state["fired"], False
    except KeyboardInterrupt:
        return state["fired"], True
    finally:
        _sys.settrace(None)
'''


def run_child(tmp_path, prelude, body, hang_s, name, **environment):
    """prelude + body (dedented) as tmp_path/<name>.py in a fresh interpreter -> its RESULT dict.
    `environment` adds variables to the child's."""
    script = tmp_path / f"{name}.py"
    script.write_text(prelude + "\n" + CHILD_HELPERS + "\n" + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GPUCONV_EMULATE")}
    env.update(GPUCONV_CPU_WORKERS="1", HOSTILE_HANG_S=str(hang_s), PYTHONFAULTHANDLER="1", **environment,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=hang_s + 20, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"hang: {name} did not finish in {hang_s + 20} s (killed)\n"
                    f"stdout: {expired.stdout}\nstderr: {expired.stderr}")
    if "Timeout (0:" in proc.stderr:
        pytest.fail(f"hang: {name} did not finish in {hang_s} s; the stacks of its threads:\n"
                    f"{proc.stderr[-6000:]}\nstdout: {proc.stdout[-2000:]}")
    assert "Exception in thread" not in proc.stderr, f"a thread of {name} died:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{name} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])
