"""Pretrained weights into any attention variant: ImageNet backbones from torchvision or timm, a
checkpoint of this project, or the CBAM authors' released checkpoint (Jongchan/attention-module).

The backbone's parameter names are torchvision's (``conv1``, ``layer1.0.bn3``, ``fc``, ...), so a
torchvision or timm ResNet state dict loads as it is; the attention modules keep their own
initialisation (the paper trains them from scratch), and the classifier is re-initialised when its
class count differs. Anything else that does not fit is an error naming the keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cbam import AttentionSpecError

SOURCES = ("torchvision", "timm")  # or a path to a checkpoint file

# The authors' CBAM module names (MODELS/cbam.py): mlp = (Flatten, Linear, ReLU, Linear); spatial = BasicConv.
_OFFICIAL = [
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.1\."), ".attn.channel_gate.mlp.0."),
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.3\."), ".attn.channel_gate.mlp.2."),
    (re.compile(r"\.cbam\.SpatialGate\.spatial\.conv\."), ".attn.spatial_gate.conv."),
    (re.compile(r"\.cbam\.SpatialGate\.spatial\.bn\."), ".attn.spatial_gate.bn."),
]


class PretrainedError(AttentionSpecError):
    """Weights that cannot be loaded into the model; the message says which and why."""


def official_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' checkpoint layout (``module.layer1.0.cbam.ChannelGate.mlp.1.weight``, ...) in ours."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, replacement in _OFFICIAL:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _source_state_dict(arch: str, source: str) -> dict[str, torch.Tensor]:
    if source == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError):
            raise PretrainedError(f"pretrained=torchvision: torchvision has no ImageNet weights for {arch!r}") from None
        return weights.get_state_dict(progress=True)
    if source == "timm":
        import timm

        if not timm.is_model_pretrained(arch):
            raise PretrainedError(f"pretrained=timm: timm has no ImageNet weights for {arch!r}")
        return timm.create_model(arch, pretrained=True).state_dict()
    path = Path(source)
    if not path.is_file():
        raise PretrainedError(f"pretrained={source!r}: neither {', '.join(SOURCES)} nor an existing checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:  # this project's checkpoint
        return ckpt["model"]
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # the authors' training script
        ckpt = ckpt["state_dict"]
    return official_to_ours(ckpt)


def load_pretrained(model: nn.Module, arch: str, source: str) -> nn.Module:
    """``model`` with the weights of ``source`` (see the module docstring); returns it."""
    state = _source_state_dict(arch, source)
    own = model.state_dict()
    attention = {k for k in own if ".attn." in k}
    classifier = {k for k in own if k.startswith(("fc.", "classifier."))}
    if any(k in state and state[k].shape != own[k].shape for k in classifier):  # another class count
        state = {k: v for k, v in state.items() if k not in classifier}
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k not in attention and k not in classifier)
    if mismatched or unexpected or missing:
        problems = [
            f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for name, keys in (
                ("shape differs", mismatched),
                ("not in this model", unexpected),
                ("missing from the weights", missing),
            )
            if keys
        ]
        raise PretrainedError(f"pretrained={source!r} does not fit {arch}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return model
