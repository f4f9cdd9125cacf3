"""Fused CBAM: the gates of Eq. (1)-(3), the block's last BatchNorm, the shortcut addition and the
ReLU as one ``torch.autograd.Function`` whose forward and backward are each one generated graph.

Why hand-written rather than plain autograd: the reference module keeps every full-size
intermediate (F, F', F'', the max-reduction masks) for backward and makes a new tensor at each
step. Here forward writes one full-size tensor (the block output y) and backward saves only

- x, the conv output that BatchNorm saves anyway, F = BN(x) = x * s + t being recomputed inside
  each pass;
- y, which the next block's conv saves as its input (same storage);
- (N, C) and (N, H*W) tensors: the gates a = Mc and b = Ms, the pooled maxima, BN statistics, the
  MLP's hidden layer and the spatial conv's normalised output.

Forward (``tail_forward``) and backward (``tail_backward``) are plain tensor functions with the
gradients written out, the MLP's and the k x k conv's included, compiled whole with
``torch.compile`` (inductor: C++ on CPU, Triton on CUDA; ``cbam.graphs``, which falls back to the
reference when a compiler fails). A pointwise prologue (BN, gates, ReLU mask) fuses into each
full-size reduction and nothing full-size is materialised in between; one compiled call per
direction and block measured far cheaper than separate kernels with the small parts run as autograd
graphs between them (Python, guards and small-graph work; figures in docs/performance.md). Without
gradients the same forward runs without keeping anything; on the CPU, evaluation of float32 channels_last maps goes to a
hand-written kernel instead (``cbam.cpu_tail``: two passes over x where the graph needs three).

Max pooling's gradient is split evenly between tied maxima, as ``torch.amax`` does; ties are found
by recomputing the pooled input with the same operations as forward (inductor compiles with
``-ffp-contract=off``, so both passes round identically).

Notation (per block): x conv output (N, C, H, W); F = x * s + t; a (N, C) channel gate; b (N, H, W)
spatial gate; u the channel gate's input (F * b for "spatial_first", else F); v the spatial gate's
input (F * a for "channel_first", else F); y = relu(F * a * b + shortcut); g = dL/d(F * a * b), the
ReLU's mask applied to dL/dy (= dL/dshortcut).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as nnf
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import cpu_tail, spec
from .graphs import CompiledGraph, CompileFailed, kernel_mode

# Table 3's arrangements of both gates, and a gate alone
ORDERS = (*spec.ORDERS, "channel", "spatial")


# Devices on which impl=auto runs the fused Function: where it measured faster than the reference
# (docs/performance.md). On CUDA the reference in eager mode measured faster, and whole-model
# compilation (trainer.compile) fuses the reference's own ops.
AUTO_FUSED_DEVICES = ("cpu",)


def auto_uses_fused(device_type: str) -> bool:
    """Whether impl=auto runs the fused Function on this device."""
    mode = kernel_mode(device_type)
    return mode == "eager" or (mode == "compiled" and device_type in AUTO_FUSED_DEVICES)


# ---- the graphs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailConfig:
    """The static part of a fused call; compiled graphs specialise on it."""

    order: str  # one of ORDERS
    pool: str | None  # the channel gate's pooling ("avg", "max", "avgmax"); None: no channel gate
    spatial: bool  # a spatial gate
    padding: int  # of its k x k conv (k // 2)
    spatial_bn: str | None  # its BatchNorm: None, "batch" (training statistics) or "running"
    spatial_bn_eps: float
    bn: str | None  # the block's BatchNorm before the gates: None, "batch" or "running"
    bn_eps: float
    record: bool  # keep what backward needs
    overwrite_x: bool  # without record: write y into x's memory


# ---- full-size passes ------------------------------------------------------------------------------------------


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float32 for float32/half/bfloat16 inputs, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def _bn(x, s, t):
    """F = BN(x) = x * s + t per channel (s, t None: no BN)."""
    f = _acc(x)
    return f if s is None else f * s[None, :, None, None] + t[None, :, None, None]


def _gated(f, a, b):
    if a is not None:
        f = f * _nc(a)
    if b is not None:
        f = f * b[:, None]
    return f


def _hw_tile(x: torch.Tensor) -> int:
    """Rows per tile for reductions over H, W of a channels_last map; 1 reduces in one step.

    Written here because inductor's C++ loop for such a reduction walks each vector of channels down
    all H*W rows (a stride of C floats); summing tiles of a few rows first, then the tiles, keeps the
    working set in L1. The channel pooling and x's statistics measured faster with it (7 rows did best
    of 4 to 16); backward's per-channel sums, whose reductions carry a longer prologue, measured slower
    and reduce in one step (docs/performance.md)."""
    n, c, h, w = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return 1
    for rows in (7, 8, 6, 5, 4):  # a loop, not next(generator): dynamo before torch 2.5 cannot trace that
        if h * w % rows == 0 and h * w > rows:
            return rows
    return 1


def _reduce_hw(t: torch.Tensor, op, tile: int) -> torch.Tensor:
    """op (torch.sum, amax or amin) over H and W of (N, C, H, W) t, in tiles of ``tile`` rows."""
    if tile == 1:
        return op(t, dim=(2, 3))
    n, c, h, w = t.shape
    rows = t.permute(0, 2, 3, 1).reshape(n, h * w // tile, tile, c)
    return op(op(rows, dim=2), dim=1)


def _d_channel_input(u, terms):
    """Gradient w.r.t. u from (d_avg / (H*W), d_max / ties, cmax), (N, C) each: AvgPool spreads
    evenly over H, W, MaxPool goes to the (tied) maxima."""
    du_avg, du_max, cmax = terms
    du = 0.0
    if du_avg is not None:
        du = _nc(du_avg)
    if du_max is not None:
        du = du + torch.where(u == _nc(cmax), _nc(du_max), 0.0)
    return du


def _d_spatial_input(v, terms):
    """Gradient w.r.t. v from (d_mean / C, d_max / ties, smax), (N, H, W) each, of the [max; mean]
    channel pooling."""
    dv_mean, dv_max, smax = terms
    return dv_mean[:, None] + torch.where(v == smax[:, None], dv_max[:, None], 0.0)


def k_x_stats(x):
    """Per (n, c): mean, variance, max and min of x over H, W (one pass; BN statistics and the
    channel pooling of F = x * s + t both follow from them). The sums are taken around a
    shift k = x[n, c, 0, 0], a sample of the data, so that E[(x-k)^2] - E[x-k]^2 does not cancel."""
    xf = _acc(x)
    hw, tile = x.shape[2] * x.shape[3], _hw_tile(x)
    shift = xf[:, :, :1, :1]
    d = xf - shift
    mean_d = _reduce_hw(d, torch.sum, tile) / hw
    var = (_reduce_hw(d.square(), torch.sum, tile) / hw - mean_d * mean_d).clamp_min(0)
    return mean_d + shift[:, :, 0, 0], var, _reduce_hw(xf, torch.amax, tile), _reduce_hw(xf, torch.amin, tile)


def k_channel_pool(x, s, t, b):
    """AvgPool and MaxPool over H, W of u = F (* b)."""
    u = _gated(_bn(x, s, t), None, b)
    tile = _hw_tile(x)
    return _reduce_hw(u, torch.sum, tile) / (x.shape[2] * x.shape[3]), _reduce_hw(u, torch.amax, tile)


def k_spatial_pool(x, s, t, a):
    """MaxPool and AvgPool over channels of v = F (* a): the (N, H, W) halves of Eq. (3)'s descriptor."""
    v = _gated(_bn(x, s, t), a, None)
    return v.amax(dim=1), v.mean(dim=1)


