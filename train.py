#!/usr/bin/env python
"""Train a classifier: ``python train.py model=resnet50 attention=cbam data=imagenet data.root=/data``.

See ``configs/train.yaml`` for every option and ``configs/experiment/`` for named recipes.
"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cbam.config import register_configs, to_container
from cbam.errors import UserError

register_configs()
log = logging.getLogger("cbam")

if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 writes the run's config and log files
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from cbam.trainer import StopNow, StopRequest, Trainer  # after Hydra has parsed the command line: fast --help

    config = to_container(cfg)
    # Installed before the trainer loads data and builds the model, so that a signal then stops the run too.
    with StopRequest(config["trainer"]["stop_grace_s"]) as stop:
        try:
            results = Trainer(config, HydraConfig.get().runtime.output_dir, stop).run()
        except StopNow:
            log.warning("stopped before training began; nothing to save")
            return None
        except UserError as exc:
            log.error("error: %s", exc)
            sys.exit(2)
    # The return value is what a Hydra sweeper optimises.
    return None if results is None else results["top1"]


if __name__ == "__main__":
    main()
