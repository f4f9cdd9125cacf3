"""What ``train.py``, ``eval.py`` and the scripts share: the model and data a config describes, the
device settings, evaluation and parameter/MAC counts, in one place.
"""

from __future__ import annotations

import torch

from models import create_model

from .checkpoint import load as load_checkpoint
from .data import build_batches
from .device import amp_dtype, autocast, resolve_device, set_tf32
from .metrics import Meter
from .profile import count_gmacs, count_params

__all__ = [
    "amp_dtype",
    "autocast",
    "build_batches",
    "build_model",
    "count_gmacs",
    "count_params",
    "evaluate",
    "load_model",
    "resolve_device",
    "set_tf32",
]


def build_model(config: dict, pretrained: bool = True) -> torch.nn.Module:
    """The network a config describes; ``pretrained=False`` skips ``model.pretrained`` (weights that a
    checkpoint is about to replace: a resumed run, ``eval.py``)."""
    m, d = config["model"], config["data"]
    stem = m["stem"] if m["stem"] != "auto" else ("cifar" if d["image_size"] <= 64 else "imagenet")
    skip = ("arch", "stem") if pretrained else ("arch", "stem", "pretrained")
    options = {k: v for k, v in m.items() if k not in skip and v is not None}
    return create_model(m["arch"], d["num_classes"], config["attention"], in_chans=d["in_chans"], stem=stem, **options)


def load_model(path) -> tuple[torch.nn.Module, dict]:
    """A checkpoint's network with its weights, on the CPU in eval mode, and the config it was trained
    with (``engine.checkpoint.CheckpointError`` if the file cannot be read)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["config"], pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["config"]


@torch.no_grad()
def evaluate(
    model, batches, criterion, device, amp_dtype=None, channels_last=False, limit: int = 0, flip: bool = False
) -> Meter:
    """Loss and top-1/top-5 counts of ``model`` (in eval mode) over a validation iterator; used by the
    trainer after every epoch and by ``eval.py``, so both report the same numbers. ``flip``: the mean
    of the logits of each image and of its mirror image (``trainer.eval_flip``)."""
    was_training = model.training
    model.eval()
    meter = Meter(device)
    for x, y in batches.batches(stop=limit or None):
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        meter.update(criterion(logits, y), logits, y)
    model.train(was_training)
    return meter
