"""SIGTERM / SIGINT end a run within its grace period at any moment: between steps (the checkpoint
resumes bit-identically, tests/test_reliability.py), and while compiling, evaluating or loading data."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.stopping import StopNow, StopRequest
from helpers import ROOT, TINY


def _signal_soon(delay: float, sig=signal.SIGTERM) -> None:
    threading.Timer(delay, os.kill, args=(os.getpid(), sig)).start()


def test_work_that_outlasts_the_grace_period_is_interrupted():
    with StopRequest(grace_s=0.3) as stop:
        _signal_soon(0.1)
        tic = time.monotonic()
        with pytest.raises(StopNow):
            time.sleep(10)  # a blocking wait, as in a compiler's worker pool
        assert stop.requested and time.monotonic() - tic < 2


def test_a_step_that_ends_within_the_grace_period_is_not_interrupted():
    with StopRequest(grace_s=5) as stop:
        _signal_soon(0.05)
        time.sleep(0.3)  # the step ends; the loop then sees stop.requested
        assert stop.requested and not stop.overdue


def test_critical_section_finishes_before_the_stop():
    done = []
    with StopRequest(grace_s=0.1) as stop:
        _signal_soon(0.05)
        with pytest.raises(StopNow):
            with stop.critical():
                time.sleep(0.5)  # the signal and the grace period pass in here
                done.append(True)
        assert done == [True]


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_a_cold_compile_ends_the_run_within_30s(tmp_path):
    """The fused kernels compiling from an empty cache (tens of seconds here) when SIGTERM arrives."""
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CBAM_KERNEL_CACHE": str(tmp_path / "kernels")}
    env = dict(os.environ, PYTHONUNBUFFERED="1", CBAM_FUSED_KERNELS="compiled", **cold)
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "experiment=smoke", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 120
    while not any("compiling its kernels" in line for line in lines):
        line = proc.stdout.readline()
        assert (line or proc.poll() is None) and time.time() < deadline, "".join(lines)
        lines.append(line)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    elapsed = time.time() - sent
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert elapsed < 30, f"exit took {elapsed:.1f} s:\n{text}"
    assert "stopped in the middle of work" in text or "stopped at epoch" in text, text
    assert not (tmp_path / "run" / "results.json").exists()
