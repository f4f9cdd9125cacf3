"""Fused CBAM: the gates of Eq. (1)-(3), the block's last BatchNorm, the shortcut addition and the
ReLU as one ``torch.autograd.Function`` whose full-size passes are generated kernels.

Why hand-written rather than plain autograd: the reference module keeps every full-size
intermediate (F, F', F'', the max-reduction masks) for backward and makes a new tensor at each
step. Here forward writes one full-size tensor (the block output y) and backward saves only

- x, the conv output that BatchNorm saves anyway, F = BN(x) = x * s + t being recomputed inside
  each kernel;
- y, which the next block's conv saves as its input (same storage);
- (N, C) and (N, H*W) tensors: the gates a = Mc and b = Ms, the pooled maxima, BN statistics.

The full-size passes are plain tensor expressions compiled with ``torch.compile`` (inductor: C++
on CPU, Triton on CUDA), so a pointwise prologue (BN, gates, ReLU mask) fuses into each reduction
and nothing full-size is materialised in between. The small parts (the MLP, the k x k conv, the
spatial BN and the sigmoids) run as ordinary autograd on detached (N, C) / (N, 2, H, W) inputs;
backward differentiates their kept graphs. Without gradients (inference) the Function is skipped
and, with BatchNorms in evaluation mode, the whole tail is one compiled graph (``k_inference``).

Max pooling's gradient is split evenly between tied maxima, as ``torch.amax`` does; ties are found
by recomputing the pooled input with the same operations as forward (inductor compiles with
``-ffp-contract=off``, so both passes round identically).

Notation (per block): x conv output (N, C, H, W); F = x * s + t; a (N, C) channel gate; b (N, H, W)
spatial gate; u the channel gate's input (F * b for "spatial_first", else F); v the spatial gate's
input (F * a for "channel_first", else F); y = relu(F * a * b + shortcut).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

ORDERS = ("channel_first", "spatial_first", "parallel", "channel", "spatial")


# ---- compiled kernels ------------------------------------------------------------------------------------------


# "auto": compiled where a toolchain exists (else the fused path is not used by impl=auto); "compiled";
# "eager": the same kernels run op by op (same numbers, slower; for debugging and fast tests).
KERNEL_MODES = ("auto", "compiled", "eager")
KERNEL_MODE = os.environ.get("CBAM_FUSED_KERNELS", "auto")
if KERNEL_MODE not in KERNEL_MODES:
    raise ValueError(f"CBAM_FUSED_KERNELS={KERNEL_MODE!r} is not valid; allowed: {', '.join(KERNEL_MODES)}")


def kernel_mode(device_type: str) -> str | None:
    """How fused kernels run on a device: "compiled", "eager", or None (auto mode, no toolchain)."""
    if KERNEL_MODE == "eager":
        return "eager"
    if KERNEL_MODE == "compiled" or _toolchain_available(device_type):
        return "compiled"
    return None


@cache
def _toolchain_available(device_type: str) -> bool:
    """Whether inductor can build kernels here: a C++ compiler on CPU, Triton on CUDA."""
    if device_type == "cpu":
        from torch._inductor import config

        cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        return shutil.which(cxx or "g++") is not None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


class _Kernel:
    """A full-size pass, compiled with inductor (C++ on CPU, Triton on CUDA) or run eagerly."""

    def __init__(self, fn, options=None):
        self.fn = fn
        self.options = options
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # traced as part of a larger compiled kernel (k_inference)
            return self.fn(*args)
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        if self.failed or kernel_mode(device.type) != "compiled" or _get_current_dispatch_mode() is not None:
            # Under a dispatch mode (FlopCounterMode counting GMACs, say) torch.compile cannot run.
            return self.fn(*args)
        if self.compiled is None:
            # Static shapes: on CPU the shape-specialised kernels were 10% faster per training step than
            # dynamic ones (ResNet-50, scripts/bench_attention.py). A network has a few distinct block
            # shapes per batch size, so allow more than dynamo's default of 8 specialisations.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False, options=self.options)
            _announce_compilation()
        try:
            return self.compiled(*args)
        except Exception as err:  # a broken toolchain must not stop training: fall back, say so once
            self.failed = True
            log.warning("fused CBAM kernel %s could not be compiled (%s); running it eagerly", self.fn.__name__, err)
            return self.fn(*args)


@cache
def _announce_compilation() -> None:
    log.info(
        "fused CBAM: compiling its kernels for each new block shape on first use (tens of seconds on a small "
        "CPU; inductor caches them on disk for later runs). CBAM_FUSED_KERNELS=eager skips compilation."
    )


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float32 for float32/half/bfloat16 inputs, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _nc(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def _bn(x, s, t):
    """F = BN(x) = x * s + t per channel (s, t None: no BN)."""
    f = _acc(x)
    return f if s is None else f * s[None, :, None, None] + t[None, :, None, None]


def _masked(dy, y):
    """dL/d(pre-activation): the ReLU's mask applied to dy (y None: no ReLU)."""
    g = _acc(dy)
    return g if y is None else torch.where(y > 0, g, 0.0)


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
    working set in L1. For the channel pooling this measured 1.3-3x faster on ResNet-50's maps (7 rows
    did best of 4-16); the training kernels, whose reductions carry a longer prologue, measured slower
    with it and reduce in one step."""
    n, c, h, w = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return next((rows for rows in (7, 8, 6, 5, 4) if h * w % rows == 0 and h * w > rows), 1)


def _reduce_hw(t: torch.Tensor, op, tile: int) -> torch.Tensor:
    """op (torch.sum, amax or amin) over H and W of (N, C, H, W) t, in tiles of ``tile`` rows."""
    if tile == 1:
        return op(t, dim=(2, 3))
    n, c, h, w = t.shape
    rows = t.permute(0, 2, 3, 1).reshape(n, h * w // tile, tile, c)
    return op(op(rows, dim=2), dim=1)


# The gradient terms below come per position, divided outside the kernels: a division of a small tensor
# written inside one is recomputed for every element of the full-size loop.


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


@_Kernel
def k_x_stats(x):
    """Per (n, c): mean, variance, max and min of x over H, W (one pass; BN statistics and the
    channel pooling of F = x * s + t both follow from them). The sums are taken around a
    shift k = x[n, c, 0, 0], a sample of the data, so that E[(x-k)^2] - E[x-k]^2 does not cancel."""
    xf = _acc(x)
    hw = x.shape[2] * x.shape[3]
    shift = xf[:, :, :1, :1]
    d = xf - shift
    mean_d = d.sum(dim=(2, 3)) / hw
    var = (d.square().sum(dim=(2, 3)) / hw - mean_d * mean_d).clamp_min(0)
    return mean_d + shift[:, :, 0, 0], var, xf.amax(dim=(2, 3)), xf.amin(dim=(2, 3))


@_Kernel
def k_channel_pool(x, s, t, b):
    """AvgPool and MaxPool over H, W of u = F (* b)."""
    u = _gated(_bn(x, s, t), None, b)
    tile = _hw_tile(x)
    return _reduce_hw(u, torch.sum, tile) / (x.shape[2] * x.shape[3]), _reduce_hw(u, torch.amax, tile)


@_Kernel
def k_spatial_pool(x, s, t, a):
    """MaxPool and AvgPool over channels of v = F (* a): the (N, H, W) halves of Eq. (3)'s descriptor."""
    v = _gated(_bn(x, s, t), a, None)
    return v.amax(dim=1), v.mean(dim=1)


