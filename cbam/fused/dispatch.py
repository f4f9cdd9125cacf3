"""Which implementation of an attention module runs: the one place that decides, says why once, and
falls back to the reference when a fused graph cannot be compiled.

The fused Function runs for ``impl="fused"``, and for ``impl="auto"`` on the devices where it measured
faster (``AUTO_FUSED_DEVICES``) when its kernels compile there. The reference runs instead:
under ``torch.compile`` and ``torch.export`` (which fuse the reference's ops themselves), under
``torch.jit`` (which cannot record the fused Function's Python-side graphs), where forward hooks watch
the module or its gates, or when the BatchNorm in front is not a plain affine ``nn.BatchNorm2d`` (the
fused graphs call neither), and after a compile failure on that device (warned once by ``compiler``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .compiler import CompileFailed, kernel_mode
from .function import fused_gated_tail

log = logging.getLogger(__name__)

# Devices on which impl=auto runs the fused Function: where it measured faster than the reference
# (docs/performance.md). On CUDA the reference in eager mode measured faster, and whole-model
# compilation (trainer.compile) fuses the reference's own ops.
AUTO_FUSED_DEVICES = ("cpu",)

_said: set[tuple[str, str]] = set()  # (module type, reason) already logged


def auto_uses_fused(device_type: str) -> bool:
    """Whether impl=auto runs the fused Function on this device."""
    mode = kernel_mode(device_type)
    return mode == "eager" or (mode == "compiled" and device_type in AUTO_FUSED_DEVICES)


def hooks_present(*modules: nn.Module) -> bool:
    """Whether forward hooks watch any of ``modules`` or their submodules (a gate's output, say), or every
    module (global hooks). torch has no public query for this; its registries are read here alone."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules())


def _why_reference(module, x: torch.Tensor, bn: nn.Module | None) -> str | None:
    """Why ``module`` must run its reference implementation on ``x`` here, or None: the fused Function runs."""
    if module.impl == "reference":
        return "attention.impl=reference"
    if torch.compiler.is_compiling():
        return "under torch.compile"
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return "under torch.jit"
    if hooks_present(module):
        return "forward hooks watch it"
    if bn is not None and (type(bn) is not nn.BatchNorm2d or not bn.affine or hooks_present(bn)):
        return "the BatchNorm before it is not a plain affine nn.BatchNorm2d, or hooks watch it"
    if module.impl == "auto" and not auto_uses_fused(x.device.type):
        return f"attention.impl=auto runs the reference on {x.device.type}"
    return None


def fused_or_none(
    module, x: torch.Tensor, bn: nn.Module | None = None, shortcut: torch.Tensor | None = None, *, producer=None
) -> torch.Tensor | None:
    """relu(bn(x) * Mc * Ms + shortcut) (bn and the shortcut optional) by ``module``'s fused Function, or
    None where its reference must run (the reason logged once per module type). ``producer``: the module
    whose output x is and that nothing else keeps unless a hook on it does; evaluation may then write the
    result into x."""
    reason = _why_reference(module, x, bn)
    if reason is not None:
        if reason not in ("attention.impl=reference", "under torch.compile"):  # asked for, or silent by need
            _say_once(module, reason)
        return None
    overwrite_x = producer is not None and not hooks_present(producer)
    try:
        return fused_gated_tail(module.fused_plan(bn), x, shortcut, overwrite_x=overwrite_x)
    except CompileFailed:  # warned once by the compiler; x is untouched
        return None


def _say_once(module, reason: str) -> None:
    key = (type(module).__name__, reason)
    if key not in _said:
        _said.add(key)
        log.info("%s: the reference implementation runs (%s)", key[0], reason)
