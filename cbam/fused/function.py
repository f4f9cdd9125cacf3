"""The fused CBAM tail as one ``torch.autograd.Function``: y = relu(BN(x) * Mc * Ms + shortcut), Eq. (1)
with the block's last BatchNorm and the residual addition, whose forward and backward are each one
compiled graph (``graphs``); on the CPU, evaluation of float32 channels_last maps goes to a hand-written
kernel instead (``cpu_tail``: two passes over x where the graph needs three)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import spec
from . import cpu_tail
from .compiler import kernel_mode
from .graphs import TailConfig, running_bn_affine, tail_backward, tail_forward
from .small import BatchNormParams, MlpParams, SpatialParams, mlp_forward, pick_pool

# Table 3's arrangements of both gates, and a gate alone
ORDERS = (*spec.ORDERS, "channel", "spatial")


@dataclass
class FusedPlan:
    """What one fused call computes: which gates, in which order, with which BatchNorm in front."""

    order: str  # one of ORDERS
    channel_gate: nn.Module | None
    spatial_gate: nn.Module | None
    bn: nn.BatchNorm2d | None

    @property
    def params(self) -> list[nn.Parameter]:
        """The BatchNorm's and the gates' parameters, in the order of ``TailGrads``' gradients."""
        mods = [m for m in (self.bn, self.channel_gate, self.spatial_gate) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def config(self, *, record: bool, overwrite_x: bool = False) -> TailConfig:
        cg, sg = self.channel_gate, self.spatial_gate
        sbn = sg.bn if sg is not None else None
        return TailConfig(
            order=self.order,
            pool=cg.pool if cg is not None else None,
            spatial=sg is not None,
            padding=sg.conv.padding[0] if sg is not None else 0,
            spatial_bn=_bn_mode(sbn),
            spatial_bn_eps=sbn.eps if sbn is not None else 0.0,
            bn=_bn_mode(self.bn),
            bn_eps=self.bn.eps if self.bn is not None else 0.0,
            record=record,
            overwrite_x=overwrite_x,
        )

    def inputs(self) -> tuple[BatchNormParams | None, MlpParams | None, SpatialParams | None]:
        """The BatchNorm's, the MLP's and the spatial gate's tensors, as the graphs take them."""
        bn, cg, sg = self.bn, self.channel_gate, self.spatial_gate
        mlp = conv = None
        if cg is not None:
            first, _, last = cg.mlp
            mlp = MlpParams(first.weight, first.bias, last.weight, last.bias)
        if sg is not None:
            conv = SpatialParams(sg.conv.weight, sg.conv.bias, None if sg.bn is None else _bn_params(sg.bn))
        return None if bn is None else _bn_params(bn), mlp, conv


def _bn_mode(bn: nn.BatchNorm2d | None) -> str | None:
    """Which statistics a BatchNorm normalises with, as ``nn.BatchNorm2d.forward`` decides."""
    if bn is None:
        return None
    return "batch" if bn.training or bn.running_mean is None else "running"


def _bn_params(bn: nn.BatchNorm2d) -> BatchNormParams:
    return BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _update_running_stats(bn: nn.BatchNorm2d | None, batch, count: int) -> None:
    """Running statistics from a batch's (mean, biased variance) over ``count`` values, as
    ``nn.BatchNorm2d`` updates them (unbiased variance, momentum or cumulative average)."""
    if batch is None or not bn.track_running_stats or bn.running_mean is None:
        return
    mean, var = batch
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype).reshape(bn.running_mean.shape), factor)
    unbiased = var.detach() * (count / max(count - 1, 1))
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype).reshape(bn.running_var.shape), factor)


