"""The fused CBAM tail's two graphs, each compiled whole (``cbam.fused.compiler``): ``tail_forward``,
y = relu(BN(x) * Mc * Ms + shortcut) with what backward needs, and ``tail_backward``, every gradient
written out. They call the full-size passes (``passes``) and the small parts (``small``) in the order
that the gates' arrangement (Table 3) requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .compiler import CompiledGraph
from .passes import (
    Affine,
    BatchNormGrads,
    BatchNormState,
    Gates,
    PoolGrad,
    _acc,
    k_channel_pool,
    k_channel_sums,
    k_input_grads,
    k_output,
    k_reduce_c,
    k_reduce_hw,
    k_spatial_pool,
    k_x_stats,
)
from .small import (
    BatchNormParams,
    MlpParams,
    SpatialParams,
    SpatialSaved,
    mlp_backward,
    mlp_forward,
    pick_pool,
    spatial_backward,
    spatial_forward,
    stored,
)


@dataclass(frozen=True)
class TailConfig:
    """The static part of a fused call; compiled graphs specialise on it."""

    order: str  # one of ORDERS (cbam.fused.function)
    pool: str | None  # the channel gate's pooling ("avg", "max", "avgmax"); None: no channel gate
    spatial: bool  # a spatial gate
    padding: int  # of its k x k conv (k // 2)
    spatial_bn: str | None  # its BatchNorm: None, "batch" (training statistics) or "running"
    spatial_bn_eps: float
    bn: str | None  # the block's BatchNorm before the gates: None, "batch" or "running"
    bn_eps: float
    record: bool  # keep what backward needs
    overwrite_x: bool  # without record: write y into x's memory


class Saved(NamedTuple):
    """What ``tail_forward`` keeps for ``tail_backward`` besides x and y: all (N, C), (N, H, W) or smaller."""

    bn: Affine
    bn_state: BatchNormState | None
    gates: Gates
    pooled: tuple | None  # the channel gate's (avg, max) descriptors
    mlp_hidden: tuple | None  # relu(W0 p + b0) per descriptor and its sum over them
    spatial: SpatialSaved | None


class BatchStats(NamedTuple):
    """The BatchNorms' batch (mean, biased variance), for their running statistics (None: not in training)."""

    bn: tuple | None
    spatial_bn: tuple | None


class TailGrads(NamedTuple):
    x: torch.Tensor
    bn: list  # (dgamma, dbeta) of the block's BatchNorm; empty without one
    mlp: list  # of MlpParams' four tensors
    spatial: list  # of the conv's weight, [bias,] [gamma, beta]


def running_bn_affine(bn: BatchNormParams, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Affine]:
    """BN(x) = x * s + t from running statistics: (mean, invstd, Affine(s, t)), computed in ``dtype``."""
    mean = bn.running_mean.to(dtype)
    invstd = torch.rsqrt(bn.running_var.to(dtype) + eps)
    s = bn.weight * invstd
    return mean, invstd, Affine(s, bn.bias - mean * s)