def k_output(x, s, t, a, b, shortcut):
    """y = relu(F * a * b + shortcut), or F * a * b without a shortcut."""
    z = _gated(_bn(x, s, t), a, b)
    if shortcut is not None:
        z = torch.relu(z + _acc(shortcut))
    return z.to(x.dtype)


def k_reduce_hw(g, x, s, t, a, b, u_has_b, v_terms, cmax):
    """Over H, W: dL/da = sum (g * b + dv (if v = F * a)) * F, and the tie count of the channel max."""
    f = _bn(x, s, t)
    g = _gated(_acc(g), None, b)
    if v_terms is not None:
        g = g + _d_spatial_input(f * _nc(a), v_terms)
    d_a = (g * f).sum(dim=(2, 3))
    if cmax is None:
        return d_a, None
    u = f * b[:, None] if u_has_b else f
    return d_a, (u == _nc(cmax)).to(f.dtype).sum(dim=(2, 3))  # float counts: no int64 accumulators


def k_reduce_c(g, x, s, t, a, b, v_has_a, u_terms, smax):
    """Over C: dL/db = sum (g * a + du (if u = F * b)) * F, and the tie count of the spatial max."""
    f = _bn(x, s, t)
    g = _gated(_acc(g), a, None)
    if u_terms is not None:
        g = g + _d_channel_input(f * b[:, None], u_terms)
    d_b = (g * f).sum(dim=1)
    v = f * _nc(a) if v_has_a else f
    return d_b, (v == smax[:, None]).to(f.dtype).sum(dim=1)


