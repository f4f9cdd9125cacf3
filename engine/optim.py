"""Optimizer and learning-rate schedule from the config (timm's schedulers)."""

from __future__ import annotations

import torch
from timm.optim import Lamb, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from .config import OptimConfig, SchedConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (the paper's: momentum 0.9, wd 1e-4 on every parameter), AdamW or LAMB, for ``model``'s parameters
    where they are now. With ``weight_decay_norm_bias=false``, norm layers' parameters and biases (every
    parameter of one dimension) get no weight decay: timm's ``param_groups_weight_decay``, as FFCV's and
    timm's recipes.

    torch's fused implementation where the device has one (CUDA; the CPU from torch 2.4): one kernel per
    step, and it skips its update on the device when told (``found_inf``, ``engine.update``). SGD's
    momentum buffers start at zero rather than at the first gradient, which is the same first step
    (0 * momentum + gradient) and leaves no uninitialised buffer if that first update is skipped."""
    params = (
        list(model.parameters())
        if optim.weight_decay_norm_bias
        else (param_groups_weight_decay(model, optim.weight_decay))
    )
    if optim.name == "sgd":
        options = dict(lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay)
        optimizer = _fused_if_supported(torch.optim.SGD, params, options)
        if optim.momentum:
            for p in model.parameters():
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return optimizer
    options = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if optim.name == "lamb":  # timm's (torch has none); trust ratios per parameter tensor, as its paper
        return Lamb(params, **options)
    return _fused_if_supported(torch.optim.AdamW, params, options)


def _fused_if_supported(cls, params, options: dict) -> torch.optim.Optimizer:
    try:
        return cls(params, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused kernels for these parameters' device or dtype
        return cls(params, **options)


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched: SchedConfig, epochs: int, steps_per_epoch: int
) -> Scheduler:
    """The lr as a function of (epoch, step): the trainer calls ``step(epoch)`` at each epoch start and
    ``step_update(global_step)`` before each step, so a resumed run needs no scheduler state."""
    unit = steps_per_epoch if sched.per_step else 1
    common = dict(
        warmup_t=round(sched.warmup_epochs * unit),
        warmup_lr_init=sched.warmup_lr,
        t_in_epochs=not sched.per_step,
    )
    if sched.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=epochs * unit, lr_min=sched.min_lr, **common)
    if sched.name == "linear":  # after the warmup, straight down to min_lr at the end (FFCV's schedule)
        return PolyLRScheduler(
            optimizer,
            t_initial=epochs * unit - common["warmup_t"],
            power=1.0,
            lr_min=sched.min_lr,
            warmup_prefix=True,
            **common,
        )
    if sched.name == "step":
        return StepLRScheduler(optimizer, decay_t=sched.decay_epochs * unit, decay_rate=sched.decay_rate, **common)
    return StepLRScheduler(optimizer, decay_t=epochs * unit + 1, decay_rate=1.0, **common)  # constant