def _tail_forward(cfg: TailConfig, x, shortcut, bn: BatchNormParams | None, mlp: MlpParams | None, conv):
    """y = relu(BN(x) * a * b + shortcut) (BN, gates and shortcut optional), the BatchNorms' ``BatchStats``
    and, with ``cfg.record``, what backward needs (``Saved``, else None). ``conv``: ``SpatialParams``."""
    affine, bn_state, x_stats, bn_batch = Affine(None, None), None, None, None
    if cfg.bn == "batch":
        mean_nc, var_nc, max_nc, min_nc = k_x_stats(x)
        mean = mean_nc.mean(0)
        var = (var_nc + (mean_nc - mean) ** 2).mean(0)  # parallel variance: within + between images
        invstd = torch.rsqrt(var + cfg.bn_eps)
        s = bn.weight * invstd
        affine, bn_state = Affine(s, bn.bias - mean * s), BatchNormState(mean, invstd, batch=True)
        bn_batch, x_stats = (mean, var), (mean_nc, max_nc, min_nc)
    elif cfg.bn == "running":
        mean, invstd, affine = running_bn_affine(bn, cfg.bn_eps, _acc(x).dtype)
        affine = Affine(*stored(*affine))  # else inductor recomputes the rsqrt for every element
        bn_state = BatchNormState(mean, invstd, batch=False)
    order = cfg.order
    a = b = pooled = mlp_hidden = spatial_saved = spatial_batch = None
    if cfg.pool is not None and order != "spatial_first":
        if x_stats is not None:  # pooling of F = x * s + t from x's statistics (exact: s * x + t is monotone)
            mean_nc, max_nc, min_nc = x_stats
            s, t = affine
            pooled = (mean_nc * s + t, torch.where(s >= 0, max_nc * s + t, min_nc * s + t))
        else:
            pooled = k_channel_pool(x, affine, None)
        a, *mlp_hidden = mlp_forward(pick_pool(cfg.pool, pooled), mlp)
    if cfg.spatial:
        desc = k_spatial_pool(x, affine, a if order == "channel_first" else None)
        spatial_options = dict(padding=cfg.padding, bn_mode=cfg.spatial_bn, bn_eps=cfg.spatial_bn_eps)
        b, spatial_batch, spatial_saved = spatial_forward(desc, conv, **spatial_options)
    if cfg.pool is not None and order == "spatial_first":
        pooled = k_channel_pool(x, affine, b)
        a, *mlp_hidden = mlp_forward(pick_pool(cfg.pool, pooled), mlp)
    y = k_output(x, affine, Gates(a, b), shortcut)
    if cfg.overwrite_x:
        y = x.copy_(y)
    stats = BatchStats(bn_batch, spatial_batch if cfg.spatial_bn == "batch" else None)
    if not cfg.record:
        return y, stats, None
    hidden = None if mlp_hidden is None else tuple(mlp_hidden)
    return y, stats, Saved(affine, bn_state, Gates(a, b), pooled, hidden, spatial_saved)


def _channel_and_bn_grads(sums, bn: Affine, bn_state: BatchNormState, a, hw: int, *, v_has_a: bool):
    """From ``k_channel_sums``: dL/da, the channel max's tie count, and a function that turns the
    gradients w.r.t. the pooled descriptors (d_avg, d_max) into (dgamma, dbeta), the sums over
    N, H, W of d_f * xhat and d_f for d_f = g * a * b + du + dv (dv * a when v = F * a)."""
    p, q, r, rx, ux, ties, tie_x = sums
    s, beta = bn.s, bn.t + bn_state.mean * bn.s  # F = xc * s + beta
    if r is None:  # no spatial gate
        r = rx = torch.zeros_like(p)
    if v_has_a:  # dL/da = sum (g * b + dv) * F
        d_a, row, row_x = (q + rx) * s + (p + r) * beta, a * (p + r), a * (q + rx)
    else:
        d_a, row, row_x = q * s + p * beta, a * p + r, a * q + rx

    def bn_grads(d_avg, d_max):
        d_row, d_row_x = row, row_x
        if d_avg is not None:  # AvgPool spreads d_avg over H * W: sum du = d_avg, sum du * xc = d_avg * mean xc
            d_row, d_row_x = d_row + d_avg, d_row_x + d_avg * ux / hw
        if d_max is not None:  # MaxPool splits d_max over the ties, whose xc sum to tie_x
            d_row, d_row_x = d_row + d_max, d_row_x + d_max * tie_x / ties
        return d_row_x.sum(0) * bn_state.invstd, d_row.sum(0)

    return d_a, ties, bn_grads


