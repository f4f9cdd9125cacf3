"""Parameter and MAC counts in the paper's convention (Table 4's "GFLOPs" are conv + linear MACs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters, MLP biases and the spatial gate's BN included (as the paper counts)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """Multiply-accumulates of one image's forward pass, in units of 1e9.

    ``FlopCounterMode`` counts 2 FLOPs per MAC of conv / matmul ops and ignores elementwise ops and
    reductions, which is the paper's convention. The model is run in eval mode on a zero image.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
