"""Mixup and CutMix of training batches, on the device that holds them, and the training loss that their
soft targets need: timm's ``Mixup``, ``SoftTargetCrossEntropy`` and ``BinaryCrossEntropy``.

timm's ``Mixup`` draws its coefficients and boxes from NumPy's global generator. Each batch's draws here
come from a generator seeded by (run seed, global step), with NumPy's global state put back afterwards:
a resumed run mixes its batches exactly as the uninterrupted one, whatever else used NumPy meanwhile.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from .config import TrainerConfig


class BatchMixer:
    """``(x, y) -> (mixed x, soft targets)`` for step ``step``: Mixup with ``mixup`` as Beta's alpha, CutMix
    with ``cutmix`` (each batch one of the two, with probability 1/2 each, when both are on), targets
    smoothed by ``label_smoothing``."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int, seed: int):
        self.mix = Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
        )
        self.seed = seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        saved = np.random.get_state()
        np.random.seed(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])
        try:
            return self.mix(x, y)
        finally:
            np.random.set_state(saved)


def build_mixer(t: TrainerConfig, num_classes: int, seed: int) -> BatchMixer | None:
    """The run's mixer, or None when ``trainer.mixup`` and ``trainer.cutmix`` are both 0."""
    if not (t.mixup or t.cutmix):
        return None
    return BatchMixer(t.mixup, t.cutmix, t.label_smoothing, num_classes, seed)


def training_loss(t: TrainerConfig, mixing: bool) -> torch.nn.Module:
    """The loss of the training steps. ``trainer.loss=ce``: cross-entropy (on Mixup's soft targets, which
    carry the label smoothing, when ``mixing``); ``bce``: timm's binary cross-entropy over the classes with
    targets above ``trainer.bce_target_threshold`` set to 1, as ResNet strikes back trains."""
    if t.loss == "bce":
        smoothing = 0.0 if mixing else t.label_smoothing
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=t.bce_target_threshold)
    return SoftTargetCrossEntropy() if mixing else torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
