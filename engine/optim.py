"""Optimizer and learning-rate schedule from the config (timm's schedulers)."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def build_optimizer(model: torch.nn.Module, optim: dict) -> torch.optim.Optimizer:
    """SGD (the paper's: momentum 0.9, wd 1e-4 on every parameter) or AdamW."""
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"],
            weight_decay=optim["weight_decay"],
        )  # fmt: skip
    return torch.optim.AdamW(
        model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"]
    )


def build_scheduler(optimizer: torch.optim.Optimizer, sched: dict, epochs: int, steps_per_epoch: int) -> Scheduler:
    """The lr as a function of (epoch, step): the trainer calls ``step(epoch)`` at each epoch start and
    ``step_update(global_step)`` before each step, so a resumed run needs no scheduler state."""
    unit = steps_per_epoch if sched["per_step"] else 1
    common = dict(
        warmup_t=round(sched["warmup_epochs"] * unit),
        warmup_lr_init=sched["warmup_lr"],
        t_in_epochs=not sched["per_step"],
    )
    if sched["name"] == "cosine":
        return CosineLRScheduler(optimizer, t_initial=epochs * unit, lr_min=sched["min_lr"], **common)
    if sched["name"] == "step":
        return StepLRScheduler(
            optimizer, decay_t=sched["decay_epochs"] * unit, decay_rate=sched["decay_rate"], **common
        )
    return StepLRScheduler(optimizer, decay_t=epochs * unit + 1, decay_rate=1.0, **common)  # constant