@_Kernel
def k_output(x, s, t, a, b, shortcut):
    """y = relu(F * a * b + shortcut), or F * a * b without a shortcut."""
    z = _gated(_bn(x, s, t), a, b)
    if shortcut is not None:
        z = torch.relu(z + _acc(shortcut))
    return z.to(x.dtype)


@_Kernel
def k_reduce_hw(dy, y, x, s, t, a, b, u_has_b, v_terms, cmax):
    """Over H, W: dL/da = sum (g * b + dv (if v = F * a)) * F, and the tie count of the channel max."""
    f = _bn(x, s, t)
    g = _gated(_masked(dy, y), None, b)
    if v_terms is not None:
        g = g + _d_spatial_input(f * _nc(a), v_terms)
    d_a = (g * f).sum(dim=(2, 3))
    if cmax is None:
        return d_a, None
    u = f * b[:, None] if u_has_b else f
    return d_a, (u == _nc(cmax)).to(f.dtype).sum(dim=(2, 3))  # float counts: no int64 accumulators


@_Kernel
def k_reduce_c(dy, y, x, s, t, a, b, v_has_a, u_terms, smax):
    """Over C: dL/db = sum (g * a + du (if u = F * b)) * F, and the tie count of the spatial max."""
    f = _bn(x, s, t)
    g = _gated(_masked(dy, y), a, None)
    if u_terms is not None:
        g = g + _d_channel_input(f * b[:, None], u_terms)
    d_b = (g * f).sum(dim=1)
    v = f * _nc(a) if v_has_a else f
    return d_b, (v == smax[:, None]).to(f.dtype).sum(dim=1)


