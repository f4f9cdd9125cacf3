"""ResNet / WideResNet / ResNeXt backbones with an attention module in every residual block (or BAM
at the end of the first three stages).

Shaped after torchvision's ``resnet.py``. The attention sits where the CBAM reference code puts
it (section 3.1, Fig. 3): after the block's last conv + BN, before the shortcut addition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath
from torch import nn

from cbam import AttentionModule, AttentionSpec, build_attention, resolve_spec
from cbam.bam import BAM

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _AttentionBlock(nn.Module):
    """Shared placement logic: ``pre`` gates the residual branch's input, ``residual`` its output,
    ``post`` the block output."""

    def _build_attention(self, inplanes: int, out_planes: int, attention: AttentionSpec, drop_path: float) -> None:
        self.placement = attention.placement
        channels = inplanes if attention.placement == "pre" else out_planes
        self.attn = build_attention(channels, attention)
        # stochastic depth (Huang et al. 2016): the residual branch dropped per sample while training
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def bn_attention_add_relu(
        self, out: torch.Tensor, bn: nn.Module, identity: torch.Tensor, *, conv: nn.Conv2d
    ) -> torch.Tensor:
        """The block's end: relu(attention(bn(out)) + identity), the residual addition, with ``placement``
        residual (one fused call where the attention module supports it, ``cbam.fused``; ``conv`` made
        ``out``); relu(bn(out) + identity) and then the attention with ``post``, or before it, ``pre``.
        Drop path, while training, acts on the residual branch just before the addition."""
        dropping = self.training and isinstance(self.drop_path, DropPath)
        if self.placement == "residual" and isinstance(self.attn, AttentionModule) and not dropping:
            return self.attn.forward_tail(out, bn, identity, producer=conv)
        if self.placement == "residual":  # nn.Identity, or a foreign module such as timm's CbamModule
            return self.relu(self.drop_path(self.attn(bn(out))) + identity)
        out = self.relu(self.drop_path(bn(out)) + identity)
        return self.attn(out) if self.placement == "post" else out

    def _branch_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) if self.placement == "pre" else x


class BasicBlock(_AttentionBlock):
    """Two 3x3 convs (ResNet-18/34, WideResNet-18)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attention: AttentionSpec = AttentionSpec(),
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self._build_attention(inplanes, planes, attention, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(self._branch_input(x))))
        out = self.conv2(out)
        return self.bn_attention_add_relu(out, self.bn2, identity, conv=self.conv2)


class Bottleneck(_AttentionBlock):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1 expansion 4 (ResNet-50/101/152, ResNeXt).

    ``stride_in_1x1=True`` puts a downsampling block's stride in the first 1x1 conv (ResNet v1, the
    paper's FLOP counts); False puts it in the 3x3 (v1.5: torchvision and the reference code).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attention: AttentionSpec = AttentionSpec(),
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self._build_attention(inplanes, planes * self.expansion, attention, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(self._branch_input(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        return self.bn_attention_add_relu(out, self.bn3, identity, conv=self.conv3)


STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """ResNet with any attention in every block.

    ``stem="imagenet"``: 7x7/2 conv + 3x3/2 max-pool; ``"cifar"``: 3x3/1 conv, no max-pool.
    ``width`` multiplies the four stage widths (64, 128, 256, 512); the stem has ``stem_width``
    channels, ``round(64 * width)`` unless given (WideResNet keeps 64).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        attention: str | dict | AttentionSpec | None = "none",
        in_chans: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
        stem_width: int | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} is not valid; allowed: {', '.join(STEMS)}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.attention = resolve_spec(attention)
        # block i of n drops its branch with probability drop_path_rate * i / (n - 1), as timm's ResNets
        rates = [drop_path_rate * i / max(sum(layers) - 1, 1) for i in range(sum(layers))]
        firsts = [sum(layers[:stage]) for stage in range(4)]  # each stage's first block
        self.inplanes = stem_width or round(64 * width)
        self.groups, self.base_width, self.stride_in_1x1 = groups, width_per_group, stride_in_1x1
        self._norm_layer = norm_layer

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        stage_rates = [rates[first : first + n] for first, n in zip(firsts, layers, strict=True)]
        self.layer1 = self._make_layer(block, widths[0], stage_rates[0])
        self.layer2 = self._make_layer(block, widths[1], stage_rates[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], stage_rates[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], stage_rates[3], stride=2)
        # BAM (attention.module=bam) at the end of stages 1-3, as its paper places it; no-ops otherwise
        bam = self.attention.module == "bam"
        stage_channels = [w * block.expansion for w in widths]
        self.bam1, self.bam2, self.bam3 = (
            BAM(c, self.attention.reduction) if bam else nn.Identity() for c in stage_channels[:3]
        )
        self.num_features = widths[3] * block.expansion
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)
        init_backbone(self, zero_init_residual)

    def _make_layer(self, block, planes: int, drop_paths: list[float], stride: int = 1) -> nn.Sequential:
        """One stage: a block per entry of ``drop_paths`` (that block's drop path rate)."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        kwargs = dict(
            groups=self.groups,
            base_width=self.base_width,
            norm_layer=self._norm_layer,
            attention=self.attention,
            stride_in_1x1=self.stride_in_1x1,
        )
        layers = [block(self.inplanes, planes, stride, downsample, drop_path=drop_paths[0], **kwargs)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, drop_path=rate, **kwargs) for rate in drop_paths[1:]]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.bam1(self.layer1(x))
        x = self.bam2(self.layer2(x))
        return self.layer4(self.bam3(self.layer3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def init_backbone(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's init (He normal fan-out convs, BN 1/0) for everything but attention modules,
    which keep their own init (e.g. the spatial gate's zero-gamma BN)."""
    attention_params = {id(p) for m in model.modules() if isinstance(m, AttentionModule) for p in m.parameters()}
    for m in model.modules():
        if any(id(p) in attention_params for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
