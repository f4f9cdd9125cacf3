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

The package, one idea a module:

- ``dispatch``: whether the fused Function or the reference runs, and why (logged once); the one place
  that falls back to the reference when a graph cannot be compiled;
- ``function``: the autograd Function and what it computes (``FusedPlan``);
- ``graphs``: its forward and backward graphs, the gradients written out, the MLP's and the k x k
  conv's included, compiled whole by ``compiler`` (inductor: C++ on CPU, Triton on CUDA);
- ``passes``: the full-size passes over x, each a pointwise prologue (BN, gates, ReLU mask) fused into a
  reduction, so that nothing full-size is materialised in between; ``small``: the MLP and the conv;
- ``cpu_tail``: a hand-written CPU kernel for evaluation (two passes over x where the graph needs three).

One compiled call per direction and block measured far cheaper than separate kernels with the small
parts run as autograd graphs between them (Python, guards and small-graph work; figures in
docs/performance.md). Max pooling's gradient is split evenly between tied maxima, as ``torch.amax``
does; ties are found by recomputing the pooled input with the same operations as forward (inductor
compiles with ``-ffp-contract=off``, so both passes round identically).
"""

from .compiler import KERNEL_MODES, CompileFailed, kernel_mode, toolchain_available
from .dispatch import AUTO_FUSED_DEVICES, auto_uses_fused, fused_or_none
from .function import ORDERS, FusedPlan, fused_gated_tail

__all__ = [
    "AUTO_FUSED_DEVICES",
    "KERNEL_MODES",
    "ORDERS",
    "CompileFailed",
    "FusedPlan",
    "auto_uses_fused",
    "fused_gated_tail",
    "fused_or_none",
    "kernel_mode",
    "toolchain_available",
]
