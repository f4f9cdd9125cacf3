#!/usr/bin/env python
"""train.py's training throughput against a minimal bare loop over the same model and data.

    python scripts/bench_train.py                       # the quickstart model and data, 60 steps
    python scripts/bench_train.py --steps 100 -- trainer.batch_size=128

The bare loop (index the in-memory tensor, normalise, forward, loss, backward, SGD step; nothing
else) runs before and after a real ``train.py`` subprocess limited to the same number of steps; the
ratio is train.py's images/s (from its results.json, training steps only) over the bare loop's mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from engine.config import TrainConfig, register_configs, to_object
from engine.data import build_batches
from engine.device import amp_dtype, autocast, resolve_device
from engine.network import build_model

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(config: TrainConfig, steps: int) -> float:
    """Images/s of the plainest loop over the same batches, model, device, AMP and optimizer settings."""
    torch.manual_seed(0)
    t, o = config.trainer, config.optim
    device = resolve_device(t.device)
    train, _ = build_batches(config.data, t.batch_size, t.batch_size, config.seed, device)
    model = build_model(config).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    batches = train.batches(0)

    def step(x, y):
        with autocast(device, amp_dtype(t.amp, device)):
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up
        step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic, images = time.perf_counter(), 0
    for _, (x, y) in zip(range(steps), batches, strict=False):
        step(x, y)
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - tic)


def _device_name(config: TrainConfig) -> str:
    device = resolve_device(config.trainer.device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, amp={config.trainer.amp}"
    return f"CPU x{torch.get_num_threads()} threads, amp={config.trainer.amp}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = parser.parse_args(argv)
    overrides = [f"experiment={args.experiment}", *args.overrides]
    register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    config = to_object(cfg)

    bare = [bare_loop(config, args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        limits = [f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=1", "trainer.image_every=0"]
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={tmp}", "trainer.epochs=1", *limits]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        ours = json.loads((Path(tmp) / "results.json").read_text())["train_img_per_s"]
    bare.append(bare_loop(config, args.steps))
    base = statistics.fmean(bare)
    print(
        f"{args.experiment}: {config.model.arch} + {config.attention.name}, batch "
        f"{config.trainer.batch_size}, {args.steps} steps, {_device_name(config)}"
    )
    print(f"bare loop: {bare[0]:.0f} / {bare[1]:.0f} img/s (before / after)")
    print(f"train.py:  {ours:.0f} img/s  ->  {ours / base:.3f}x the bare loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
