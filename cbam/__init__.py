"""CBAM: the attention modules of Woo et al. (ECCV 2018), and BAM (Park et al., BMVC 2018). Imports
nothing else of this project."""

from .bam import BAM
from .modules import CBAM, AttentionModule, ChannelGate, SpatialGate, build_attention
from .spec import PRESETS, AttentionSpec, AttentionSpecError, resolve_spec

__all__ = [
    "BAM",
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
