"""Evaluation of a fused CBAM tail on the CPU by a hand-written kernel (``cpu_tail.cpp``).

Why hand-written: CBAM's evaluation tail must read the block's conv output x three times in the
inductor graph (channel pooling; the spatial descriptor, which needs the channel gate; the output,
which needs the spatial gate), and at ResNet-50's stage 1-2 sizes x is larger than the L3, so each
read comes from memory. The kernel here goes down the rows of each image and writes output row
r - k//2 right after the descriptor of row r, so the output pass re-reads x from L2: two reads from
memory instead of three. It also does the 7x7 conv on the two (H, W) maps directly (oneDNN's setup
of such a small conv costs more than the conv, docs/performance.md) and skips the compiled graph's
guards; what it computes between its two passes (the MLP of Eq. 2) is plain torch. Inductor cannot
generate this loop nest (it fuses by whole-tensor reductions), and ``torch.utils.cpp_extension``
would compile torch's headers on first use (slow on a small CPU, and it needs ninja): this file is
compiled alone with the C++ compiler that inductor already requires, and called through ``ctypes``.

Used for float32 channels_last maps in evaluation (running BatchNorm statistics, nothing recorded
for backward) with the orders channel_first, parallel, channel and spatial; everything else runs
the compiled graph. ``CBAM_CPU_TAIL=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_tail.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
KERNEL_ORDERS = ("channel_first", "parallel", "channel", "spatial")  # of fused.ORDERS, those the kernel takes
ENABLED = os.environ.get("CBAM_CPU_TAIL", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("CBAM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cbam-research"
    )
    return Path(root)


def _cpu_signature() -> str:
    """The CPU's feature flags: ``-march=native`` code is only valid on a CPU that has them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def cpp_compiler() -> str | None:
    """The C++ compiler inductor uses on CPU (its config), as a path, or None when there is none."""
    from torch._inductor import config

    cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    return shutil.which(cxx or "g++")


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, cached on disk by source, flags and CPU), or None
    when it cannot be built here; the reason is logged once."""
    cxx = cpp_compiler()
    if cxx is None:
        log.info("fused CBAM: no C++ compiler, evaluation uses the compiled graph")
        return None
    try:
        parts = [SOURCE.read_bytes(), " ".join((cxx, *FLAGS)).encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts))
        path = cache_dir() / f"cpu_tail-{key.hexdigest()[:16]}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed: a concurrent or killed build never leaves half a file.
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("fused CBAM: the CPU evaluation kernel could not be built (%s); using the compiled graph", detail)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.cbam_channel_pool.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.cbam_channel_pool.restype = None
    lib.cbam_spatial_output.argtypes = [ctypes.POINTER(SpatialOutputArgs)]
    lib.cbam_spatial_output.restype = None
    return lib


def applicable(cfg, x: torch.Tensor, shortcut: torch.Tensor | None) -> bool:
    """Whether the kernel computes this call: CPU, float32, channels_last, evaluation statistics,
    a supported order, and at least one image per thread (it splits the work by image)."""
    if not ENABLED or cfg.record or cfg.order not in KERNEL_ORDERS or "batch" in (cfg.bn, cfg.spatial_bn):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if shortcut is not None and (
        shortcut.dtype != torch.float32
        or shortcut.shape != x.shape
        or not shortcut.is_contiguous(memory_format=torch.channels_last)
    ):
        return False
    return x.shape[0] >= torch.get_num_threads() and library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def channel_pool(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """(AvgPool, MaxPool) over H, W of F = x * s + t, (N, C) each."""
    n, c, h, w = x.shape
    avg, mx = torch.empty(n, c), torch.empty(n, c)
    library().cbam_channel_pool(x.data_ptr(), n, c, h * w, s.data_ptr(), t.data_ptr(), avg.data_ptr(), mx.data_ptr())
    return avg, mx


class SpatialOutputArgs(ctypes.Structure):
    """``cbam_spatial_output``'s arguments, as the struct of the same name in cpu_tail.cpp lays them out."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("x", "out", "shortcut")],
        *[(name, ctypes.c_int64) for name in ("n_img", "channels", "height", "width")],
        *[(name, ctypes.c_void_p) for name in ("s", "t", "a")],
        ("desc_gated", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("weight", "bias")],
        ("ksize", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("sbn_gamma", "sbn_beta", "sbn_mean", "sbn_var")],
        ("sbn_eps", ctypes.c_double),
    ]


def spatial_output(cfg, x, shortcut, affine, a, conv, out: torch.Tensor) -> torch.Tensor:
    """out = relu(F * a * b + shortcut) with F = x * s + t (``affine``: (s, t)) and b = Ms of ``cfg``'s
    spatial gate (1 without one; ``conv``: its ``SpatialParams``)."""
    n, c, h, w = x.shape
    s, t = affine
    weight = bias = None
    bn = (None,) * 4
    if cfg.spatial:
        weight, bias = _f32(conv.weight), _f32(conv.bias)
        if conv.bn is not None:
            bn = tuple(_f32(p) for p in conv.bn)
    kept = (x, out, shortcut, s, t, a, weight, bias, *bn)  # alive until the call returns
    args = SpatialOutputArgs(
        *(_ptr(p) for p in kept[:3]),
        n,
        c,
        h,
        w,
        *(_ptr(p) for p in kept[3:6]),
        int(cfg.order == "channel_first"),
        _ptr(weight),
        _ptr(bias),
        0 if weight is None else weight.shape[-1],
        *(_ptr(p) for p in bn),
        cfg.spatial_bn_eps,
    )
    library().cbam_spatial_output(ctypes.byref(args))
    del kept
    return out
