#!/usr/bin/env python
"""Cost of attention in a backbone, measured side by side in one process.

    python scripts/bench_attention.py                                 # ResNet-50, 224x224, batch 16, CPU
    python scripts/bench_attention.py --device cuda --amp bf16 --channels-last --batch 64
    python scripts/bench_attention.py --channels-last --keep-freed-memory   # CPU without page faults
    python scripts/bench_attention.py --measure infer --only "cbam (fused)" --reps 101   # one ratio, tight

For no attention, SE, CBAM (each implementation of this project) and timm's CBAM in the same
backbone, measures the training-step time (forward, backward, SGD step), the inference time and the
bytes of activations saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage
counted once). Variants are interleaved, in an order rotated by one at each repetition. Times are the
median of ``--reps`` repetitions; a ratio to no attention is the median of the per-repetition ratios
(each variant against no attention measured in the same repetition, seconds apart, so that drift of
the machine's speed over minutes cancels), printed with the quartiles of those ratios (how noisy the
machine is) and a 95% confidence interval for their median (how sure the median is: it narrows as
``--reps`` grows, where the quartiles do not). ``--measure`` times the training step or inference alone.

On the CPU, glibc's malloc hands blocks over 32 MiB back to the system when they are freed, and the
next such allocation page-faults its memory in afresh; whether a tensor pays for that depends on what
the process allocated before (ResNet-50 inference without attention: 0.36 s in one process and 0.56 s
in another, same code and machine). ``--keep-freed-memory`` makes malloc keep freed memory for reuse,
as PyTorch's CUDA allocator does, so that the ratios compare computation alone.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402


def timm_cbam_model(arch: str, **kwargs) -> nn.Module:
    """Our backbone with timm's ``CbamModule`` in each block's attention slot (MLP with bias, r=16)."""
    from timm.layers.cbam import CbamModule

    model = create_model(arch, attention="none", **kwargs)
    for block in model.modules():
        if hasattr(block, "attn") and hasattr(block, "placement"):
            channels = (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features
            block.attn = CbamModule(channels, rd_ratio=1 / 16, rd_divisor=1, mlp_bias=True, spatial_kernel_size=7)
    return model


def variants(arch: str) -> dict:
    out = {"none": lambda: create_model(arch, attention="none"), "se": lambda: create_model(arch, attention="se")}
    for impl in ("fused", "reference"):
        out[f"cbam ({impl})"] = lambda impl=impl: create_model(arch, attention={"preset": "cbam", "impl": impl})
    out["timm cbam"] = lambda: timm_cbam_model(arch)
    return out


def keep_freed_memory() -> None:
    """glibc's malloc: never mmap a block (so never unmap one when it is freed); trim the heap only past 2 GiB."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--keep-freed-memory needs glibc's malloc (Linux): mallopt is missing or refused the settings")


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of distinct storages that autograd saves for backward in one training forward."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in storages.items() if ptr not in params)


def median_ci(sorted_values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median: the order statistics x_(k) and x_(n+1-k)
    with the largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level``.
    Written here because the standard library has no such interval and SciPy is not a dependency;
    below 6 values no k reaches 95%, and the interval is the whole range (its coverage 1 - 2^(1-n))."""
    n = len(sorted_values)

    def coverage(k: int) -> float:  # 1 - 2 P(B <= k - 1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return sorted_values[k - 1], sorted_values[n - k]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--only", nargs="*", help="subset of variants")
    parser.add_argument("--keep-freed-memory", action="store_true", help="CPU: no page faults for large tensors")
    parser.add_argument(
        "--measure", choices=["both", "train", "infer"], default="both", help="time training steps, inference or both"
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    builders = {k: v for k, v in variants(args.arch).items() if not args.only or k in args.only or k == "none"}
    models = {k: b().to(device).to(memory_format=fmt) for k, b in builders.items()}
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(name):
        m, opt = models[name], optims[name]
        m.train()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer(name):
        models[name].eval()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            models[name](x)

    def timed(fn, name):
        sync()
        tic = time.perf_counter()
        fn(name)
        sync()
        return time.perf_counter() - tic

    names = list(models)

    def rotated(rep: int) -> list[str]:
        """Each repetition starts one variant later: what runs before a variant (allocator and cache
        state, machine drift) changes from repetition to repetition instead of favouring one."""
        k = rep % len(names)
        return names[k:] + names[:k]

    kinds = {"train": train_step, "infer": infer}
    if args.measure != "both":
        kinds = {args.measure: kinds[args.measure]}
    for rep in range(args.warmup):
        for name in rotated(rep):
            for fn in kinds.values():
                fn(name)
    times = {name: {kind: [] for kind in kinds} for name in models}
    for rep in range(args.reps):  # interleaved: drift in machine speed hits every variant alike
        for name in rotated(rep):
            for kind, fn in kinds.items():
                times[name][kind].append(timed(fn, name))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        memory = {name: saved_bytes(models[name].train(), x, y) for name in models}

    def seconds(name: str, kind: str) -> str:
        return f"{statistics.median(times[name][kind]):.4f}" if kind in kinds else "-"

    def ratio(name: str, kind: str) -> str:
        """Median, quartiles and the median's 95% confidence interval of the per-repetition ratios to no attention."""
        if kind not in kinds:
            return "- | - | -"
        ratios = sorted(t / b for t, b in zip(times[name][kind], times["none"][kind], strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        lo, hi = median_ci(ratios)
        return f"{statistics.median(ratios):.3f}x | {q1:.3f}-{q3:.3f} | {lo:.3f}-{hi:.3f}"

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.arch}, {args.image_size}x{args.image_size}, batch {args.batch}, {dev}, amp={args.amp}, "
          f"channels_last={args.channels_last}, keep_freed_memory={args.keep_freed_memory}, median of {args.reps}, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("| variant | train step (s) | train ratio | quartiles | 95% CI | inference (s) | inference ratio "
          "| quartiles | 95% CI | saved MiB | saved ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        saved = f"{memory[name] / 2**20:.1f} | {memory[name] / memory['none']:.3f}x"
        print(f"| {name} | {seconds(name, 'train')} | {ratio(name, 'train')} | {seconds(name, 'infer')} | "
              f"{ratio(name, 'infer')} | {saved} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