def k_channel_sums(g, x, s, t, mean, a, b, v_terms, v_has_a, cmax):
    """Over H, W, per (n, c), when the channel gate's input is F (every order but spatial_first) and a
    BatchNorm precedes; with xc = x - mean, so that F = xc * s + beta:

        p = sum g * b,  q = sum g * b * xc,  r = sum dv,  rx = sum dv * xc,  ux = sum xc,
        ties = the number of positions equal to the channel max cmax,  tie_x = the sum of xc over them.

    dL/da and the BatchNorm's dgamma and dbeta are linear in these (``_channel_and_bn_grads``), so the
    input-gradient pass needs no reduction of its own. Reducing d(BN output) over N, H, W there cost
    more than this whole pass: inductor stored it in full, then walked it channel block by channel
    block (docs/performance.md)."""
    xc = _acc(x) - mean[None, :, None, None]
    f = _bn(x, s, t)
    g = _gated(_acc(g), None, b)
    sums = [g.sum(dim=(2, 3)), (g * xc).sum(dim=(2, 3))]
    if v_terms is not None:
        dv = _d_spatial_input(f * _nc(a) if v_has_a else f, v_terms)
        sums += [dv.sum(dim=(2, 3)), (dv * xc).sum(dim=(2, 3))]
    else:
        sums += [None, None]
    sums.append(xc.sum(dim=(2, 3)))
    if cmax is not None:
        ties = f == _nc(cmax)
        sums += [ties.to(f.dtype).sum(dim=(2, 3)), torch.where(ties, xc, 0.0).sum(dim=(2, 3))]
    else:
        sums += [None, None]
    return tuple(sums)


def _channel_and_bn_grads(sums, s, beta, invstd, a, hw: int, v_has_a: bool):
    """From ``k_channel_sums``: dL/da, the channel max's tie count, and a function that turns the
    gradients w.r.t. the pooled descriptors (d_avg, d_max) into (dgamma, dbeta), the sums over
    N, H, W of d_f * xhat and d_f for d_f = g * a * b + du + dv (dv * a when v = F * a)."""
    p, q, r, rx, ux, ties, tie_x = sums
    if r is None:  # no spatial gate
        r = rx = torch.zeros_like(p)
    if v_has_a:  # dL/da = sum (g * b + dv) * F, F = xc * s + beta
        d_a, row, row_x = (q + rx) * s + (p + r) * beta, a * (p + r), a * (q + rx)
    else:
        d_a, row, row_x = q * s + p * beta, a * p + r, a * q + rx

    def bn_grads(d_avg, d_max):
        d_row, d_row_x = row, row_x
        if d_avg is not None:  # AvgPool spreads d_avg over H * W: sum du = d_avg, sum du * xc = d_avg * mean xc
            d_row, d_row_x = d_row + d_avg, d_row_x + d_avg * ux / hw
        if d_max is not None:  # MaxPool splits d_max over the ties, whose xc sum to tie_x
            d_row, d_row_x = d_row + d_max, d_row_x + d_max * tie_x / ties
        return d_row_x.sum(0) * invstd, d_row.sum(0)

    return d_a, ties, bn_grads