# Inductor stores a pointwise result to memory when it reads many inputs (over 4 with several consumers, over
# 12 on CPU in any case); g * b and d(BN output) here are such results, and storing them adds a full-size
# write and read to the pass. These options keep them in registers (checked in the generated C++).
_ONE_PASS = {"realize_cpu_acc_reads_threshold": 64, "realize_reads_threshold": 32}


@partial(_Kernel, options=_ONE_PASS)
def k_channel_sums(dy, y, x, s, t, mean, a, b, v_terms, v_has_a, cmax):
    """Over H, W, per (n, c), when the channel gate's input is F (every order but spatial_first) and a
    BatchNorm precedes; with xc = x - mean, so that F = xc * s + beta:

        p = sum g * b,  q = sum g * b * xc,  r = sum dv,  rx = sum dv * xc,  ux = sum xc,
        ties = the number of positions equal to the channel max cmax,  tie_x = the sum of xc over them.

    dL/da and the BatchNorm's dgamma and dbeta are linear in these (``_channel_and_bn_grads``), so the
    input-gradient pass needs no reduction of its own. Reducing d(BN output) over N, H, W there cost
    more than this whole kernel: inductor stored it in full, then walked it channel block by channel
    block (ResNet-50 training step, 2-core CPU: the fused tails' time 331 -> 279 ms)."""
    xc = _acc(x) - mean[None, :, None, None]
    f = _bn(x, s, t)
    g = _gated(_masked(dy, y), None, b)
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


@partial(_Kernel, options=_ONE_PASS)
def k_input_grads(dy, y, x, s, t, a, b, order, u_terms, v_terms, bn_stats, bn_training, dx_dtype, dsc_dtype, bn_grads):
    """dL/dx through gates and BN (training: the batch statistics' terms too), dL/dshortcut, dgamma, dbeta.
    ``bn_grads``: (dgamma, dbeta, dbeta / m, dgamma / m) when ``k_channel_sums`` gave them (m = N*H*W);
    else they are reduced here."""
    f = _bn(x, s, t)
    g = _masked(dy, y)
    d_f = _gated(g, a, b)
    if u_terms is not None:
        u_has_b = order == "spatial_first"
        du = _d_channel_input(f * b[:, None] if u_has_b else f, u_terms)
        d_f = d_f + (du * b[:, None] if u_has_b else du)
    if v_terms is not None:
        v_has_a = order == "channel_first"
        dv = _d_spatial_input(f * _nc(a) if v_has_a else f, v_terms)
        d_f = d_f + (dv * _nc(a) if v_has_a else dv)
    d_sc = g.to(dsc_dtype) if dsc_dtype is not None else None
    if bn_stats is None:
        return d_f.to(dx_dtype), d_sc, None, None
    mean, invstd = bn_stats
    xhat = (_acc(x) - mean[None, :, None, None]) * invstd[None, :, None, None]
    if bn_grads is not None:  # (dgamma, dbeta, dbeta / m, dgamma / m), the quotients taken outside
        d_gamma, d_beta, beta_term, gamma_term = bn_grads
    else:
        d_beta = d_f.sum(dim=(0, 2, 3))
        d_gamma = (d_f * xhat).sum(dim=(0, 2, 3))
        m = x.numel() // x.shape[1]
        beta_term, gamma_term = d_beta / m, d_gamma / m
    if bn_training:
        d_f = d_f - beta_term[None, :, None, None] - xhat * gamma_term[None, :, None, None]
    d_x = d_f * s[None, :, None, None]
    return d_x.to(dx_dtype), d_sc, d_gamma, d_beta


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


