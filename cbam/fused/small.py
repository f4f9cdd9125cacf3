"""The small parts of the fused CBAM tail, forward and backward: Eq. (2)'s MLP on (N, C) descriptors and
Eq. (3)'s k x k conv (with its optional BatchNorm) on (N, H, W) maps; and ``stored``, which keeps a small
result from being recomputed inside every full-size loop that reads it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as nnf


class BatchNormParams(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


class MlpParams(NamedTuple):
    """The channel gate's MLP, C -> C/r -> C."""

    w0: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor


class SpatialParams(NamedTuple):
    """The spatial gate's k x k conv and its BatchNorm (None: none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    bn: BatchNormParams | None


def pick_pool(pool: str, pooled):
    """The descriptors that channel pooling ``pool`` uses of (avg, max)."""
    avg, mx = pooled
    return {"avg": (avg,), "max": (mx,), "avgmax": (avg, mx)}[pool]


def mlp_forward(pooled, mlp: MlpParams):
    """Eq. (2): a = sigmoid(sum_k MLP(p_k)) = sigmoid(W1 sum_k relu(W0 p_k + b0) + k b1), the sum taken
    before the last layer as in ``ChannelGate.attention_from_pooled``. Also returns relu(W0 p + b0)
    (k*N rows) and its sum over k, which backward needs."""
    h = torch.relu(torch.addmm(mlp.b0, torch.cat(pooled), mlp.w0.t()))
    hidden = h.view(len(pooled), pooled[0].shape[0], -1).sum(0)
    return torch.sigmoid(torch.addmm(mlp.b1 * len(pooled), hidden, mlp.w1.t())), h, hidden


def mlp_backward(d_a, a, pooled, h, hidden, mlp: MlpParams):
    """Gradients of ``mlp_forward`` w.r.t. the pooled descriptors and (W0, b0, W1, b1)."""
    k = len(pooled)
    d_logits = d_a * a * (1 - a)
    d_h = torch.where(h > 0, (d_logits @ mlp.w1).repeat(k, 1), 0.0)
    d_pooled = (d_h @ mlp.w0).split(pooled[0].shape[0])
    return d_pooled, [d_h.t() @ torch.cat(pooled), d_h.sum(0), d_logits.t() @ hidden, d_logits.sum(0) * k]


def _stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """(N, H, W) maps as an (N, k, H, W) tensor in channels_last layout: the k x k conv runs 20-60%
    faster on it than on a contiguous one (oneDNN, CPU)."""
    return torch.stack(maps, dim=-1).permute(0, 3, 1, 2)


class SpatialSaved(NamedTuple):
    """What the spatial gate's backward needs of its forward: the gate b, the descriptor's (max, mean)
    maps, and its BatchNorm's normalised input and 1 / std (None without one)."""

    b: torch.Tensor
    desc: tuple[torch.Tensor, torch.Tensor]
    z_hat: torch.Tensor | None
    invstd: torch.Tensor | None


def spatial_forward(desc, conv: SpatialParams, *, padding: int, bn_mode: str | None, bn_eps: float):
    """Eq. (3): b = sigmoid(BN(conv_kxk([max; mean]))) (the BN optional, as in ``SpatialGate``); with the
    BatchNorm's batch (mean, variance) (None with running statistics or none) and ``SpatialSaved``.
    ``bn_mode``: None, "batch" (training statistics) or "running"."""
    z = nnf.conv2d(_stack_maps(list(desc)), conv.weight, conv.bias, padding=padding)
    if bn_mode is None:
        b = torch.sigmoid(z)[:, 0]
        return b, None, SpatialSaved(b, desc, None, None)
    bn = conv.bn
    batch = None
    if bn_mode == "batch":
        mean, var = z.mean(), z.var(correction=0)
        invstd = torch.rsqrt(var + bn_eps)
        batch = (mean, var)
    else:
        mean, invstd = bn.running_mean, torch.rsqrt(bn.running_var + bn_eps)
    z_hat = (z - mean) * invstd
    b = torch.sigmoid(z_hat * bn.weight + bn.bias)[:, 0]
    return b, batch, SpatialSaved(b, desc, z_hat, invstd)


def spatial_backward(d_b, saved: SpatialSaved, conv: SpatialParams, *, padding: int, bn_mode: str | None):
    """Gradients of ``spatial_forward`` w.r.t. the descriptor's (max, mean) maps and (weight, [bias,]
    [gamma, beta])."""
    b, z_hat, invstd = saved.b, saved.z_hat, saved.invstd
    d_z = (d_b * b * (1 - b))[:, None]
    bn_grads = []
    if bn_mode is not None:
        bn_grads = [(d_z * z_hat).sum().reshape(1), d_z.sum().reshape(1)]
        if bn_mode == "batch":
            d_z = d_z - d_z.mean() - z_hat * (d_z * z_hat).mean()
        d_z = d_z * (conv.bn.weight * invstd)
    has_bias = conv.bias is not None
    # aten's signature: grad, input, weight, bias sizes, stride, padding, dilation, transposed, output
    # padding, groups, output mask
    d_maps, d_weight, d_bias = torch.ops.aten.convolution_backward(
        d_z,
        _stack_maps(list(saved.desc)),
        conv.weight,
        [1] if has_bias else None,
        [1, 1],
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, has_bias],
    )
    return (d_maps[:, 0], d_maps[:, 1]), [d_weight, *([d_bias] if has_bias else []), *bn_grads]


# The schema is given: torch 2.4 cannot read it from this module's postponed (string) annotations.
@torch.library.custom_op("cbam::stored_copy", mutates_args=(), schema="(Tensor t) -> Tensor")
def _stored_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy that inductor cannot look into (see ``stored``)."""
    return t.clone()


@_stored_copy.register_fake
def _(t):
    return torch.empty_like(t)


def stored(*terms):
    """The small tensors ``terms`` (None passed through), computed once into memory.

    Inductor inlines a pointwise result of small tensors (d_max / ties, say) into every full-size loop
    that reads it and recomputes it per element, which made the input-gradient pass markedly slower
    (docs/performance.md). Behind one op that it cannot look into they are computed once."""
    return tuple(None if t is None else _stored_copy(t) for t in terms)