def k_input_grads(g, x, s, t, a, b, order, u_terms, v_terms, bn_stats, bn_training, bn_grads):
    """dL/dx through gates and BN (training: the batch statistics' terms too), dgamma, dbeta.
    ``bn_grads``: (dgamma, dbeta, dbeta / m, dgamma / m) when ``k_channel_sums`` gave them (m = N*H*W);
    else they are reduced here."""
    f = _bn(x, s, t)
    d_f = _gated(_acc(g), a, b)
    if u_terms is not None:
        u_has_b = order == "spatial_first"
        du = _d_channel_input(f * b[:, None] if u_has_b else f, u_terms)
        d_f = d_f + (du * b[:, None] if u_has_b else du)
    if v_terms is not None:
        v_has_a = order == "channel_first"
        dv = _d_spatial_input(f * _nc(a) if v_has_a else f, v_terms)
        d_f = d_f + (dv * _nc(a) if v_has_a else dv)
    if bn_stats is None:
        return d_f.to(x.dtype), None, None
    mean, invstd = bn_stats
    xhat = (_acc(x) - mean[None, :, None, None]) * invstd[None, :, None, None]
    if bn_grads is not None:  # (dgamma, dbeta, dbeta / m, dgamma / m), the quotients taken outside
        d_gamma, d_beta, beta_term, gamma_term = bn_grads
    else:
        d_beta = d_f.sum(dim=(0, 2, 3))
        d_gamma = (d_f * xhat).sum(dim=(0, 2, 3))
        m = x.numel() // x.shape[1]
        beta_term, gamma_term = d_beta * (1 / m), d_gamma * (1 / m)
    if bn_training:
        d_f = d_f - beta_term[None, :, None, None] - xhat * gamma_term[None, :, None, None]
    d_x = d_f * s[None, :, None, None]
    return d_x.to(x.dtype), d_gamma, d_beta


# ---- the small parts: Eq. (2)'s MLP and Eq. (3)'s conv, forward and backward ------------------------------------


def _pick_pool(pool: str, pooled):
    avg, mx = pooled
    return {"avg": (avg,), "max": (mx,), "avgmax": (avg, mx)}[pool]


def _mlp_forward(pooled, w0, b0, w1, b1):
    """Eq. (2): a = sigmoid(sum_k MLP(p_k)) = sigmoid(W1 sum_k relu(W0 p_k + b0) + k b1), the sum taken
    before the last layer as in ``ChannelGate.attention_from_pooled``. Also returns relu(W0 p + b0)
    (k*N rows) and its sum over k, which backward needs."""
    h = torch.relu(torch.addmm(b0, torch.cat(pooled), w0.t()))
    hidden = h.view(len(pooled), pooled[0].shape[0], -1).sum(0)
    return torch.sigmoid(torch.addmm(b1 * len(pooled), hidden, w1.t())), h, hidden


def _mlp_backward(d_a, a, pooled, h, hidden, w0, w1):
    """Gradients of ``_mlp_forward`` w.r.t. the pooled descriptors and (W0, b0, W1, b1)."""
    k = len(pooled)
    d_logits = d_a * a * (1 - a)
    d_h = torch.where(h > 0, (d_logits @ w1).repeat(k, 1), 0.0)
    d_pooled = (d_h @ w0).split(pooled[0].shape[0])
    return d_pooled, [d_h.t() @ torch.cat(pooled), d_h.sum(0), d_logits.t() @ hidden, d_logits.sum(0) * k]


