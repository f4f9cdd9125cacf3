"""Attention specifications: one validated record of every field a sweep can change.

A spec is a plain dataclass so that Hydra can use it as a structured-config schema and a library
user can build one by hand. ``PRESETS`` holds the named variants of the paper's ablations
(Tables 1-3) and the modules CBAM is compared with (BAM, and timm's attention layers);
``resolve_spec`` turns a preset name, a mapping or a spec into a validated spec.
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
# timm's attention layers (``timm.layers.create_attn``) that gate a block's output in place, as CBAM
# does: a drop-in for the block's attention. Those that replace the block's convolutions (sk, splat,
# lambda, halo, bottleneck) do not fit here, nor do the non-local ones (nl, bat: quadratic in H x W);
# "ge" (gather-excite) does not build with its defaults in timm 1.0.x (ConvMlp gets act_layer twice).
TIMM_LAYERS = ("se", "ese", "eca", "ecam", "ceca", "gc", "gca", "cbam", "lcbam")
MODULES = ("cbam", "bam", *(f"timm_{name}" for name in TIMM_LAYERS))

# Fields with a fixed set of values; the Hydra schema turns these into enums (compose-time checks).
CHOICES = {
    "module": MODULES,
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
      module: "cbam" (this project's channel and spatial gates, as the fields below say: every
        variant of the paper's ablations, "none" included), "bam" (BAM, Park et al. BMVC 2018: one
        module at the end of each of the first three stages, ``cbam.bam``; takes ``reduction``) or
        "timm_<layer>" (timm's attention layer ``<layer>``, with timm's own defaults, in every block at
        ``placement``). The fields that configure the gates apply to "cbam" only.
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
    module: str = "cbam"
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
        if self.module != "cbam":
            self._check_module_fields()
        if self.impl == "fused" and not fused_supported(self):
            raise AttentionSpecError(
                "attention.impl=fused supports CBAM's gates (module=cbam) with the pooled spatial descriptor "
                "(descriptor=pool) and, for "
                "order=parallel, parallel_combine=mul; this spec has "
                f"module={self.module!r}, descriptor={self.descriptor!r}, order={self.order!r}, "
                f"parallel_combine={self.parallel_combine!r}. "
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

    def _check_module_fields(self) -> None:
        """Refuse the gate fields for a module they do not configure (they would be silently ignored)."""
        allowed = {"name", "module", "impl"} | ({"reduction"} if self.module == "bam" else {"placement"})
        default = AttentionSpec()
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in allowed and getattr(self, f.name) != getattr(default, f.name)
        ]
        if changed:
            where = (
                "BAM sits at the end of each stage and takes only reduction"
                if self.module == "bam"
                else f"{self.module} is timm's layer with timm's defaults and takes only placement"
            )
            raise AttentionSpecError(
                f"attention.module={self.module}: {', '.join(changed)} configure(s) CBAM's gates (module=cbam); {where}"
            )

    @property
    def enabled(self) -> bool:
        return self.module != "cbam" or self.channel or self.spatial

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
    """Whether ``cbam.fused`` implements this variant (CBAM's gates, but for the conv1x1 descriptor and
    the additive parallel combination)."""
    if spec.module != "cbam" or spec.spatial and spec.descriptor != "pool":
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
        AttentionSpec("bam", module="bam"),  # BAM (BMVC 2018), the same authors' module between stages
        # timm's layers, named as timm names them; its SE and CBAM are "timm_se" and "timm_cbam"
        *(
            AttentionSpec(name if name not in ("se", "cbam") else f"timm_{name}", module=f"timm_{name}")
            for name in TIMM_LAYERS
        ),
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
