"""Anti-aliased downsampling (Zhang, ICML 2019, "Making convolutional networks shift-invariant again"), as
FFCV's ImageNet recipe applies it: a 3x3 binomial blur before every strided convolution of 16 or more
input channels (the stem's RGB conv keeps its stride alone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BINOMIAL_3x3 = torch.tensor([1.0, 2.0, 1.0])[:, None] * torch.tensor([1.0, 2.0, 1.0])[None, :] / 16


class BlurConv2d(nn.Conv2d):
    """A ``Conv2d`` that first blurs its input, channel by channel (zero padding, stride 1). A subclass
    rather than a wrapper, so that the weights keep their names: a checkpoint or pretrained weights load
    with or without the blur."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> BlurConv2d:
        conv.__class__ = cls
        conv.register_buffer(
            "blur", BINOMIAL_3x3.to(conv.weight).expand(conv.in_channels, 1, 3, 3).contiguous(), persistent=False
        )
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels))


def add_blurpool(model: nn.Module, min_channels: int = 16) -> nn.Module:
    """Blur before each strided ``Conv2d`` of ``model`` with at least ``min_channels`` inputs, in place."""
    for module in model.modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1 and module.in_channels >= min_channels:
            BlurConv2d.from_conv(module)
    return model
