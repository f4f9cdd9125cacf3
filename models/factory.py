"""``create_model``: every backbone by name, with any attention preset."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from torch import nn

from .blurpool import add_blurpool
from .mobilenet import MobileNetV1
from .pretrained import load_pretrained
from .resnet import BasicBlock, Bottleneck, ResNet

_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(ResNet, BasicBlock, [2, 2, 2, 2]),
    "resnet34": partial(ResNet, BasicBlock, [3, 4, 6, 3]),
    "resnet50": partial(ResNet, Bottleneck, [3, 4, 6, 3]),
    "resnet101": partial(ResNet, Bottleneck, [3, 4, 23, 3]),
    "resnet152": partial(ResNet, Bottleneck, [3, 8, 36, 3]),
    # WideResNet-18 (Table 4): stage widths x k, 64-channel stem kept.
    "wrn18_1.5": partial(ResNet, BasicBlock, [2, 2, 2, 2], width=1.5, stem_width=64),
    "wrn18_2": partial(ResNet, BasicBlock, [2, 2, 2, 2], width=2.0, stem_width=64),
    "resnext50_32x4d": partial(ResNet, Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4),
    "resnext101_32x4d": partial(ResNet, Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4),
    "mobilenet_v1": MobileNetV1,
}

ARCHS = tuple(_ARCHS)


def backbone_options(arch: str) -> dict:
    """The keyword options that backbone ``arch`` takes, with its defaults (``stride_in_1x1=False``, ...)."""
    parameters = inspect.signature(_ARCHS[arch]).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def create_model(
    arch: str,
    num_classes: int = 1000,
    attention="none",
    pretrained: str | None = None,
    blurpool: bool = False,
    **kwargs,
) -> nn.Module:
    """Build backbone ``arch`` with ``attention`` (a preset name, a mapping of fields or a spec)
    in every block.

    Keyword options: ``in_chans``, ``stem`` ("imagenet" | "cifar"), ``width`` (multiplier),
    ``stride_in_1x1`` (ResNet v1 when True, v1.5 when False), ``zero_init_residual``, ``drop_rate``,
    ``drop_path_rate`` (ResNets: stochastic depth).
    ``pretrained``: "torchvision", "timm" (their ImageNet weights of the backbone) or a checkpoint path
    (this project's, or the CBAM authors' released one); see ``models.pretrained``. ``blurpool``: a blur
    before each strided conv (``models.blurpool``, FFCV's recipe); the weights' names are unchanged.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown model {arch!r}; valid models: {', '.join(ARCHS)}")
    model = _ARCHS[arch](num_classes=num_classes, attention=attention, **kwargs)
    if blurpool:
        add_blurpool(model)
    return model if pretrained is None else load_pretrained(model, arch, pretrained)
