"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018), CBAM's sibling.

One module sits at each "bottleneck" of the network, the end of a stage before the next one
downsamples (after stages 1-3 of a ResNet), instead of one in every block. Its two branches look at the
same input and are summed before one sigmoid (section 3, Eq. 1-2):

    M(F) = sigmoid(Mc(F) + Ms(F)),    F' = F + F * M(F)

- Mc (Eq. 3): global average pool, MLP C -> C/r -> C with BatchNorm and ReLU on the hidden layer.
- Ms (Eq. 4): 1x1 conv C -> C/r, two 3x3 convs of dilation d on C/r channels, 1x1 conv C/r -> 1, each
  of the first three followed by BatchNorm and ReLU.

The paper's values: r = 16, d = 4. The authors' code (Jongchan/attention-module, ``MODELS/bam.py``)
has the same layers but multiplies the two branches (``1 + sigmoid(Mc * Ms)``) where the paper sums
them; this module follows the paper.
"""

from __future__ import annotations

import torch
from torch import nn


class BamChannelGate(nn.Module):
    """Mc(F), Eq. 3: a (B, C, 1, 1) map."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean(dim=(2, 3)))[:, :, None, None]


class BamSpatialGate(nn.Module):
    """Ms(F), Eq. 4: a (B, 1, H, W) map from dilated convolutions on C/r channels."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, dilated_convs: int = 2):
        super().__init__()
        hidden = channels // reduction
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(dilated_convs):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BAM(nn.Module):
    """F' = F + F * sigmoid(Mc(F) + Ms(F)), Eq. 1-2; ``reduction`` r and ``dilation`` d as in section 3."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(
                f"BAM with reduction={reduction} leaves no hidden units for {channels} channels; "
                f"use reduction <= {channels}"
            )
        self.channel_gate = BamChannelGate(channels, reduction)
        self.spatial_gate = BamSpatialGate(channels, reduction, dilation)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """M(F), Eq. 2, broadcast to x's shape."""
        return torch.sigmoid(self.channel_gate(x) + self.spatial_gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * self.attention(x)
