"""CBAM: attention modules of Woo et al. (ECCV 2018) and the training engine around them."""

from .modules import CBAM, AttentionModule, ChannelGate, SpatialGate, build_attention
from .spec import PRESETS, AttentionSpec, AttentionSpecError, resolve_spec

__all__ = [
    "CBAM",
    "PRESETS",
    "AttentionModule",
    "AttentionSpec",
    "AttentionSpecError",
    "ChannelGate",
    "SpatialGate",
    "build_attention",
    "resolve_spec",
]
