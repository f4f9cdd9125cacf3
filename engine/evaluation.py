"""Validation: the loss and top-1/top-5 counts of a model over a split, as the trainer reports them after
every epoch and ``eval.py`` from a checkpoint."""

from __future__ import annotations

import torch

from .device import autocast
from .metrics import Meter


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