def _bn_scale_shift(bn: nn.BatchNorm2d, x: torch.Tensor):
    """(s, t, (mean, invstd)) with BN(x) = x * s + t; in training mode from x's batch statistics,
    updating the running statistics as ``nn.BatchNorm2d`` does. Also returns the channel pooling
    stats of x when they come for free."""
    if not (bn.training or bn.running_mean is None):
        dtype = torch.promote_types(x.dtype, torch.float32)
        mean, invstd = bn.running_mean.to(dtype), torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        s = bn.weight.to(dtype) * invstd
        return s, bn.bias.to(dtype) - mean * s, (mean, invstd), None
    mean_nc, var_nc, max_nc, min_nc = k_x_stats(x)
    mean = mean_nc.mean(0)
    var = (var_nc + (mean_nc - mean) ** 2).mean(0)  # parallel variance: within + between images
    invstd = torch.rsqrt(var + bn.eps)
    s = bn.weight.to(mean.dtype) * invstd
    t = bn.bias.to(mean.dtype) - mean * s
    if bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        m = x.numel() // x.shape[1]
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * m / max(m - 1, 1)).to(bn.running_var.dtype), factor)
    return s, t, (mean, invstd), (mean_nc, max_nc, min_nc)


class _SmallGraph:
    """A gate's small part (MLP, or k x k conv + BN) run on detached (N, C) / (N, 2, H, W) inputs.

    With ``record`` the autograd graph is kept (it is small) for backward's ``grad``; otherwise
    (inference) no graph is built."""

    def __init__(self, fn, inputs: list[torch.Tensor], module: nn.Module, record: bool):
        self.leaves = [t.detach().requires_grad_(record) for t in inputs]
        self.params = list(module.parameters())  # the tensors this forward used
        with torch.set_grad_enabled(record):
            self.out = fn(self.leaves)

    def grad(self, grad_out: torch.Tensor):
        """Gradients w.r.t. the inputs and w.r.t. each of the module's parameters (None if frozen)."""
        params = self.params
        wanted = [p for p in params if p.requires_grad]
        # retain_graph: the outer backward may run more than once (retain_graph=True, gradcheck); the
        # small graph is freed with the Function's context.
        grads = torch.autograd.grad(self.out, self.leaves + wanted, grad_out, retain_graph=True)
        by_param = dict(zip(map(id, wanted), grads[len(self.leaves) :], strict=True))
        return grads[: len(self.leaves)], [by_param.get(id(p)) for p in params]


