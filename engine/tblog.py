"""What a run logs besides scalars, through any ``engine.loggers.Logger``: the charts to see first,
hparams with the final metrics, and the attention maps of a fixed batch."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.utils import make_grid

from analysis.gradcam import grad_cam, last_stage
from analysis.overlay import overlay, to_unit_range, with_colour_bar
from cbam.modules import ChannelGate, SpatialGate

from .config import run_overrides
from .loggers import Logger

# Shown first in TensorBoard's HParams tab, by these short names; other fields only when overridden.
KEY_FIELDS = {
    "name": "experiment",
    "recipe": "recipe",
    "data.name": "data",
    "model.arch": "arch",
    "attention.name": "attention",
    "optim.lr": "lr",
    "trainer.batch_size": "batch_size",
    "trainer.epochs": "epochs",
    "seed": "seed",
}
# The hparams' metrics: scalar series of every run (the last value counts, hence the best top-1's series).
# The model's size is an hparam (``write_hparams``' ``model_size``), not a series: as a model/ group of two
# flat lines it sorted first, and TensorBoard, which opens the first two groups, left val/ closed.
METRICS = ("val/top1", "val/top1_best", "val/top5", "train/img_per_s")
SIZE_GROUPS = ("model", "attention", "data")  # the config groups that change the model's size
# The charts to see first (TensorBoard's Custom Scalars tab): training and validation in one chart each.
CHARTS = {
    "top-1 (%)": ["train/top1", "val/top1"],
    "loss": ["train/loss", "val/loss"],
    "top-5 (%)": ["train/top5", "val/top5"],
    "learning rate": ["train/lr"],
    "training images/s": ["train/img_per_s"],
}
# Tag groups, which TensorBoard sorts by name and of which it opens the first two: train/, val/,
# val_attention/ (images and histograms of the fixed validation batch), val_ema/.
ATTENTION_GROUP = "val_attention"


def _field(config: dict, path: str):
    value = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def run_hparams(config: dict, overrides: list[str]) -> tuple[dict[str, int | float | str], set[str]]:
    """The hparams a run is compared by: ``KEY_FIELDS`` and every field its overrides set (by config path,
    ``attention.kernel_size``), in that order; real numbers as numbers, anything else as text (integers as
    ``64``, where the HParams tab would show a number as ``64.000``; booleans as ``true``/``false``). Also the
    names that the overrides set (they differ across a sweep's runs)."""
    names = dict(KEY_FIELDS)
    varying = set()
    for _key, field, _value in run_overrides(overrides):
        varying.add(names.setdefault(field, field))
    hparams: dict[str, int | float | str] = {}
    for field, name in names.items():
        value = _field(config, field)
        if value is None and field not in KEY_FIELDS:
            continue
        hparams[name] = value if isinstance(value, (float, str)) else json.dumps(value)
    return hparams, varying


def write_hparams(
    logger: Logger, config: dict, metrics: dict[str, float], overrides: list[str], model_size: dict[str, float]
) -> None:
    """The run's hparams (``run_hparams``, then ``model_size``: ``params_M``, ``GMACs``) with its final
    ``metrics`` (keyed by the tags in ``METRICS``). The size counts as varying where the overrides set
    the model, the attention or the data (its classes and channels), so that the HParams tab shows it."""
    hparams, varying = run_hparams(config, overrides)
    if any(field.split(".")[0] in SIZE_GROUPS for _key, field, _value in run_overrides(overrides)):
        varying |= set(model_size)
    logger.hparams({**hparams, **model_size}, metrics, varying)


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


def last_per_resolution(named_maps: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The last of the ``(name, map)`` pairs (in forward order) at each spatial size: one map per stage of
    a ResNet, the one closest to the stage's output."""
    last = {tuple(maps.shape[-2:]): (name, maps) for name, maps in named_maps}
    return dict(last.values())


def log_attention(logger: Logger, model: nn.Module, images: torch.Tensor, step: int) -> None:
    """What the network looks at on the fixed batch ``images`` (run in eval mode), under ``ATTENTION_GROUP``/: the
    inputs; the spatial gates' maps (the last block of each resolution, numbered by stage) on one fixed
    scale, 0 to 1, with the colour bar at the right; the last stage's Grad-CAM, each map normalised on its
    own (Grad-CAM's values have no unit); the channel weights as histograms per stage."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), record_attention(model) as maps:
        model(images)
    model.train(was_training)
    shown = to_unit_range(images)
    logger.image(f"{ATTENTION_GROUP}/inputs", make_grid(shown, nrow=len(images)), step)
    for stage, ms in enumerate(last_per_resolution(maps["spatial"]).values(), start=1):
        h, w = ms.shape[-2:]
        gated = overlay(shown, ms[:, 0], value_range=(0.0, 1.0))
        logger.image(
            f"{ATTENTION_GROUP}/spatial_{stage}_{h}x{w}", with_colour_bar(make_grid(gated, nrow=len(ms))), step
        )
    try:
        layer = last_stage(model)
    except ValueError:  # a backbone without a known last stage: no Grad-CAM image
        layer = None
    if layer is not None:
        cam = grad_cam(model, images, layer)
        logger.image(
            f"{ATTENTION_GROUP}/gradcam_last_stage", make_grid(overlay(shown, cam.maps), nrow=len(images)), step
        )
    by_stage: dict[str, list[torch.Tensor]] = {}
    for name, mc in maps["channel"]:
        by_stage.setdefault(name.split(".")[0], []).append(mc.flatten())  # layer1 ... layer4
    for stage, values in by_stage.items():
        logger.histogram(f"{ATTENTION_GROUP}/channel_weights_{stage}", torch.cat(values), step)
