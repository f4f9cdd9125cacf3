"""The full-size passes of the fused CBAM tail: each reads the block's conv output x (N, C, H, W) once,
with a pointwise prologue (BatchNorm, gates) fused into its reduction, and writes only small tensors,
except ``k_output`` and ``k_input_grads``, which write the one full-size result of their direction.

Notation: F = BN(x) = x * s + t; a (N, C) channel gate, Eq. (2); b (N, H, W) spatial gate, Eq. (3);
u the channel gate's input (F * b for "spatial_first", else F); v the spatial gate's input (F * a for
"channel_first", else F); g = dL/d(F * a * b). Max pooling's gradient is split evenly between tied
maxima, as ``torch.amax`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Affine(NamedTuple):
    """The block's BatchNorm as F = x * s + t per channel; s and t None: no BatchNorm (F = x)."""

    s: torch.Tensor | None
    t: torch.Tensor | None


class Gates(NamedTuple):
    """The channel gate a (N, C) and the spatial gate b (N, H, W); None: that gate is off (or not known yet)."""

    a: torch.Tensor | None
    b: torch.Tensor | None


class PoolGrad(NamedTuple):
    """The gradient of a [mean; max] pooling, spread back over what it pooled: ``d_mean`` (already divided
    by the count pooled), ``d_max`` (already divided by the number of tied maxima) and ``max``, the pooled
    maxima that the positions are compared with. Either gradient may be None (that pooling is not used)."""

    d_mean: torch.Tensor | None
    d_max: torch.Tensor | None
    max: torch.Tensor


class ChannelSums(NamedTuple):
    """``k_channel_sums``'s per-(n, c) sums over H, W (None where that part of the gates is off)."""

    p: torch.Tensor  # sum g * b
    q: torch.Tensor  # sum g * b * xc
    r: torch.Tensor | None  # sum dv
    rx: torch.Tensor | None  # sum dv * xc
    ux: torch.Tensor  # sum xc
    ties: torch.Tensor | None  # positions equal to the channel max
    tie_x: torch.Tensor | None  # sum of xc over them


class BatchNormState(NamedTuple):
    """The block's BatchNorm as backward sees it: mean and 1/std per channel, and whether they are the
    batch's statistics (whose own gradient terms then apply) or the running ones."""

    mean: torch.Tensor
    invstd: torch.Tensor
    batch: bool


class BatchNormGrads(NamedTuple):
    """dgamma and dbeta of the block's BatchNorm, and their quotients by m = N*H*W for the input gradient."""

    d_gamma: torch.Tensor
    d_beta: torch.Tensor
    beta_term: torch.Tensor
    gamma_term: torch.Tensor


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float32 for float32/half/bfloat16 inputs, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def _bn(x, bn: Affine):
    """F = BN(x) = x * s + t per channel."""
    f = _acc(x)
    return f if bn.s is None else f * bn.s[None, :, None, None] + bn.t[None, :, None, None]


def _gated(f, gates: Gates):
    if gates.a is not None:
        f = f * _nc(gates.a)
    if gates.b is not None:
        f = f * gates.b[:, None]
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


def _d_channel_input(u, grad: PoolGrad):
    """Gradient w.r.t. u of the channel pooling: AvgPool spreads evenly over H, W, MaxPool goes to the
    (tied) maxima."""
    du = 0.0
    if grad.d_mean is not None:
        du = _nc(grad.d_mean)
    if grad.d_max is not None:
        du = du + torch.where(u == _nc(grad.max), _nc(grad.d_max), 0.0)
    return du


def _d_spatial_input(v, grad: PoolGrad):
    """Gradient w.r.t. v of Eq. (3)'s [max; mean] pooling over channels."""
    return grad.d_mean[:, None] + torch.where(v == grad.max[:, None], grad.d_max[:, None], 0.0)


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


def k_channel_pool(x, bn: Affine, b):
    """AvgPool and MaxPool over H, W of u = F (* b): Eq. (2)'s descriptors."""
    u = _gated(_bn(x, bn), Gates(None, b))
    tile = _hw_tile(x)
    return _reduce_hw(u, torch.sum, tile) / (x.shape[2] * x.shape[3]), _reduce_hw(u, torch.amax, tile)


def k_spatial_pool(x, bn: Affine, a):
    """MaxPool and AvgPool over channels of v = F (* a): the (N, H, W) halves of Eq. (3)'s descriptor."""
    v = _gated(_bn(x, bn), Gates(a, None))
    return v.amax(dim=1), v.mean(dim=1)


def k_output(x, bn: Affine, gates: Gates, shortcut):
    """y = relu(F * a * b + shortcut), Eq. (1) and the residual addition, or F * a * b without a shortcut."""
    z = _gated(_bn(x, bn), gates)
    if shortcut is not None:
        z = torch.relu(z + _acc(shortcut))
    return z.to(x.dtype)