def _forward(plan: FusedPlan, x: torch.Tensor, shortcut: torch.Tensor | None, record: bool, bn_affine=None):
    """Forward pass: y, and (with ``record``) what backward needs, all small but x and y.
    ``bn_affine``: the BN's (s, t) when the caller computed them (evaluation mode)."""
    s = t = bn_stats = x_stats = None
    if bn_affine is not None:
        s, t = bn_affine
    elif plan.bn is not None:
        s, t, bn_stats, x_stats = _bn_scale_shift(plan.bn, x)
    cg, sg, order = plan.channel_gate, plan.spatial_gate, plan.order
    a = b = pooled = desc = channel = spatial = None

    def channel_gate(pooled):
        inputs = list(_pick_pool(cg.pool, pooled))
        graph = _SmallGraph(lambda p: cg.attention_from_pooled(p)[:, :, 0, 0], inputs, cg, record)
        return graph, graph.out.detach()

    if cg is not None and order != "spatial_first":
        if x_stats is not None:  # pooling of F = x * s + t from x's statistics (exact: s * x + t is monotone)
            mean_nc, max_nc, min_nc = x_stats
            pooled = (mean_nc * s + t, torch.where(s >= 0, max_nc * s + t, min_nc * s + t))
        else:
            pooled = k_channel_pool(x, s, t, None)
        channel, a = channel_gate(pooled)
    if sg is not None:
        desc = k_spatial_pool(x, s, t, a if order == "channel_first" else None)
        spatial = _SmallGraph(lambda d: sg.attention_from_descriptor(_stack_maps(d))[:, 0], list(desc), sg, record)
        b = spatial.out.detach()
    if cg is not None and order == "spatial_first":
        pooled = k_channel_pool(x, s, t, b)
        channel, a = channel_gate(pooled)
    y = k_output(x, s, t, a, b, shortcut)
    return y, (s, t, bn_stats, a, b, pooled, desc, channel, spatial)


# Inductor's CPU heuristics write a pointwise result read by several consumers to memory when it reads
# more than 4 inputs (F = x * s + t times the gates is one); storing it would add a full-size write and
# re-read to the graph.
@partial(_Kernel, options={"realize_reads_threshold": 32})
def k_inference(plan: FusedPlan, x, shortcut, s, t, overwrite_x: bool):
    """The whole tail without gradients (evaluation) as one compiled graph: the three passes over x,
    the MLP and the spatial conv in one call. Each call and eager op costs most on a cold cache
    (after a block's convolutions); one graph per block measured about 6 ms less per ResNet-50
    forward (batch 16, 2-core CPU, about 750 ms) than separate kernels and small ops.

    The BN's scale and shift (s, t) come in computed: from its buffers inside the graph, inductor
    inlined rsqrt(running_var + eps) into every full-size loop (about 1 ms more per stage-1 block).

    ``overwrite_x``: the result goes into x's memory (a block's conv output that nothing else reads):
    no new full-size tensor, which glibc page-faults in afresh each time above 32 MiB."""
    y = _forward(plan, x, shortcut, record=False, bn_affine=None if s is None else (s, t))[0]
    return x.copy_(y) if overwrite_x else y


def _inference_graph_ok(plan: FusedPlan) -> bool:
    """Whether ``k_inference`` may run the tail: every BatchNorm in evaluation mode (no running
    statistics to update) and no hooks on the gates (they must see their own module calls)."""
    modules = [m for gate in (plan.channel_gate, plan.spatial_gate) if gate is not None for m in gate.modules()]
    if plan.bn is not None:
        modules.append(plan.bn)
    hooked = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    return not hooked and not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in modules)


def _stack_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """(N, H, W) maps as an (N, k, H, W) tensor in channels_last layout: the k x k conv runs 20-60%
    faster on it than on a contiguous one (oneDNN, CPU)."""
    return torch.stack(maps, dim=-1).permute(0, 3, 1, 2)


def _pick_pool(pool: str, pooled):
    avg, mx = pooled
    return {"avg": (avg,), "max": (mx,), "avgmax": (avg, mx)}[pool]