def _tail_backward(cfg: TailConfig, g, x, saved: Saved, mlp: MlpParams | None, conv: SpatialParams | None):
    """Gradients of ``_tail_forward`` from g = dL/d(F * a * b) (the ReLU's mask applied to dL/dy), as
    ``TailGrads``. The per-position terms that the full-size passes read are ``stored`` first."""
    affine, gates, pooled = saved.bn, saved.gates, saved.pooled
    a, b = gates
    order, hw = cfg.order, x.shape[2] * x.shape[3]
    cmax = pooled[1] if cfg.pool is not None and cfg.pool != "avg" else None
    u_grad = v_grad = bn_grads = None
    mlp_grads = spatial_grads = []

    def channel_backward(d_a, ties):
        """(u's PoolGrad, (d_avg, d_max), the MLP's gradients) from dL/da."""
        d_pooled, grads = mlp_backward(d_a, a, pick_pool(cfg.pool, pooled), *saved.mlp_hidden, mlp)
        d_avg = d_pooled[0] if cfg.pool != "max" else None
        d_max = d_pooled[-1] if cfg.pool != "avg" else None
        du_avg, du_max = stored(None if d_avg is None else d_avg * (1 / hw), None if d_max is None else d_max / ties)
        return PoolGrad(du_avg, du_max, cmax), (d_avg, d_max), grads

    def spatial_gate_backward(d_b, ties):
        """(v's PoolGrad, the spatial gate's gradients) from dL/db."""
        (d_smax, d_smean), grads = spatial_backward(
            d_b, saved.spatial, conv, padding=cfg.padding, bn_mode=cfg.spatial_bn
        )
        return PoolGrad(*stored(d_smean * (1 / x.shape[1]), d_smax / ties), saved.spatial.desc[0]), grads

    if order == "spatial_first":  # the channel gate's input F * b depends on b: channel gate first
        u_grad, _, mlp_grads = channel_backward(*k_reduce_hw(g, x, affine, gates, None, cmax, u_has_b=True))
        smax = saved.spatial.desc[0]
        v_grad, spatial_grads = spatial_gate_backward(*k_reduce_c(g, x, affine, gates, u_grad, smax, v_has_a=False))
    else:
        v_has_a = order == "channel_first"
        if cfg.spatial:
            smax = saved.spatial.desc[0]
            d_b_ties = k_reduce_c(g, x, affine, Gates(a, None), None, smax, v_has_a=v_has_a)
            v_grad, spatial_grads = spatial_gate_backward(*d_b_ties)
        if cfg.pool is not None and cfg.bn is not None:
            mean = saved.bn_state.mean
            sums = k_channel_sums(g, x, affine, mean, gates, v_grad, cmax, v_has_a=v_has_a)
            d_a, ties, bn_grads_of = _channel_and_bn_grads(sums, affine, saved.bn_state, a, hw, v_has_a=v_has_a)
            u_grad, (d_avg, d_max), mlp_grads = channel_backward(d_a, ties)
            d_gamma, d_beta = bn_grads_of(d_avg, d_max)
            m = x.numel() // x.shape[1]
            bn_grads = BatchNormGrads(d_gamma, d_beta, *stored(d_beta * (1 / m), d_gamma * (1 / m)))
        elif cfg.pool is not None:
            v_grad_of_a = v_grad if v_has_a else None
            u_grad, _, mlp_grads = channel_backward(*k_reduce_hw(g, x, affine, gates, v_grad_of_a, cmax, u_has_b=False))
    d_x, d_gamma, d_beta = k_input_grads(
        g, x, affine, gates, (u_grad, v_grad), saved.bn_state, order=order, bn_grads=bn_grads
    )
    return TailGrads(d_x, [] if cfg.bn is None else [d_gamma, d_beta], mlp_grads, spatial_grads)


tail_forward = CompiledGraph(_tail_forward)
# A backward that cannot be compiled runs the same equations op by op: too late in the step for the reference.
tail_backward = CompiledGraph(_tail_backward, fallback=_tail_backward)
