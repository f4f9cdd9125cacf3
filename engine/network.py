"""The network a run's config describes, and a checkpoint's network with its weights."""

from __future__ import annotations

import dataclasses

import torch

from models import create_model

from .checkpoint import load as load_checkpoint
from .checkpoint import weights
from .config import TrainConfig, from_dict


def build_model(config: TrainConfig, pretrained: bool = True) -> torch.nn.Module:
    """The network a config describes; ``pretrained=False`` skips ``model.pretrained`` (weights that a
    checkpoint is about to replace: a resumed run, ``eval.py``)."""
    m, d = config.model, config.data
    skip = ("arch", "stem") if pretrained else ("arch", "stem", "pretrained")
    options = {k: v for k, v in dataclasses.asdict(m).items() if k not in skip and v is not None}
    stem = m.stem_for(d.image_size)
    return create_model(m.arch, d.num_classes, config.attention.spec(), in_chans=d.in_chans, stem=stem, **options)


def load_model(path, ema: bool = False) -> tuple[torch.nn.Module, TrainConfig]:
    """A checkpoint's network with its weights (``ema``: the EMA of them), on the CPU in eval mode, and the
    config it was trained with (``engine.checkpoint.CheckpointError`` if the file cannot be read)."""
    ckpt = load_checkpoint(path)
    config = from_dict(ckpt["config"])
    model = build_model(config, pretrained=False)
    model.load_state_dict(weights(ckpt, path, ema=ema))
    return model.eval(), config
