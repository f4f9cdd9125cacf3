#!/usr/bin/env python
"""A short train.py run that counts how often its training steps make the host wait for the device.

    python scripts/count_syncs.py [--json FILE] -- experiment=quickstart trainer.limit_train_batches=40
    torchrun --nproc_per_node=1 scripts/count_syncs.py -- experiment=quickstart   # DDP, compiled on CUDA

The trainer that ``train.py`` builds from the same overrides runs in this process (under ``torchrun``: as
one rank of a DDP run, compiled by default on CUDA); every training step that does not log is counted
(on CUDA, torch's sync debug mode reports each synchronisation; on the CPU, the tensor calls that would
synchronise on CUDA). Prints, and writes as JSON: the steps counted, the synchronisations, images/s
and what the ``auto`` settings resolved to. The goal is zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from engine.config import register_configs, to_object
from engine.syncs import SyncCounter, count_step_syncs
from engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here (rank 0)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = run_dir
        trainer = Trainer(to_object(cfg), Path(run_dir), overrides=args.overrides)
        with SyncCounter(trainer.device) as counter:
            counted = count_step_syncs(trainer, counter)
            results = trainer.fit()
    if not trainer.main:
        return 0
    figures = {
        "overrides": args.overrides,
        "world_size": trainer.world_size,
        "ddp": isinstance(trainer.eager_model, torch.nn.parallel.DistributedDataParallel),
        "steps_counted": counted["steps"],
        "syncs": len(counter.calls),
        "syncs_per_step": len(counter.calls) / max(counted["steps"], 1),
        "sync_calls": sorted(set(counter.calls)),
        "train_img_per_s": results["train_img_per_s"] if results else None,
        "settings": trainer.settings(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
