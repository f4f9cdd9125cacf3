#!/usr/bin/env python
"""Train a classifier: ``python train.py model=resnet50 attention=cbam data=imagenet data.root=/data``.

See ``configs/train.yaml`` for every option and ``configs/experiment/`` for named recipes. Each run
folder gets a ``status.json`` (finished, stopped or failed, with the reason). A single run that fails
on bad input prints one message and exits 2; in a multirun (``-m``) a failing job is recorded and the
sweep goes on, and the command exits 1 at the end if any job failed.
"""

import logging
import signal
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cbam.errors import RunFolderInUse, UserError
from engine import sweep
from engine.config import register_configs, swept_overrides, to_object
from engine.distributed import global_rank
from engine.exiting import exit_now

register_configs()
log = logging.getLogger("cbam")

if global_rank() != 0:  # only rank 0 writes config and log files
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from engine.stopping import PREEMPTION_SIGNALS, StopNow, StopRequest  # after Hydra parsed the command line
    from engine.trainer import Trainer

    hydra_cfg = HydraConfig.get()
    run_dir, in_sweep = hydra_cfg.runtime.output_dir, hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)  # what this run changes, shown in TensorBoard's HParams tab
    if in_sweep:  # a sweep job: what differs between the sweep's jobs
        overrides = swept_overrides(overrides)
    try:
        config = to_object(cfg)  # checks every value's range
    except UserError as exc:
        return _failed(run_dir, in_sweep, "bad input", exc)
    if config.dry_run:  # which runs a sweep launches, each with its folder and config, before any training
        what = " ".join(overrides) or "as configured"
        log.info("dry run: %s in %s (%s); nothing trained", config.name, run_dir, what)
        return None
    # Installed before the trainer loads data and builds the model, so that a signal then stops the run too.
    with StopRequest(config.trainer.stop_grace_s) as stop:
        try:
            results = Trainer(config, run_dir, stop, overrides).fit()
        except StopNow:
            stop.settle()
            log.warning("stopped before training began; nothing to save")
            results = None
        except RunFolderInUse as exc:  # another run's folder: write nothing there
            if in_sweep:
                sweep.record_failure(run_dir, "bad input", str(exc))
                return None
            log.error("error: %s", exc)
            sys.exit(2)
        except UserError as exc:
            return _failed(
                run_dir, in_sweep, "non-finite" if type(exc).__name__ == "NonFiniteError" else "bad input", exc
            )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if in_sweep:
                log.error("%s", traceback.format_exc())
                sweep.record_failure(run_dir, "crash", reason)
                return None
            sweep.write_status(run_dir, "failed", "crash", reason)
            raise
    sweep.write_status(run_dir, "stopped" if results is None else "finished")
    if stop.signum in PREEMPTION_SIGNALS and global_rank() == 0:  # SLURM's warning: requeue
        from engine.distributed import requeue_slurm_job

        requeued = requeue_slurm_job()
        log.warning(
            "%s: %s",
            signal.Signals(stop.signum).name,
            "job requeued; it continues with resume=auto"
            if requeued
            else "not requeued (no SLURM job, or scontrol refused)",
        )
    if results is None and in_sweep and hydra_cfg.launcher._target_.endswith(".BasicLauncher"):
        # Hydra's local launcher runs the jobs one after another in this process: a stop ends the sweep, as it
        # ends a single run, rather than the job alone (the next one would start at once).
        log.warning("the sweep stops with this job: the jobs after it were not started")
        sys.exit(sweep.exit_code())
    # The return value is what a Hydra sweeper optimises.
    return None if results is None else results["top1"]


def _failed(run_dir: str, in_sweep: bool, kind: str, exc: Exception) -> None:
    """A run refused or stopped by the user's input: recorded for the sweep (which goes on), or one message
    and exit status 2."""
    if in_sweep:
        sweep.record_failure(run_dir, kind, str(exc))
        return None
    sweep.write_status(run_dir, "failed", kind, str(exc))
    log.error("error: %s", exc)
    sys.exit(2)


if __name__ == "__main__":
    main()
    exit_now(sweep.exit_code())
