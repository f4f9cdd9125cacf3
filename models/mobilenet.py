"""MobileNet v1 (Howard et al., 2017) with attention in every depthwise-separable block (Table 5).

With no shortcut to add, the attention sits at the reference placement's analogue: after the
block's last conv + BN (the pointwise conv), before its ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from cbam import AttentionSpec, build_attention, resolve_spec

from .resnet import init_backbone

# (output channels, stride) of the 13 depthwise-separable blocks, for alpha = 1.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, 1x1 pointwise conv + BN, attention, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, attention: AttentionSpec):
        super().__init__()
        self.depthwise = nn.Sequential(*_conv_bn(in_ch, in_ch, 3, stride, groups=in_ch), nn.ReLU(inplace=True))
        self.pointwise = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, 1))
        self.attn = build_attention(out_ch, attention)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.attn(self.pointwise(self.depthwise(x))))


class MobileNetV1(nn.Module):
    """MobileNet v1 with width multiplier ``width`` (alpha). ``stem="cifar"`` uses stride 1 in the
    first conv for 32x32 inputs."""

    def __init__(
        self,
        num_classes: int = 1000,
        attention: str | dict | AttentionSpec | None = "none",
        in_chans: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r} is not valid; allowed: imagenet, cifar")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.attention = resolve_spec(attention)
        spec = self.attention
        if drop_path_rate:
            raise ValueError("MobileNet v1 has no residual branch to drop: model.drop_path_rate must be 0")
        if spec.module == "bam":
            raise ValueError(
                "BAM (attention.module=bam) sits between a ResNet's stages; MobileNet v1 takes attention in its blocks"
            )
        if spec.placement != "residual":
            raise ValueError(
                f"MobileNet v1 has no residual branch: attention.placement must be 'residual', got {spec.placement!r}"
            )
        channels = max(1, round(32 * width))
        layers = [*_conv_bn(in_chans, channels, 3, 2 if stem == "imagenet" else 1), nn.ReLU(inplace=True)]
        for out, stride in _BLOCKS:
            out = max(1, round(out * width))
            layers.append(DepthwiseSeparable(channels, out, stride, spec))
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        init_backbone(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))