def _stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """(N, H, W) maps as an (N, k, H, W) tensor in channels_last layout: the k x k conv runs 20-60%
    faster on it than on a contiguous one (oneDNN, CPU)."""
    return torch.stack(maps, dim=-1).permute(0, 3, 1, 2)


def _spatial_forward(cfg: TailConfig, desc, weight, bias, gamma, beta, running_mean, running_var):
    """Eq. (3): b = sigmoid(BN(conv_kxk([max; mean]))) (the BN optional, as in ``SpatialGate``). Also
    returns the BN's batch (mean, variance) and its normalised input z_hat and 1 / std for backward."""
    z = nnf.conv2d(_stack_maps(list(desc)), weight, bias, padding=cfg.padding)
    if cfg.spatial_bn is None:
        return torch.sigmoid(z)[:, 0], None, None, None
    if cfg.spatial_bn == "batch":
        mean, var = z.mean(), z.var(correction=0)
        invstd = torch.rsqrt(var + cfg.spatial_bn_eps)
    else:
        mean, var, invstd = running_mean, None, torch.rsqrt(running_var + cfg.spatial_bn_eps)
    z_hat = (z - mean) * invstd
    return torch.sigmoid(z_hat * gamma + beta)[:, 0], (mean, var), z_hat, invstd


def _spatial_backward(cfg: TailConfig, d_b, b, desc, z_hat, invstd, weight, gamma, has_bias: bool):
    """Gradients of ``_spatial_forward`` w.r.t. the descriptor's maps and (weight, [bias,] [gamma, beta])."""
    d_z = (d_b * b * (1 - b))[:, None]
    bn_grads = []
    if cfg.spatial_bn is not None:
        bn_grads = [(d_z * z_hat).sum().reshape(1), d_z.sum().reshape(1)]
        if cfg.spatial_bn == "batch":
            d_z = d_z - d_z.mean() - z_hat * (d_z * z_hat).mean()
        d_z = d_z * (gamma * invstd)
    maps = _stack_maps(list(desc))
    d_maps, d_weight, d_bias = torch.ops.aten.convolution_backward(
        d_z,
        maps,
        weight,
        [1] if has_bias else None,
        [1, 1],
        [cfg.padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, has_bias],
    )
    return (d_maps[:, 0], d_maps[:, 1]), [d_weight, *([d_bias] if has_bias else []), *bn_grads]


# ---- forward and backward graphs -------------------------------------------------------------------------------


def _running_bn_affine(bn_args, eps: float, dtype: torch.dtype):
    """BN(x) = x * s + t from running statistics: (mean, invstd, s, t), computed in ``dtype``.

    bn_args: (gamma, beta, running_mean, running_var)."""
    gamma, beta, running_mean, running_var = bn_args
    mean = running_mean.to(dtype)
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    s = gamma * invstd
    return mean, invstd, s, beta - mean * s


