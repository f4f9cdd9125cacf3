"""Ending a script's process without the interpreter's teardown."""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_now(status: int) -> NoReturn:
    """End the process with ``status`` once its exit handlers have run (logging's flush and close,
    multiprocessing's clean-up of worker processes, ...), without the interpreter's teardown: it frees every
    module and object one by one, seconds of CPU time once torch, timm and Hydra are loaded, after the run's
    files are written and closed. Call it where the script is done; threads still alive (a compiler's idle
    pool) end with the process. Under a profiler, a coverage tracer or a debugger it exits as usual: they
    write their results after the script returns."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(status)