def _cpu_eval_tail(plan: FusedPlan, cfg: TailConfig, x, shortcut):
    """The forward graph without recording, by ``cpu_tail``'s kernel (same equations, two passes)."""
    bn, mlp, conv = plan.inputs()
    a = None
    if bn is not None:
        _, _, affine = running_bn_affine(BatchNormParams(*(p.detach().float() for p in bn)), cfg.bn_eps, torch.float32)
    else:
        affine = (torch.ones(x.shape[1]), torch.zeros(x.shape[1]))
    if cfg.pool is not None:
        mlp = MlpParams(*(p.detach().float() for p in mlp))
        a = mlp_forward(pick_pool(cfg.pool, cpu_tail.channel_pool(x, *affine)), mlp)[0]
    out = x if cfg.overwrite_x else torch.empty_like(x)
    return cpu_tail.spatial_output(cfg, x, shortcut, affine, a, conv, out)


def _run_forward(plan: FusedPlan, x, shortcut, *, record: bool, overwrite_x: bool = False):
    """(cfg, y, what backward needs): the forward graph, or the CPU kernel where it applies."""
    cfg = plan.config(record=record, overwrite_x=overwrite_x)
    if (
        kernel_mode(x.device.type) == "compiled"
        and _get_current_dispatch_mode() is None
        and cpu_tail.applicable(cfg, x, shortcut)
    ):
        return cfg, _cpu_eval_tail(plan, cfg, x, shortcut), None
    y, batch_stats, saved = tail_forward(cfg, x, shortcut, *plan.inputs())
    n, c, h, w = x.shape
    _update_running_stats(plan.bn, batch_stats.bn, n * h * w)
    _update_running_stats(
        plan.spatial_gate.bn if plan.spatial_gate is not None else None, batch_stats.spatial_bn, n * h * w
    )
    return cfg, y, saved


class FusedGatedTail(torch.autograd.Function):
    """y = relu(BN(x) * Mc * Ms + shortcut) in one Function (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan: FusedPlan, x, shortcut, *params):
        cfg, y, saved = _run_forward(plan, x, shortcut, record=True)
        ctx.plan, ctx.cfg, ctx.small = plan, cfg, saved
        ctx.shortcut_dtype = shortcut.dtype if shortcut is not None else None
        ctx.save_for_backward(x, y if shortcut is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        plan: FusedPlan = ctx.plan
        x, y = ctx.saved_tensors  # y gives the ReLU's mask (None without a shortcut: no ReLU)
        # The ReLU's backward, as autograd runs it: one vectorised pass (torch.where with a scalar measured
        # 8x slower); the three passes of tail_backward read g instead of dy and y.
        g = dy if y is None else torch.ops.aten.threshold_backward(dy, y, 0)
        _, mlp, conv = plan.inputs()
        grads = tail_backward(ctx.cfg, g, x, ctx.small, mlp, conv)
        d_sc = None if ctx.shortcut_dtype is None else g.to(ctx.shortcut_dtype)
        params = plan.params
        d_params = [d.to(p.dtype) for d, p in zip([*grads.bn, *grads.mlp, *grads.spatial], params, strict=True)]
        return (None, grads.x, d_sc, *d_params)


def fused_gated_tail(
    plan: FusedPlan, x: torch.Tensor, shortcut: torch.Tensor | None = None, *, overwrite_x: bool = False
) -> torch.Tensor:
    """relu(BN(x) * Mc * Ms + shortcut) (BN and the shortcut optional), with fused kernels.
    ``overwrite_x``: x is a temporary that evaluation without gradients may overwrite with the result
    (no new full-size tensor, which glibc page-faults in afresh each time above 32 MiB). Raises
    ``CompileFailed`` if the forward graph cannot be compiled (x is then untouched)."""
    # Kernels accumulate in float32 whatever the autocast state; the small parts run in float32 too.
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled():
            params = plan.params
            if any(t is not None and t.requires_grad for t in (x, shortcut, *params)):
                return FusedGatedTail.apply(plan, x, shortcut, *params)
        return _run_forward(plan, x, shortcut, record=False, overwrite_x=overwrite_x and not x.requires_grad)[1]
