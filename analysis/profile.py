"""Parameter and MAC counts in the paper's convention (Table 4's "GFLOPs" are conv + linear MACs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cbam import ChannelGate


def count_params(model: nn.Module) -> int:
    """All parameters, MLP biases and the spatial gate's BN included (as the paper counts)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """Multiply-accumulates of one image's forward pass, in units of 1e9: a property of the architecture.

    ``FlopCounterMode`` counts 2 FLOPs per MAC of conv / matmul ops and ignores elementwise ops and
    reductions, which is the paper's convention. The model is run in eval mode on a zero image. The
    paper counts Eq. (2)'s shared MLP once per pooled descriptor; every implementation here takes the
    sum of the descriptors before the MLP's last linear layer (``ChannelGate.attention_from_pooled``),
    so the MACs that this saves are added back (``_shared_mlp_macs``).
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
    return (counter.get_total_flops() / 2 + _shared_mlp_macs(model)) / 1e9


def _shared_mlp_macs(model: nn.Module) -> int:
    """The last MLP layer's MACs for every pooled descriptor but the one that the summed form computes."""
    macs = 0
    for gate in model.modules():
        if isinstance(gate, ChannelGate):
            descriptors = 2 if gate.pool == "avgmax" else 1
            macs += (descriptors - 1) * gate.mlp[2].weight.numel()
    return macs