def _tail_forward(cfg: TailConfig, x, shortcut, bn_args, mlp, conv):
    """y = relu(BN(x) * a * b + shortcut) (BN, gates and shortcut optional) and, with ``cfg.record``,
    the small tensors backward needs; also the BatchNorms' batch statistics for their running ones.

    bn_args: (gamma, beta, running_mean, running_var); mlp: (W0, b0, W1, b1); conv: (weight, bias,
    gamma, beta, running_mean, running_var)."""
    s = t = mean = invstd = x_stats = bn_batch = None
    if cfg.bn == "batch":
        mean_nc, var_nc, max_nc, min_nc = k_x_stats(x)
        mean = mean_nc.mean(0)
        var = (var_nc + (mean_nc - mean) ** 2).mean(0)  # parallel variance: within + between images
        invstd = torch.rsqrt(var + cfg.bn_eps)
        s = bn_args[0] * invstd
        t = bn_args[1] - mean * s
        bn_batch, x_stats = (mean, var), (mean_nc, max_nc, min_nc)
    elif cfg.bn == "running":
        mean, invstd, s, t = _running_bn_affine(bn_args, cfg.bn_eps, _acc(x).dtype)
        s, t = _stored(s, t)  # else inductor recomputes the rsqrt for every element
    order = cfg.order
    a = b = pooled = h = hidden = desc = z_hat = z_invstd = spatial_batch = None

    def channel_gate(pooled):
        return _mlp_forward(_pick_pool(cfg.pool, pooled), *mlp)

    if cfg.pool is not None and order != "spatial_first":
        if x_stats is not None:  # pooling of F = x * s + t from x's statistics (exact: s * x + t is monotone)
            mean_nc, max_nc, min_nc = x_stats
            pooled = (mean_nc * s + t, torch.where(s >= 0, max_nc * s + t, min_nc * s + t))
        else:
            pooled = k_channel_pool(x, s, t, None)
        a, h, hidden = channel_gate(pooled)
    if cfg.spatial:
        desc = k_spatial_pool(x, s, t, a if order == "channel_first" else None)
        b, spatial_batch, z_hat, z_invstd = _spatial_forward(cfg, desc, *conv)
    if cfg.pool is not None and order == "spatial_first":
        pooled = k_channel_pool(x, s, t, b)
        a, h, hidden = channel_gate(pooled)
    y = k_output(x, s, t, a, b, shortcut)
    if cfg.overwrite_x:
        y = x.copy_(y)
    stats = (bn_batch if cfg.bn == "batch" else None, spatial_batch if cfg.spatial_bn == "batch" else None)
    if not cfg.record:
        return y, stats, None
    return y, stats, (s, t, mean, invstd, a, b, pooled, h, hidden, desc, z_hat, z_invstd)


def _tail_backward(cfg: TailConfig, g, x, saved, mlp_weights, conv_weights):
    """Gradients of ``_tail_forward`` from g = dL/d(F * a * b) (the ReLU's mask applied to dL/dy):
    dL/dx, then (dgamma, dbeta) of the block's BN, the MLP's and the spatial gate's parameters.

    The per-position terms that the full-size passes read are ``_stored`` first."""
    s, t, mean, invstd, a, b, pooled, h, hidden, desc, z_hat, z_invstd = saved
    order, hw = cfg.order, x.shape[2] * x.shape[3]
    cmax = pooled[1] if cfg.pool is not None and cfg.pool != "avg" else None
    u_terms = v_terms = bn_grads = None
    mlp_grads = spatial_grads = []

    def channel_backward(d_a, ties):
        """(terms for _d_channel_input, (d_avg, d_max), parameter gradients) from dL/da."""
        d_pooled, grads = _mlp_backward(d_a, a, _pick_pool(cfg.pool, pooled), h, hidden, *mlp_weights)
        d_avg = d_pooled[0] if cfg.pool != "max" else None
        d_max = d_pooled[-1] if cfg.pool != "avg" else None
        du_avg, du_max = _stored(None if d_avg is None else d_avg * (1 / hw), None if d_max is None else d_max / ties)
        return (du_avg, du_max, cmax), (d_avg, d_max), grads

    def spatial_backward(d_b, ties):
        """(terms for _d_spatial_input, parameter gradients) from dL/db."""
        weight, has_bias, gamma = conv_weights
        (d_smax, d_smean), grads = _spatial_backward(cfg, d_b, b, desc, z_hat, z_invstd, weight, gamma, has_bias)
        return (*_stored(d_smean * (1 / x.shape[1]), d_smax / ties), desc[0]), grads

    if order == "spatial_first":  # the channel gate's input F * b depends on b: channel gate first
        u_terms, _, mlp_grads = channel_backward(*k_reduce_hw(g, x, s, t, a, b, True, None, cmax))
        v_terms, spatial_grads = spatial_backward(*k_reduce_c(g, x, s, t, a, b, False, u_terms, desc[0]))
    else:
        v_has_a = order == "channel_first"
        if cfg.spatial:
            v_terms, spatial_grads = spatial_backward(*k_reduce_c(g, x, s, t, a, None, v_has_a, None, desc[0]))
        if cfg.pool is not None and cfg.bn is not None:
            sums = k_channel_sums(g, x, s, t, mean, a, b, v_terms, v_has_a, cmax)
            d_a, ties, bn_grads_of = _channel_and_bn_grads(sums, s, t + mean * s, invstd, a, hw, v_has_a)
            u_terms, (d_avg, d_max), mlp_grads = channel_backward(d_a, ties)
            d_gamma, d_beta = bn_grads_of(d_avg, d_max)
            m = x.numel() // x.shape[1]
            bn_grads = (d_gamma, d_beta, *_stored(d_beta * (1 / m), d_gamma * (1 / m)))
        elif cfg.pool is not None:
            vt = v_terms if v_has_a else None
            u_terms, _, mlp_grads = channel_backward(*k_reduce_hw(g, x, s, t, a, b, False, vt, cmax))
    bn_stats = None if cfg.bn is None else (mean, invstd)
    d_x, d_gamma, d_beta = k_input_grads(
        g, x, s, t, a, b, order, u_terms, v_terms, bn_stats, cfg.bn == "batch", bn_grads
    )
    return d_x, [] if cfg.bn is None else [d_gamma, d_beta], mlp_grads, spatial_grads