def k_reduce_hw(g, x, bn: Affine, gates: Gates, v_grad: PoolGrad | None, cmax, *, u_has_b: bool):
    """Over H, W: dL/da = sum (g * b + dv (if v = F * a)) * F, and the tie count of the channel max
    (None without ``cmax``). ``u_has_b``: the channel gate's input is F * b (order spatial_first)."""
    f = _bn(x, bn)
    g = _gated(_acc(g), Gates(None, gates.b))
    if v_grad is not None:
        g = g + _d_spatial_input(f * _nc(gates.a), v_grad)
    d_a = (g * f).sum(dim=(2, 3))
    if cmax is None:
        return d_a, None
    u = f * gates.b[:, None] if u_has_b else f
    return d_a, (u == _nc(cmax)).to(f.dtype).sum(dim=(2, 3))  # float counts: no int64 accumulators


def k_reduce_c(g, x, bn: Affine, gates: Gates, u_grad: PoolGrad | None, smax, *, v_has_a: bool):
    """Over C: dL/db = sum (g * a + du (if u = F * b)) * F, and the tie count of the spatial max.
    ``v_has_a``: the spatial gate's input is F * a (order channel_first)."""
    f = _bn(x, bn)
    g = _gated(_acc(g), Gates(gates.a, None))
    if u_grad is not None:
        g = g + _d_channel_input(f * gates.b[:, None], u_grad)
    d_b = (g * f).sum(dim=1)
    v = f * _nc(gates.a) if v_has_a else f
    return d_b, (v == smax[:, None]).to(f.dtype).sum(dim=1)


def k_channel_sums(g, x, bn: Affine, mean, gates: Gates, v_grad: PoolGrad | None, cmax, *, v_has_a: bool):
    """Over H, W, per (n, c), when the channel gate's input is F (every order but spatial_first) and a
    BatchNorm precedes; with xc = x - mean, so that F = xc * s + beta: the ``ChannelSums``.

    dL/da and the BatchNorm's dgamma and dbeta are linear in these (``graphs._channel_and_bn_grads``), so
    the input-gradient pass needs no reduction of its own. Reducing d(BN output) over N, H, W there cost
    more than this whole pass: inductor stored it in full, then walked it channel block by channel
    block (docs/performance.md)."""
    xc = _acc(x) - mean[None, :, None, None]
    f = _bn(x, bn)
    g = _gated(_acc(g), Gates(None, gates.b))
    p, q = g.sum(dim=(2, 3)), (g * xc).sum(dim=(2, 3))
    r = rx = ties = tie_x = None
    if v_grad is not None:
        dv = _d_spatial_input(f * _nc(gates.a) if v_has_a else f, v_grad)
        r, rx = dv.sum(dim=(2, 3)), (dv * xc).sum(dim=(2, 3))
    if cmax is not None:
        is_max = f == _nc(cmax)
        ties, tie_x = is_max.to(f.dtype).sum(dim=(2, 3)), torch.where(is_max, xc, 0.0).sum(dim=(2, 3))
    return ChannelSums(p, q, r, rx, xc.sum(dim=(2, 3)), ties, tie_x)


def k_input_grads(
    g,
    x,
    bn: Affine,
    gates: Gates,
    grads: tuple[PoolGrad | None, PoolGrad | None],
    bn_state: BatchNormState | None,
    *,
    order: str,
    bn_grads: BatchNormGrads | None = None,
):
    """dL/dx through the gates and the BatchNorm (with batch statistics, their own terms too), dgamma and
    dbeta. ``grads``: the channel and the spatial pooling's gradients (u's and v's; None without that
    gate). ``bn_grads``: when ``k_channel_sums`` gave them; else they are reduced here."""
    u_grad, v_grad = grads
    f = _bn(x, bn)
    d_f = _gated(_acc(g), gates)
    if u_grad is not None:
        u_has_b = order == "spatial_first"
        du = _d_channel_input(f * gates.b[:, None] if u_has_b else f, u_grad)
        d_f = d_f + (du * gates.b[:, None] if u_has_b else du)
    if v_grad is not None:
        v_has_a = order == "channel_first"
        dv = _d_spatial_input(f * _nc(gates.a) if v_has_a else f, v_grad)
        d_f = d_f + (dv * _nc(gates.a) if v_has_a else dv)
    if bn_state is None:
        return d_f.to(x.dtype), None, None
    xhat = (_acc(x) - bn_state.mean[None, :, None, None]) * bn_state.invstd[None, :, None, None]
    if bn_grads is None:
        d_beta = d_f.sum(dim=(0, 2, 3))
        d_gamma = (d_f * xhat).sum(dim=(0, 2, 3))
        m = x.numel() // x.shape[1]
        bn_grads = BatchNormGrads(d_gamma, d_beta, d_beta * (1 / m), d_gamma * (1 / m))
    if bn_state.batch:
        d_f = d_f - bn_grads.beta_term[None, :, None, None] - xhat * bn_grads.gamma_term[None, :, None, None]
    d_x = d_f * bn.s[None, :, None, None]
    return d_x.to(x.dtype), bn_grads.d_gamma, bn_grads.d_beta
