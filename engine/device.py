"""The training device and what the trainer's ``auto`` settings mean on it.

Each per-device default is the one that measured fastest on that kind of device while training to
the same accuracy (docs/performance.md); every one is a single setting away:

- ``trainer.amp=auto``: bf16 autocast on CUDA (where the GPU supports it), float32 on the CPU.
- ``trainer.tf32=true``: TF32 tensor cores for float32 matmuls and convolutions on CUDA.
- cuDNN's benchmark mode on CUDA, off with ``trainer.deterministic=true``.
- ``trainer.compile=null`` (auto): ``torch.compile`` of the whole model in the mode of
  ``AUTO_COMPILE_MODE`` for the device type (``AUTO_COMPILE_MODE_DDP`` with several processes), none
  where the device type is absent from it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cbam.errors import UserError

from . import distributed as dist

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)

# torch.compile modes, for trainer.compile_mode (auto: AUTO_COMPILE_MODE's, else "default").
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# torch.compile backends, for trainer.compile_backend: inductor generates the kernels (the one that trains
# faster); aot_eager (dynamo's graph capture and AOT autograd, run by ATen's own kernels) and eager
# (the capture alone) tell a compiler problem from a capture problem, and train in seconds of compilation.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# trainer.compile=null: device type -> the torch.compile mode that measured fastest there. On CUDA,
# CUDA graphs (reduce-overhead): the quickstart on an H200 trained 3.4x faster than with the default
# mode and 3.7x faster than eager, to the same accuracy (docs/performance.md). On the CPU eager mode
# with the fused attention Function.
AUTO_COMPILE_MODE: dict[str, str] = {"cuda": "reduce-overhead"}
# The same with several processes (DDP wrapped, then compiled: dynamo's DDPOptimizer splits the graph at
# DDP's gradient buckets). On CUDA the default mode: CUDA graphs with DDP and BatchNorm meet known
# problems in torch (pytorch/pytorch#139207, "skipping cudagraphs due to mutated inputs"), so they wait
# for a measurement there (scripts/gpu_checks.py's one-process DDP step). The CPU: eager, as alone.
AUTO_COMPILE_MODE_DDP: dict[str, str] = {"cuda": "default"}


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (its local rank's) when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu or auto")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``trainer.amp`` on ``device`` (None: float32)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    dtype = AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type != "cuda":
        raise UserError("trainer.amp=fp16 needs CUDA; use trainer.amp=bf16, auto or none on the CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision when ``dtype`` is set, a no-op context otherwise."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (no effect elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def set_cudnn_benchmark(device: torch.device, enabled: bool) -> None:
    """cuDNN's benchmark mode on CUDA: the first call of each convolution shape times cuDNN's algorithms
    and keeps the fastest, where its heuristics alone can pick a slow one for unusual shapes (the spatial
    gate's 2 -> 1 channel k x k conv). Off for deterministic runs (the choice can differ between runs)."""
    torch.backends.cudnn.benchmark = enabled and device.type == "cuda"


def compile_mode(
    compile: bool | None, mode: str, device: torch.device, distributed: bool = False, backend: str = "inductor"
) -> str | None:
    """The ``torch.compile`` mode to train with, or None for eager mode; with a ``backend`` other than
    inductor (the modes are inductor's), the backend's name.

    ``compile``: True, False or None (auto: ``AUTO_COMPILE_MODE``, or ``AUTO_COMPILE_MODE_DDP`` for a DDP
    model, of the device type); ``mode``: one of ``COMPILE_MODES``, where "auto" takes the device type's
    measured mode, else "default"."""
    measured = (AUTO_COMPILE_MODE_DDP if distributed else AUTO_COMPILE_MODE).get(device.type)
    if compile is None:
        if measured is None:
            return None
        chosen = measured if mode == "auto" else mode
    elif not compile:
        return None
    else:
        chosen = (measured or "default") if mode == "auto" else mode
    return chosen if backend == "inductor" else backend