# The schema is given: torch 2.4 cannot read it from this module's postponed (string) annotations.
@torch.library.custom_op("cbam::stored_copy", mutates_args=(), schema="(Tensor t) -> Tensor")
def _stored_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy that inductor cannot look into (see ``_stored``)."""
    return t.clone()


@_stored_copy.register_fake
def _(t):
    return torch.empty_like(t)


def _stored(*terms):
    """The small tensors ``terms`` (None passed through), computed once into memory.

    Inductor inlines a pointwise result of small tensors (d_max / ties, say) into every full-size loop
    that reads it and recomputes it per element, which made the input-gradient pass markedly slower
    (docs/performance.md). Behind one op that it cannot look into (the
    terms packed into one tensor) they are computed once."""
    return tuple(None if t is None else _stored_copy(t) for t in terms)


tail_forward = CompiledGraph(_tail_forward)
tail_backward = CompiledGraph(_tail_backward)


# ---- the autograd Function -------------------------------------------------------------------------------------


@dataclass
class FusedPlan:
    """What one fused call computes: which gates, in which order, with which BatchNorm in front."""

    order: str  # one of ORDERS
    channel_gate: nn.Module | None
    spatial_gate: nn.Module | None
    bn: nn.BatchNorm2d | None

    @property
    def gate_params(self) -> list[nn.Parameter]:
        mods = [m for m in (self.channel_gate, self.spatial_gate) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def config(self, record: bool, overwrite_x: bool = False) -> TailConfig:
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

    def inputs(self, cfg: TailConfig, x: torch.Tensor):
        """The BN's, the MLP's and the spatial gate's tensors, as ``_tail_forward`` takes them."""
        bn, cg, sg = self.bn, self.channel_gate, self.spatial_gate
        bn_args = mlp = conv = None
        if bn is not None:
            bn_args = _bn_tensors(bn)
        if cg is not None:
            first, _, last = cg.mlp
            mlp = (first.weight, first.bias, last.weight, last.bias)
        if sg is not None:
            sbn = sg.bn
            conv = (sg.conv.weight, sg.conv.bias, *((None,) * 4 if sbn is None else _bn_tensors(sbn)))
        return bn_args, mlp, conv


def _bn_mode(bn: nn.BatchNorm2d | None) -> str | None:
    """Which statistics a BatchNorm normalises with, as ``nn.BatchNorm2d.forward`` decides."""
    if bn is None:
        return None
    return "batch" if bn.training or bn.running_mean is None else "running"


