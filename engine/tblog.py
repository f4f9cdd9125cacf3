"""What a run logs besides scalars, through any ``engine.loggers.Logger``: hparams with the final
metrics, and the attention maps of a fixed batch."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid

from cbam.modules import ChannelGate, SpatialGate

from .loggers import Logger


def write_hparams(logger: Logger, config: dict, metrics: dict[str, float]) -> None:
    """The config's fields, flattened (``attention.pool``, ...), with the final metrics."""
    flat = {}
    for group in ("model", "attention", "data", "optim", "sched", "trainer"):
        for k, v in config.get(group, {}).items():
            flat[f"{group}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    flat.update(seed=config["seed"], name=config["name"])
    logger.hparams(flat, metrics)


@contextmanager
def record_attention(model: nn.Module):
    """Collect every gate's output during the forward passes inside the block:
    yields {"spatial": [(name, Ms)], "channel": [(name, Mc)]} in forward order."""
    maps: dict[str, list] = {"spatial": [], "channel": []}
    handles = []
    for name, module in model.named_modules():
        for kind, cls in (("spatial", SpatialGate), ("channel", ChannelGate)):
            if isinstance(module, cls):
                hook = lambda _m, _i, out, kind=kind, name=name: maps[kind].append((name, out.detach().float()))  # noqa: E731
                handles.append(module.gate.register_forward_hook(hook))
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def log_attention(logger: Logger, model: nn.Module, images: torch.Tensor, step: int) -> None:
    """Spatial maps (last block of each resolution) as images beside the inputs; channel weights as
    histograms per stage. ``model`` is run in eval mode on the fixed batch ``images``."""
    was_training = model.training
    model.eval()
    with record_attention(model) as maps:
        model(images)
    model.train(was_training)
    size = images.shape[-2:]
    lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
    logger.image("attention/inputs", make_grid((images - lo) / (hi - lo + 1e-8), nrow=len(images)), step)
    last_per_resolution = {tuple(m.shape[-2:]): m for _, m in maps["spatial"]}
    for (h, w), ms in last_per_resolution.items():
        grid = make_grid(F.interpolate(ms, size=size, mode="nearest"), nrow=len(ms), pad_value=1.0)
        logger.image(f"attention/spatial_{h}x{w}", grid, step)
    by_stage: dict[str, list[torch.Tensor]] = {}
    for name, mc in maps["channel"]:
        by_stage.setdefault(name.split(".")[0], []).append(mc.flatten())  # layer1 ... layer4
    for stage, values in by_stage.items():
        logger.histogram(f"attention/channel_weights_{stage}", torch.cat(values), step)
