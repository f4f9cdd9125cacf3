#!/usr/bin/env python
"""Evaluate a checkpoint on its validation split: ``python eval.py checkpoint=runs/.../last.pt``.

The model and data are rebuilt from the config stored in the checkpoint. Prints top-1/top-5 accuracy
and error, params, GMACs and images/s, and writes them as JSON (``output=``, default beside the
checkpoint as ``eval_<name>.json``).
"""

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cbam.errors import UserError
from engine.config import register_configs
from engine.exiting import exit_now

register_configs("eval")  # its only config: the EvalConfig schema (no YAML folder, so --help lists no groups)
log = logging.getLogger("cbam")
# The console only, nothing written into the current folder (JSON beside the checkpoint unless output=).
sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job.chdir=false"]
USAGE = (
    "python eval.py checkpoint=PATH [ema=true] [batch_size=N] [device=auto|cpu|cuda] [data_root=PATH] "
    "[output=FILE.json]"
)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    import torch

    from analysis.profile import count_gmacs, count_params
    from engine import checkpoint as ckpt_io
    from engine.config import from_dict
    from engine.data import build_batches
    from engine.device import amp_dtype, resolve_device, set_tf32
    from engine.evaluation import evaluate
    from engine.network import build_model

    path = Path(cfg.checkpoint)
    ckpt = ckpt_io.load(path)
    config = from_dict(ckpt["config"])  # as the run was configured, from a checkpoint of any version
    if cfg.data_root is not None and not Path(cfg.data_root).is_dir():
        raise UserError(
            f"data_root={cfg.data_root!r} is not a folder. Fix: pass the folder that holds the data now, "
            "or leave data_root out to use the training run's"
        )
    data = dataclasses.replace(config.data, root=cfg.data_root or config.data.root)
    trainer = config.trainer
    device = resolve_device(cfg.device)
    set_tf32(device, trainer.tf32)  # as the run's own validation
    batch_size = cfg.batch_size or trainer.eval_batch_size or trainer.batch_size
    dtype = amp_dtype(trainer.amp, device)
    _, val_batches = build_batches(data, 1, batch_size, config.seed, device, dtype=dtype or torch.float32, train=False)
    model = build_model(config, pretrained=False)
    model.load_state_dict(ckpt_io.weights(ckpt, path, ema=cfg.ema))
    params, gmacs = count_params(model), count_gmacs(model, (data.in_chans, data.image_size, data.image_size))
    model.to(device)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
    tic = time.perf_counter()
    limit = cfg.limit_val_batches
    meter = evaluate(model, val_batches, criterion, device, dtype, trainer.channels_last, limit, trainer.eval_flip)
    elapsed = time.perf_counter() - tic
    summary = meter.summary()
    return {
        "checkpoint": str(path),
        "top1": summary["top1"],
        "top5": summary["top5"],
        "top1_err": summary["top1_err"],
        "top5_err": summary["top5_err"],
        "loss": summary["loss"],
        "images": summary["samples"],
        "params": params,
        "gmacs": gmacs,
        "img_per_s": summary["samples"] / elapsed,
        "epoch": ckpt["progress"]["epoch"],
        "weights": "ema" if cfg.ema else "trained",
        "model": config.model.arch,
        "attention": config.attention.name,
        "data": data.name,
    }


@hydra.main(config_path=None, config_name="base_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "checkpoint"):
        log.error("error: no checkpoint given. Usage: %s", USAGE)
        sys.exit(2)
    try:
        results = evaluate_checkpoint(cfg)
    except UserError as exc:
        log.error("error: %s", exc)
        sys.exit(2)
    output = Path(cfg.output or Path(cfg.checkpoint).with_name(f"eval_{Path(cfg.checkpoint).stem}.json"))
    output.write_text(json.dumps(results, indent=2))
    print(
        f"{results['model']} + {results['attention']} on {results['data']} (epoch {results['epoch']}"
        f"{', EMA weights' if cfg.ema else ''}): "
        f"top-1 {results['top1']:.2f}% (err {results['top1_err']:.2f}), top-5 {results['top5']:.2f}% "
        f"(err {results['top5_err']:.2f}), {results['params'] / 1e6:.3f}M params, {results['gmacs']:.4f} GMACs, "
        f"{results['img_per_s']:.0f} img/s -> {output}"
    )


if __name__ == "__main__":
    main()
    exit_now(0)