def _bn_tensors(bn: nn.BatchNorm2d):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


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
    """``_tail_forward`` without recording, by ``cpu_tail``'s kernel (same equations, two passes)."""
    bn_args, mlp, conv = plan.inputs(cfg, x)
    a = None
    if bn_args is not None:
        _, _, s, t = _running_bn_affine([p.detach().float() for p in bn_args], cfg.bn_eps, torch.float32)
    else:
        s, t = torch.ones(x.shape[1]), torch.zeros(x.shape[1])
    if cfg.pool is not None:
        mlp = tuple(p.detach().float() for p in mlp)
        a = _mlp_forward(_pick_pool(cfg.pool, cpu_tail.channel_pool(x, s, t)), *mlp)[0]
    out = x if cfg.overwrite_x else torch.empty_like(x)
    return cpu_tail.spatial_output(cfg, x, shortcut, s, t, a, conv, out)


def _run_forward(plan: FusedPlan, x, shortcut, record: bool, overwrite_x: bool = False):
    cfg = plan.config(record, overwrite_x)
    if (
        kernel_mode(x.device.type) == "compiled"
        and _get_current_dispatch_mode() is None
        and cpu_tail.applicable(cfg, x, shortcut)
    ):
        return cfg, _cpu_eval_tail(plan, cfg, x, shortcut), None
    y, (bn_batch, spatial_batch), saved = tail_forward(cfg, x, shortcut, *plan.inputs(cfg, x))
    n, c, h, w = x.shape
    _update_running_stats(plan.bn, bn_batch, n * h * w)
    _update_running_stats(plan.spatial_gate.bn if plan.spatial_gate is not None else None, spatial_batch, n * h * w)
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
        cg, sg = plan.channel_gate, plan.spatial_gate
        mlp_weights = (cg.mlp[0].weight, cg.mlp[2].weight) if cg is not None else None
        conv_weights = None
        if sg is not None:
            conv_weights = (sg.conv.weight, sg.conv.bias is not None, sg.bn.weight if sg.bn is not None else None)
        args = (ctx.cfg, g, x, ctx.small, mlp_weights, conv_weights)
        try:
            d_x, bn_grads, mlp_grads, spatial_grads = tail_backward(*args)
        except CompileFailed:  # too late for the reference in this step: the same equations, op by op
            d_x, bn_grads, mlp_grads, spatial_grads = _tail_backward(*args)
        d_sc = None if ctx.shortcut_dtype is None else g.to(ctx.shortcut_dtype)
        params = ([] if plan.bn is None else [plan.bn.weight, plan.bn.bias]) + plan.gate_params
        grads = [d.to(p.dtype) for d, p in zip([*bn_grads, *mlp_grads, *spatial_grads], params, strict=True)]
        return (None, d_x, d_sc, *grads)


def hooks_present(module: nn.Module) -> bool:
    """Whether forward hooks would watch the module's submodules (the gates' outputs, say): the
    fused graphs do not call those modules, so the reference runs for them."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def fused_gated_tail(
    plan: FusedPlan, x: torch.Tensor, shortcut: torch.Tensor | None = None, overwrite_x: bool = False
) -> torch.Tensor:
    """relu(BN(x) * Mc * Ms + shortcut) (BN and the shortcut optional), with fused kernels.
    ``overwrite_x``: x is a temporary that evaluation without gradients may overwrite with the result
    (no new full-size tensor, which glibc page-faults in afresh each time above 32 MiB)."""
    # Kernels accumulate in float32 whatever the autocast state; the small parts run in float32 too.
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled():
            params = ([] if plan.bn is None else [plan.bn.weight, plan.bn.bias]) + plan.gate_params
            if any(t is not None and t.requires_grad for t in (x, shortcut, *params)):
                return FusedGatedTail.apply(plan, x, shortcut, *params)
        return _run_forward(plan, x, shortcut, record=False, overwrite_x=overwrite_x and not x.requires_grad)[1]
