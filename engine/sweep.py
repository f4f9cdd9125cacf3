"""Each run's outcome in its own folder (``status.json``), and a sweep that outlives its failing jobs.

In a multirun, a job that fails (bad input, a non-finite loss, a crash) writes
``{"status": "failed", "kind": ..., "reason": ...}`` and returns, so that Hydra goes on with the next
job; ``SweepReport`` (a Hydra callback, ``configs/hydra/default.yaml``) lists the failed jobs when the
sweep ends and ``exit_code`` makes the command exit non-zero. A single run keeps its one-message,
exit-code-2 behaviour.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from .distributed import global_rank
from .files import write_atomic

log = logging.getLogger("cbam")

STATUS_FILE = "status.json"
_failed: list[tuple[str, str]] = []  # (job folder, reason) of this process's failed sweep jobs


def write_status(run_dir: str | Path, status: str, kind: str | None = None, reason: str | None = None) -> None:
    """``status.json`` in the run folder: finished | stopped | failed, and for a failure its kind and reason.
    Written by rank 0 alone: the processes of a distributed run share its folder."""
    if global_rank() != 0:
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, **({"kind": kind, "reason": reason} if status == "failed" else {})}
    write_atomic(run_dir / STATUS_FILE, json.dumps(record, indent=2))


def read_status(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record_failure(run_dir: str | Path, kind: str, reason: str) -> None:
    """A sweep job failed: its status file, one log line, and the sweep's list of failures."""
    write_status(run_dir, "failed", kind, reason)
    _failed.append((str(run_dir), reason))
    log.error("job failed (%s): %s; the sweep goes on", kind, reason)


class SweepReport(Callback):
    """At the end of a multirun: which jobs failed, and why."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if _failed:
            lines = "\n".join(f"  {folder}: {reason}" for folder, reason in _failed)
            log.error("%d job(s) of the sweep failed (status.json in each folder):\n%s", len(_failed), lines)


def exit_code() -> int:
    """1 when a job of this process's sweep failed, else 0."""
    return 1 if _failed else 0