class FusedGatedTail(torch.autograd.Function):
    """y = relu(BN(x) * Mc * Ms + shortcut) in one Function (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan: FusedPlan, x, shortcut, *params):
        y, small = _forward(plan, x, shortcut, record=True)
        ctx.plan = plan
        ctx.small = small
        ctx.shortcut_dtype = shortcut.dtype if shortcut is not None else None
        ctx.bn_batch_stats = plan.bn is not None and (plan.bn.training or plan.bn.running_mean is None)
        ctx.save_for_backward(x, y if shortcut is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        plan: FusedPlan = ctx.plan
        x, y = ctx.saved_tensors  # y gives the ReLU's mask (None without a shortcut: no ReLU)
        s, t, bn_stats, a, b, pooled, desc, channel, spatial = ctx.small
        cg, sg, order = plan.channel_gate, plan.spatial_gate, plan.order
        cmax = pooled[1] if pooled is not None and cg.pool != "avg" else None
        u_terms = v_terms = None
        cg_grads = sg_grads = []

        def channel_backward(d_a, ties):
            """(terms for _d_channel_input, (d_avg, d_max), parameter gradients) from dL/da."""
            d_pooled, grads = channel.grad(d_a)
            d_avg = d_pooled[0] if cg.pool != "max" else None
            d_max = d_pooled[-1] if cg.pool != "avg" else None
            du_avg = None if d_avg is None else d_avg / (x.shape[2] * x.shape[3])
            return (du_avg, None if d_max is None else d_max / ties, cmax), (d_avg, d_max), grads

        def spatial_backward(d_b, ties):
            """(terms for _d_spatial_input, parameter gradients) from dL/db."""
            (d_smax, d_smean), grads = spatial.grad(d_b)
            return (d_smean / x.shape[1], d_smax / ties, desc[0]), grads

        bn_grads = None
        if order == "spatial_first":  # the channel gate's input F * b depends on b: channel gate first
            u_terms, _, cg_grads = channel_backward(*k_reduce_hw(dy, y, x, s, t, a, b, True, None, cmax))
            v_terms, sg_grads = spatial_backward(*k_reduce_c(dy, y, x, s, t, a, b, False, u_terms, desc[0]))
        else:
            v_has_a = order == "channel_first"
            if sg is not None:
                v_terms, sg_grads = spatial_backward(*k_reduce_c(dy, y, x, s, t, a, None, v_has_a, None, desc[0]))
            if cg is not None and bn_stats is not None:
                mean, invstd = bn_stats
                sums = k_channel_sums(dy, y, x, s, t, mean, a, b, v_terms, v_has_a, cmax)
                hw = x.shape[2] * x.shape[3]
                d_a, ties, bn_grads_of = _channel_and_bn_grads(sums, s, t + mean * s, invstd, a, hw, v_has_a)
                u_terms, (d_avg, d_max), cg_grads = channel_backward(d_a, ties)
                d_gamma, d_beta = bn_grads_of(d_avg, d_max)
                m = x.numel() // x.shape[1]
                bn_grads = (d_gamma, d_beta, d_beta / m, d_gamma / m)
            elif cg is not None:
                vt = v_terms if v_has_a else None
                u_terms, _, cg_grads = channel_backward(*k_reduce_hw(dy, y, x, s, t, a, b, False, vt, cmax))
        d_x, d_sc, d_gamma, d_beta = k_input_grads(
            dy,
            y,
            x,
            s,
            t,
            a,
            b,
            order,
            u_terms,
            v_terms,
            bn_stats,
            ctx.bn_batch_stats,
            x.dtype,
            ctx.shortcut_dtype,
            bn_grads,
        )
        bn = plan.bn
        bn_param_grads = [] if bn is None else [d_gamma.to(bn.weight.dtype), d_beta.to(bn.bias.dtype)]
        return (None, d_x, d_sc, *bn_param_grads, *cg_grads, *sg_grads)


def fused_gated_tail(
    plan: FusedPlan, x: torch.Tensor, shortcut: torch.Tensor | None = None, overwrite_x: bool = False
) -> torch.Tensor:
    """relu(BN(x) * Mc * Ms + shortcut) (BN and the shortcut optional), with fused kernels.
    ``overwrite_x``: x is a temporary that evaluation without gradients may overwrite with the result."""
    # Kernels accumulate in float32 whatever the autocast state; the small gate graphs run in float32 too.
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled():
            params = ([] if plan.bn is None else [plan.bn.weight, plan.bn.bias]) + plan.gate_params
            if any(t is not None and t.requires_grad for t in (x, shortcut, *params)):
                return FusedGatedTail.apply(plan, x, shortcut, *params)
        if _inference_graph_ok(plan):
            s, t = _bn_scale_shift(plan.bn, x)[:2] if plan.bn is not None else (None, None)
            return k_inference(plan, x, shortcut, s, t, overwrite_x and not x.requires_grad)
        return _forward(plan, x, shortcut, record=False)[0]
