"""The attention modules of CBAM (Woo et al., ECCV 2018, section 3).

Each module holds the reference implementation (straightforward autograd, the methods here) and
hands its work to ``cbam.fused`` when its ``impl`` says so (see ``AttentionModule``).

Reductions are ``mean`` / ``amax`` over tensor dimensions rather than ``nn.Adaptive*Pool2d``:
the adaptive max pool gives NaN under AMP + channels_last, is non-deterministic in CUDA
backward and exports badly to ONNX.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import create_attn
from torch import nn
from torch.nn import functional as nnf

from .fused import FusedPlan, fused_or_none
from .spec import AttentionSpec, fused_supported, resolve_spec


class AttentionModule(nn.Module):
    """Base class of every gate; backbones use it to leave attention init to the module itself.

    ``impl`` picks the implementation: "reference" (plain autograd, the methods below),
    "fused" (``cbam.fused``: one autograd Function with generated kernels) or "auto" (fused on the
    devices where it measured faster, when its kernels compile there and the variant is supported; else
    reference). ``cbam.fused.dispatch`` decides per call, and says why the reference runs where it does
    (under ``torch.compile``, with forward hooks, after a compile failure, ...).
    """

    impl = "reference"

    def _set_impl(self, impl: str, spec: AttentionSpec) -> None:
        spec = dataclasses.replace(spec, impl=impl)  # validates: "fused" must be supported
        self.impl = impl if fused_supported(spec) else "reference"

    def fused_plan(self, bn: nn.BatchNorm2d | None) -> FusedPlan:
        raise NotImplementedError

    def forward_tail(
        self, x: torch.Tensor, bn: nn.Module, shortcut: torch.Tensor, *, producer: nn.Module | None = None
    ) -> torch.Tensor:
        """relu(attention(bn(x)) + shortcut): a residual block's tail, one fused call where possible
        (``cbam.fused.dispatch``). ``producer``: the module whose output x is (nothing else reads x
        afterwards, so evaluation may write the result into it)."""
        y = fused_or_none(self, x, bn, shortcut, producer=producer)
        return y if y is not None else nnf.relu(self(bn(x)) + shortcut, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused_or_none(self, x)
        return y if y is not None else self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _max_over(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """Max over ``dims``: ``amax`` (its gradient split evenly between tied maxima, as the fused kernels do),
    or, under ``torch.compile``, ``max(dim).values`` with its gradient routed by index. Inductor
    finds amax's ties by comparing the input, which it may recompute at a higher precision than the
    max it saved: with bf16 autocast no position matched and the gradient was NaN."""
    if not torch.compiler.is_compiling():
        return x.amax(dim=dims, keepdim=keepdim)
    if len(dims) == 1:
        return x.max(dim=dims[0], keepdim=keepdim).values
    return x.flatten(dims[0], dims[-1]).max(dim=dims[0], keepdim=keepdim).values  # consecutive dims


def channel_pool(x: torch.Tensor, pool: str) -> list[torch.Tensor]:
    """Spatial pooling of an (N, C, H, W) map into (N, C) descriptors: F^c_avg and/or F^c_max."""
    pooled = []
    if pool in ("avg", "avgmax"):
        pooled.append(x.mean(dim=(2, 3)))
    if pool in ("max", "avgmax"):
        pooled.append(_max_over(x, (2, 3)))
    return pooled


def spatial_pool(x: torch.Tensor) -> torch.Tensor:
    """Channel pooling of an (N, C, H, W) map into the (N, 2, H, W) descriptor [max; mean].

    The order follows the reference code (``ChannelPool``: max first); the paper writes
    [AvgPool; MaxPool]. The two are the same function class, with the conv's input channels swapped.
    """
    return torch.cat([_max_over(x, (1,), keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)


class ChannelGate(AttentionModule):
    """Channel attention, Eq. (2): Mc(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))).

    One MLP (C -> C/r -> C, with biases, ReLU between) is shared by the pooled descriptors.
    ``pool="avg"`` is the SE block (Hu et al.), ``"max"`` and ``"avgmax"`` are Table 1's others.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool: str = "avgmax",
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        impl: str = "auto",
    ):
        super().__init__()
        spec = AttentionSpec(channel=True, reduction=reduction, pool=pool)
        self._set_impl(impl if (act_layer, gate_layer) == (nn.ReLU, nn.Sigmoid) else "reference", spec)
        self.pool = pool
        self.mlp = nn.Sequential(
            nn.Linear(channels, spec.hidden_units(channels)),
            act_layer(),
            nn.Linear(spec.hidden_units(channels), channels),
        )
        self.gate = gate_layer()  # its output is Mc (N, C): forward hooks read it for logging

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Mc(F) of shape (N, C, 1, 1)."""
        return self.attention_from_pooled(channel_pool(x, self.pool))

    def attention_from_pooled(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """Mc from the pooled (N, C) descriptors.

        The MLP's last layer is linear, so Eq. (2)'s sum MLP(avg) + MLP(max) = W1 (h(avg) + h(max)) + 2 b1
        (h: the layers before it) is taken before that layer: its matmul runs on N rows instead of 2N
        (a quarter of the MLP's multiply-adds, forward and backward)."""
        first, act, last = self.mlp
        hidden = act(first(torch.cat(pooled))).view(len(pooled), pooled[0].shape[0], -1).sum(0)
        logits = nnf.linear(hidden, last.weight, last.bias * len(pooled))
        return self.gate(logits)[:, :, None, None]

    def fused_plan(self, bn: nn.BatchNorm2d | None) -> FusedPlan:
        return FusedPlan("channel", self, None, bn)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SpatialGate(AttentionModule):
    """Spatial attention, Eq. (3): Ms(F) = sigmoid(conv_kxk([AvgPool_c(F); MaxPool_c(F)])).

    ``descriptor="conv1x1"`` replaces channel pooling by a learned 1x1 conv C -> 1 (Table 2).
    ``bn`` adds the reference code's BatchNorm after the conv (momentum 0.01), and
    ``bn_zero_init`` sets its gamma to 0 so that the gate starts as a flat 0.5.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        descriptor: str = "pool",
        bn: bool = True,
        bn_zero_init: bool = True,
        gate_layer: type[nn.Module] = nn.Sigmoid,
        impl: str = "auto",
    ):
        super().__init__()
        spec = AttentionSpec(spatial=True, kernel_size=kernel_size, descriptor=descriptor)  # validates
        self._set_impl(impl if gate_layer is nn.Sigmoid else "reference", spec)
        self.descriptor = descriptor
        self.project = nn.Conv2d(channels, 1, 1, bias=False) if descriptor == "conv1x1" else None
        in_maps = 1 if descriptor == "conv1x1" else 2
        self.conv = nn.Conv2d(in_maps, 1, kernel_size, padding=kernel_size // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(1, momentum=0.01) if bn else None
        if self.bn is not None and bn_zero_init:
            nn.init.zeros_(self.bn.weight)
        self.gate = gate_layer()  # its output is Ms (N, 1, H, W): forward hooks read it for logging

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial descriptor fed to the conv: (N, 2, H, W) pooled or (N, 1, H, W) projected."""
        return self.project(x) if self.project is not None else spatial_pool(x)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Ms(F) of shape (N, 1, H, W)."""
        return self.attention_from_descriptor(self.describe(x))

    def attention_from_descriptor(self, desc: torch.Tensor) -> torch.Tensor:
        """Ms from the spatial descriptor."""
        logits = self.conv(desc)
        if self.bn is not None:
            logits = self.bn(logits)
        return self.gate(logits)

    def fused_plan(self, bn: nn.BatchNorm2d | None) -> FusedPlan:
        return FusedPlan("spatial", None, self, bn)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(AttentionModule):
    """Convolutional Block Attention Module, Eq. (1), in any of Table 3's arrangements.

    - ``channel_first`` (the paper's CBAM): F' = Mc(F) * F, F'' = Ms(F') * F'.
    - ``spatial_first``: F' = Ms(F) * F, F'' = Mc(F') * F'.
    - ``parallel``: both maps are computed from the same input F. The paper gives no formula;
      we define F'' = Mc(F) * Ms(F) * F (``parallel_combine="mul"``, default): it is exactly the
      sequential module with the second gate looking at F instead of F', so Table 3 isolates the
      arrangement and nothing else, and each position keeps a gate in (0, 1) as in the other two.
      The rejected alternative, the mean of the two branches F'' = (Mc(F) + Ms(F)) / 2 * F (BAM-like
      additive fusion), stays selectable as ``parallel_combine="add"``; it changes the gate's range
      and lets one branch's gate compensate for the other's.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        pool: str = "avgmax",
        kernel_size: int = 7,
        descriptor: str = "pool",
        spatial_bn: bool = True,
        spatial_bn_zero_init: bool = True,
        order: str = "channel_first",
        parallel_combine: str = "mul",
        impl: str = "auto",
    ):
        super().__init__()
        spec = AttentionSpec(
            channel=True, spatial=True, descriptor=descriptor, order=order, parallel_combine=parallel_combine
        )
        self._set_impl(impl, spec)
        self.order = order
        self.parallel_combine = parallel_combine
        # The gates inside are always run by this module (reference or fused), never on their own.
        self.channel_gate = ChannelGate(channels, reduction, pool, impl="reference")
        self.spatial_gate = SpatialGate(
            channels, kernel_size, descriptor, spatial_bn, spatial_bn_zero_init, impl="reference"
        )

    def fused_plan(self, bn: nn.BatchNorm2d | None) -> FusedPlan:
        return FusedPlan(self.order, self.channel_gate, self.spatial_gate, bn)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "channel_first":
            return self.spatial_gate(self.channel_gate(x))
        if self.order == "spatial_first":
            return self.channel_gate(self.spatial_gate(x))
        mc, ms = self.channel_gate.attention(x), self.spatial_gate.attention(x)
        if self.parallel_combine == "mul":
            return x * (mc * ms)
        return x * ((mc + ms) * 0.5)


def build_attention(channels: int, spec) -> nn.Module:
    """The attention module for a block with ``channels`` channels (``nn.Identity`` for "none", and for
    BAM, which sits between stages: ``cbam.bam``).

    ``spec`` is a preset name (``cbam.PRESETS``), a mapping of ``AttentionSpec`` fields (optionally
    with ``preset``), or an ``AttentionSpec``. Bad specs raise ``AttentionSpecError``.
    """
    spec = resolve_spec(spec)
    if spec.module.startswith("timm_"):
        return create_attn(spec.module.removeprefix("timm_"), channels)
    if spec.channel and spec.spatial:
        return CBAM(
            channels,
            spec.reduction,
            spec.pool,
            spec.kernel_size,
            spec.descriptor,
            spec.spatial_bn,
            spec.spatial_bn_zero_init,
            spec.order,
            spec.parallel_combine,
            spec.impl,
        )
    if spec.channel:
        return ChannelGate(channels, spec.reduction, spec.pool, impl=spec.impl)
    if spec.spatial:
        return SpatialGate(
            channels, spec.kernel_size, spec.descriptor, spec.spatial_bn, spec.spatial_bn_zero_init, impl=spec.impl
        )
    return nn.Identity()
