"""Attention specifications: one validated record of every field a sweep can change.

A spec is a plain dataclass so that Hydra can use it as a structured-config schema and a library
user can build one by hand. ``PRESETS`` holds the named variants of the paper's ablations
(Tables 1-3); ``resolve_spec`` turns a preset name, a mapping or a spec into a validated spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UserError

POOLS = ("avg", "max", "avgmax")
DESCRIPTORS = ("pool", "conv1x1")
ORDERS = ("channel_first", "spatial_first", "parallel")
PARALLEL_COMBINES = ("mul", "add")
PLACEMENTS = ("residual", "pre", "post")
IMPLS = ("auto", "fused", "reference")

# Fields with a fixed set of values; the Hydra schema turns these into enums (compose-time checks).
CHOICES = {
    "pool": POOLS,
    "descriptor": DESCRIPTORS,
    "order": ORDERS,
    "parallel_combine": PARALLEL_COMBINES,
    "placement": PLACEMENTS,
    "impl": IMPLS,
}


class AttentionSpecError(UserError, ValueError):
    """A bad attention spec; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class AttentionSpec:
    """What attention a block gets and how it is built.

    Fields (paper section 3):
      channel / spatial: which gates are on (both off = no attention).
      pool: channel-attention pooling, Table 1: "avg" (SE), "max", "avgmax" (CBAM, Eq. 2).
      reduction: MLP reduction ratio r (hidden units = channels // r).
      descriptor: spatial descriptor, Table 2: "pool" ([max; mean] over channels, Eq. 3) or
        "conv1x1" (a learned 1x1 conv C -> 1).
      kernel_size: spatial conv kernel k, odd (Table 2: 3 or 7).
      spatial_bn / spatial_bn_zero_init: the reference code's BatchNorm after the spatial conv,
        with gamma = 0 at init (spatial gate starts as a flat 0.5). Not in the paper's text.
      order: Table 3 arrangement, "channel_first" (CBAM), "spatial_first" or "parallel".
      parallel_combine: how "parallel" combines the two maps, see ``cbam.modules.CBAM``.
      placement: where a residual block applies it: "residual" (reference: after the last BN,
        before the shortcut addition), "pre" (on the block input, residual branch only),
        "post" (after the addition and ReLU).
      impl: "auto" (default: "fused" where supported, measured faster on the device (the CPU) and
        its kernels compile there, else "reference"), "fused" (``cbam.fused``: gates + last BN +
        shortcut + ReLU as one autograd Function with generated kernels; not for descriptor="conv1x1"
        or parallel_combine="add") or "reference" (plain autograd, the modules' straightforward code).
    """

    name: str = "custom"
    channel: bool = False
    spatial: bool = False
    pool: str = "avgmax"
    reduction: int = 16
    descriptor: str = "pool"
    kernel_size: int = 7
    spatial_bn: bool = True
    spatial_bn_zero_init: bool = True
    order: str = "channel_first"
    parallel_combine: str = "mul"
    placement: str = "residual"
    impl: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            _check_choice(name, getattr(self, name), allowed)
        if self.impl == "fused" and not fused_supported(self):
            raise AttentionSpecError(
                "attention.impl=fused supports the pooled spatial descriptor (descriptor=pool) and, for "
                "order=parallel, parallel_combine=mul; this spec has "
                f"descriptor={self.descriptor!r}, order={self.order!r}, parallel_combine={self.parallel_combine!r}. "
                "Use impl=auto (falls back to reference) or impl=reference"
            )
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 1:
            raise AttentionSpecError(f"attention.reduction must be an integer >= 1, got {self.reduction!r}")
        if (
            isinstance(self.kernel_size, bool)
            or not isinstance(self.kernel_size, int)
            or self.kernel_size < 1
            or self.kernel_size % 2 == 0
        ):
            raise AttentionSpecError(
                f"attention.kernel_size must be a positive odd integer (3 and 7 in the paper) so that "
                f"the spatial map keeps its size, got {self.kernel_size!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.channel or self.spatial

    def hidden_units(self, channels: int) -> int:
        """MLP width C/r for ``channels``; refuses a ratio that leaves no hidden unit."""
        hidden = channels // self.reduction
        if hidden < 1:
            raise AttentionSpecError(
                f"attention.reduction={self.reduction} leaves no hidden units for a block with "
                f"{channels} channels (channels // reduction = 0); use reduction <= {channels}"
            )
        return hidden


def fused_supported(spec: AttentionSpec) -> bool:
    """Whether ``cbam.fused`` implements this variant (everything but the conv1x1 descriptor and
    the additive parallel combination)."""
    if spec.spatial and spec.descriptor != "pool":
        return False
    return not (spec.channel and spec.spatial and spec.order == "parallel" and spec.parallel_combine == "add")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AttentionSpecError(f"attention.{name}={value!r} is not valid; allowed: {', '.join(allowed)}")


_CBAM = dict(channel=True, spatial=True, pool="avgmax")

PRESETS: dict[str, AttentionSpec] = {
    spec.name: spec
    for spec in [
        AttentionSpec("none"),
        AttentionSpec("se", channel=True, pool="avg"),  # Table 1 AvgPool = SE
        AttentionSpec("channel_max", channel=True, pool="max"),  # Table 1 MaxPool
        AttentionSpec("channel", channel=True, pool="avgmax"),  # Table 1 Avg & Max
        AttentionSpec("spatial", spatial=True),
        AttentionSpec("cbam", **_CBAM),  # Table 2/3 best: channel pooling, k=7, channel first
        AttentionSpec("cbam_spatial_first", **_CBAM, order="spatial_first"),  # Table 3
        AttentionSpec("cbam_parallel", **_CBAM, order="parallel"),  # Table 3
        AttentionSpec("cbam_k3", **_CBAM, kernel_size=3),  # Table 2
        AttentionSpec("cbam_conv1x1_k3", **_CBAM, descriptor="conv1x1", kernel_size=3),  # Table 2
        AttentionSpec("cbam_conv1x1_k7", **_CBAM, descriptor="conv1x1", kernel_size=7),  # Table 2
    ]
}

FIELDS = tuple(f.name for f in dataclasses.fields(AttentionSpec))


def resolve_spec(spec: str | Mapping | AttentionSpec | None) -> AttentionSpec:
    """A validated ``AttentionSpec`` from a preset name, a mapping of fields, or a spec.

    A mapping may name a ``preset`` to start from; its other keys override that preset's fields.
    """
    if spec is None:
        return PRESETS["none"]
    if isinstance(spec, AttentionSpec):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise AttentionSpecError(f"unknown attention preset {spec!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[spec]
    if isinstance(spec, Mapping):
        fields = dict(spec)
        base = resolve_spec(fields.pop("preset")) if "preset" in fields else AttentionSpec()
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise AttentionSpecError(f"unknown attention field(s) {unknown}; valid fields: {', '.join(FIELDS)}")
        return dataclasses.replace(base, **fields)
    raise AttentionSpecError(
        f"attention must be a preset name, a mapping of fields or an AttentionSpec, got {type(spec).__name__}"
    )
