"""The fused CBAM functions compiled by inductor (C++ on CPU, Triton on CUDA), or run op by op.

One idea: a compiler must never stop a run. ``CompiledGraph`` compiles a function once per static
configuration and shape and logs each compilation with its time; any error while building or running
a compiled graph warns once, raises ``CompileFailed`` (``cbam.fused.dispatch`` runs the reference instead;
a backward runs its own equations op by op) and marks the device so that ``kernel_mode`` reports no
toolchain there from then on.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from functools import cache

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import cpu_tail

log = logging.getLogger(__name__)

# "auto": compiled where a toolchain exists (else the fused path is not used by impl=auto); "compiled";
# "eager": the same functions run op by op (same numbers, slower; for debugging and fast tests).
KERNEL_MODES = ("auto", "compiled", "eager")
KERNEL_MODE = os.environ.get("CBAM_FUSED_KERNELS", "auto")
if KERNEL_MODE not in KERNEL_MODES:
    raise ValueError(f"CBAM_FUSED_KERNELS={KERNEL_MODE!r} is not valid; allowed: {', '.join(KERNEL_MODES)}")

# Devices where building or running a compiled graph failed once: impl=auto runs the reference there.
_failed_devices: set[str] = set()


class CompileFailed(RuntimeError):
    """A fused graph could not be compiled or run compiled; the caller falls back to the reference."""


def kernel_mode(device_type: str) -> str | None:
    """How fused graphs run on a device: "compiled", "eager", or None (auto mode with no working toolchain)."""
    if KERNEL_MODE == "eager":
        return "eager"
    if device_type in _failed_devices:
        return None
    if KERNEL_MODE == "compiled" or toolchain_available(device_type):
        return "compiled"
    return None


@cache
def toolchain_available(device_type: str) -> bool:
    """Whether inductor can build kernels here: a C++ compiler on CPU, Triton on CUDA."""
    if device_type == "cpu":
        return cpu_tail.cpp_compiler() is not None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


# Inductor stores a pointwise result to memory when it reads many inputs (over 4 with several consumers, over
# 12 on CPU in any case); g * b, F * a * b and d(BN output) are such results, and storing them adds a full-size
# write and read to a pass. These options keep them in registers (checked in the generated C++).
_ONE_PASS = {"realize_cpu_acc_reads_threshold": 64, "realize_reads_threshold": 32}


def inductor_options() -> dict:
    """``_ONE_PASS`` less the options that this torch's inductor does not know (they come and go
    between releases, and ``torch.compile`` refuses an unknown one)."""
    from torch._inductor import config

    return {k: v for k, v in _ONE_PASS.items() if hasattr(config, k)}


def _compile_settings(device_type: str):
    """Inductor settings while a fused graph compiles. On CUDA one compile thread: the pool of compile
    worker processes stalled for minutes on a 16-core GPU machine, where one thread compiles the few
    fused kernels of a block shape in seconds (docs/performance.md)."""
    from torch._inductor import config

    if device_type == "cuda" and hasattr(config, "compile_threads"):
        return config.patch(compile_threads=1)
    return nullcontext()


class CompiledGraph:
    """``fn(cfg, *tensors)`` compiled with inductor, or run eagerly (``kernel_mode``).
    ``cfg`` (a hashable, static configuration) is specialised on: one graph per configuration and shape.
    If it cannot be compiled or run compiled: ``fallback(cfg, *tensors)`` where one is given (a backward,
    which must produce its gradients), else ``CompileFailed`` (the caller runs the reference)."""

    def __init__(self, fn, fallback=None):
        self.fn, self.fallback = fn, fallback
        self.compiled = None
        self.failed = False
        self._shapes: set = set()  # (cfg, shape, dtype, device type) already compiled

    def __call__(self, cfg, x, *args):
        if kernel_mode(x.device.type) != "compiled" or _get_current_dispatch_mode() is not None:
            # Under a dispatch mode (a user's TorchDispatchMode, say) torch.compile cannot run.
            return self.fn(cfg, x, *args)
        key = (cfg, tuple(x.shape), x.dtype, x.device.type)
        if key in self._shapes:
            return self._run(cfg, x, *args)
        tic = time.perf_counter()
        with _compile_settings(x.device.type):
            out = self._run(cfg, x, *args)
        if self.failed:  # ran the fallback
            return out
        self._shapes.add(key)
        log.info(
            "fused CBAM: compiled %s for %s blocks of shape %s (%s) in %.1f s",
            self.fn.__name__.strip("_"),
            x.device.type,
            tuple(x.shape),
            x.dtype,
            time.perf_counter() - tic,
        )
        return out

    def _run(self, cfg, x, *args):
        try:
            if self.compiled is None:
                # Static shapes: on CPU the shape-specialised kernels were faster per training step than
                # dynamic ones (docs/performance.md). A network has a few distinct block shapes per batch
                # size, so allow more than dynamo's default of 8 specialisations.
                _raise_recompile_limit(64)
                self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False, options=inductor_options())
                _announce_compilation()
            return self.compiled(cfg, x, *args)
        except Exception as err:  # a broken toolchain must not stop training: fall back, say so once
            self.failed = True
            _failed_devices.add(x.device.type)
            log.warning(
                "fused CBAM: its %s graph could not be compiled or run on %s (%s: %s); CBAM runs the reference "
                "implementation from now on%s",
                self.fn.__name__.strip("_"),
                x.device.type,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
                " (this step's gradients: the same equations op by op)" if self.fallback else "",
            )
            if self.fallback is not None:
                return self.fallback(cfg, x, *args)
            raise CompileFailed(str(err)) from err


def _raise_recompile_limit(limit: int) -> None:
    """Dynamo's per-function specialisation limit (``recompile_limit``, ``cache_size_limit`` before torch 2.6)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


@cache
def _announce_compilation() -> None:
    log.info(
        "fused CBAM: compiling its kernels for each new block shape on first use (inductor caches them on disk "
        "for later runs). CBAM_FUSED_KERNELS=eager skips compilation; attention.impl=reference skips the fused path."
    )
