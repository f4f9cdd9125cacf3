"""A script's process ends with its status and everything said or written, without the interpreter's
teardown (engine.exiting.exit_now)."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.any_torch  # the interpreter's exit, not torch's

SCRIPT = """
import atexit, logging, sys, threading, time
from pathlib import Path
from engine.exiting import exit_now

out = Path(sys.argv[1])
logging.basicConfig(filename=out / "run.log", level=logging.INFO)
logging.getLogger("cbam").info("the last line of the log")
atexit.register(lambda: (out / "atexit.txt").write_text("exit handlers ran"))
threading.Thread(target=time.sleep, args=(60,)).start()  # a thread that would hold a normal exit for a minute
print("the last line of stdout", end="")  # still buffered: stdout is a pipe
exit_now(3)
"""


def test_exit_now_keeps_the_status_the_handlers_and_the_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "the last line of stdout"
    assert (tmp_path / "atexit.txt").read_text() == "exit handlers ran"
    assert "the last line of the log" in (tmp_path / "run.log").read_text()


def test_under_a_profiler_the_script_exits_as_usual(tmp_path):
    """cProfile writes its file after the script returns: exit_now leaves the exit to Python there."""
    script = tmp_path / "script.py"
    script.write_text("from engine.exiting import exit_now\nexit_now(0)\n")
    profile = tmp_path / "run.prof"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), str(script)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert profile.stat().st_size > 0
