#!/usr/bin/env python
"""Cost of attention in a backbone, measured side by side in one process.

    python scripts/bench_attention.py                                 # ResNet-50, 224x224, batch 16, CPU
    python scripts/bench_attention.py --device cuda --amp bf16 --channels-last --batch 64
    python scripts/bench_attention.py --channels-last --keep-freed-memory   # CPU without page faults
    python scripts/bench_attention.py --measure infer --only "cbam (fused)" --reps 101   # one ratio, tight
    python scripts/bench_attention.py --device cuda --amp bf16 --channels-last --batch 256 --measure train \
        --only "cbam (reference)" "cbam (reference)@default" "timm resnet50-cbam@default" --json out.json

For no attention, SE, CBAM (each implementation of this project) and timm's CBAM in the same
backbone, measures the training-step time (forward, backward, SGD step), the inference time and the
bytes of activations saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage
counted once). Variants are interleaved, in an order rotated by one at each repetition. Times are the
median of ``--reps`` repetitions; a ratio to no attention is the median of the per-repetition ratios
(each variant against no attention measured in the same repetition, seconds apart, so that drift of
the machine's speed over minutes cancels), printed with the quartiles of those ratios (how noisy the
machine is) and a 95% confidence interval for their median (how sure the median is: it narrows as
``--reps`` grows, where the quartiles do not). ``--measure`` times the training step or inference alone.

``NAME@MODE`` is variant NAME under ``torch.compile(mode=MODE)`` of the whole model (the reference
modules inside, fused by inductor); ``cbam (default)`` and ``none (default)`` are what ``attention=cbam``
and ``none`` with the trainer's defaults run on the device (``engine.device``). "timm resnet50-cbam" is
timm's own ``resnet50`` with ``block_args={"attn_layer": "cbam"}``. The first warm-up step of each
variant (compilation, autotuning, CUDA-graph capture) is timed apart and reported as
``first_step_s``; a variant whose first step runs past ``--first-step-limit`` seconds is dropped with a
note. ``--first-step-only`` runs those first steps alone: several such processes at once fill
inductor's on-disk caches for one that measures (``scripts/gpu_checks.py``). On CUDA,
``peak_step_mib`` is the peak memory of one training step above what the models hold between steps.
``--json`` writes every figure to a file; a compiled variant is also compared with no attention
compiled the same way, when that is measured. On CUDA the backends are set as ``train.py`` sets them
by default: TF32, and cuDNN's benchmark mode (its algorithm search is part of the first step).

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
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cbam.fused import auto_uses_fused
from engine.device import COMPILE_MODES, compile_mode, set_cudnn_benchmark, set_tf32
from models import create_model


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
    """Eager variants by name (``NAME@MODE`` compiles one, see ``build``)."""
    out = {"none": lambda: create_model(arch, attention="none"), "se": lambda: create_model(arch, attention="se")}
    for impl in ("fused", "reference"):
        out[f"cbam ({impl})"] = lambda impl=impl: create_model(arch, attention={"preset": "cbam", "impl": impl})
    out["timm cbam"] = lambda: timm_cbam_model(arch)
    out[f"timm {arch}-cbam"] = lambda: _timm_model(arch)
    return out


def _timm_model(arch: str) -> nn.Module:
    import timm

    return timm.create_model(arch, block_args={"attn_layer": "cbam"})


DEFAULT_VARIANTS = ("none", "se", "cbam (fused)", "cbam (reference)", "timm cbam")


def default_variant(name: str, device: torch.device) -> str:
    """``cbam (default)`` / ``none (default)``: what ``attention=cbam`` / ``none`` with the trainer's
    defaults runs on ``device`` (the implementation and the torch.compile mode)."""
    mode = compile_mode(None, "auto", device)
    base = "none" if name == "none (default)" else f"cbam ({'fused' if auto_uses_fused(device.type) else 'reference'})"
    return base + (f"@{mode}" if mode else "")


def build(name: str, arch: str) -> tuple[nn.Module, str | None]:
    """The model of variant ``name`` and its torch.compile mode (None: eager); compiled by the caller."""
    base, _, mode = name.partition("@")
    eager = variants(arch)
    if base not in eager or (mode and mode not in COMPILE_MODES[1:]):
        raise SystemExit(
            f"unknown variant {name!r}; allowed: {', '.join(eager)}, each optionally @MODE with MODE "
            f"one of {', '.join(COMPILE_MODES[1:])}"
        )
    return eager[base](), mode or None


class FirstStepTooLong(BaseException):  # not an Exception: dynamo must not swallow it
    pass


def _time_limit(seconds: float):
    """SIGALRM raises FirstStepTooLong in the main thread after ``seconds`` (0: no limit)."""

    def expire(*_):
        raise FirstStepTooLong

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0))


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


def compiled(model: torch.nn.Module, mode: str, backend: str) -> torch.nn.Module:
    """``torch.compile`` of ``model``: with ``mode`` under inductor, with ``backend``'s own defaults else."""
    return torch.compile(model, mode=mode) if backend == "inductor" else torch.compile(model, backend=backend)


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
    parser.add_argument("--only", nargs="*", help="subset of variants (NAME or NAME@MODE); 'none' is always measured")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--first-step-limit", type=float, default=0, help="seconds; drop a variant past it (0: none)")
    parser.add_argument(
        "--first-step-only",
        action="store_true",
        help="run the first step of each variant of --only "
        "(no baseline) and stop: compilation alone, which fills inductor's caches",
    )
    parser.add_argument("--keep-freed-memory", action="store_true", help="CPU: no page faults for large tensors")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for NAME@MODE variants (MODE applies to inductor only); aot_eager traces "
        "forward and backward without generating code: a check of the script's steps, not a measurement",
    )
    parser.add_argument(
        "--measure", choices=["both", "train", "infer"], default="both", help="time training steps, inference or both"
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    set_tf32(device, True)  # the backends as train.py sets them by default (no effect on the CPU)
    set_cudnn_benchmark(device, True)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    names = list(args.only or DEFAULT_VARIANTS)
    if not args.first_step_only:
        names = ["none", *(n for n in names if n != "none")]
    names = [default_variant(n, device) if n.endswith("(default)") else n for n in names]
    names = list(dict.fromkeys(names))
    models, modes = {}, {}
    for name in names:
        model, modes[name] = build(name, args.arch)
        models[name] = model.to(device).to(memory_format=fmt)
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    runners = {k: compiled(m, modes[k], args.compile_backend) if modes[k] else m for k, m in models.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(name):
        m, opt = runners[name], optims[name]
        models[name].train()
        if modes[name] in ("reduce-overhead", "max-autotune"):  # CUDA graphs: a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer(name):
        models[name].eval()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            runners[name](x)

    def timed(fn, name):
        sync()
        tic = time.perf_counter()
        fn(name)
        sync()
        return time.perf_counter() - tic

    def rotated(rep: int) -> list[str]:
        """Each repetition starts one variant later: what runs before a variant (allocator and cache
        state, machine drift) changes from repetition to repetition instead of favouring one."""
        k = rep % len(names)
        return names[k:] + names[:k]

    kinds = {"train": train_step, "infer": infer}
    if args.measure != "both":
        kinds = {args.measure: kinds[args.measure]}
    first_step, dropped = {}, {}
    for name in list(names):  # the first step of each variant alone: compilation is not a step's time
        tic = time.perf_counter()
        try:
            _time_limit(args.first_step_limit)
            for fn in kinds.values():
                fn(name)
            sync()
        except FirstStepTooLong:
            dropped[name] = f"first step ran past {args.first_step_limit:.0f} s"
        except Exception as err:  # a variant that cannot run here (a compile error, say) is reported, not fatal
            dropped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        first_step[name] = time.perf_counter() - tic
        print(f"first step of {name}: {first_step[name]:.1f} s", file=sys.stderr, flush=True)
        if name in dropped:
            if name == "none":
                raise SystemExit(f"the baseline failed: {dropped[name]}")
            print(f"dropped {name}: {dropped[name]}", file=sys.stderr)
            names.remove(name)
            del models[name], runners[name], optims[name]
    if args.first_step_only:
        if args.json:
            figures = {name: {"first_step_s": first_step[name]} for name in names}
            args.json.write_text(json.dumps({"variants": figures, "dropped": dropped}, indent=2))
        return 0
    for rep in range(args.warmup):
        for name in rotated(rep):
            for fn in kinds.values():
                fn(name)
    times = {name: {kind: [] for kind in kinds} for name in models}
    for rep in range(args.reps):  # interleaved: drift in machine speed hits every variant alike
        for name in rotated(rep):
            for kind, fn in kinds.items():
                times[name][kind].append(timed(fn, name))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # eager models: autograd's view
        memory = {name: saved_bytes(models[name].train(), x, y) for name in models if not modes[name]}
    peak = {}
    if device.type == "cuda" and "train" in kinds:
        for name in names:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            train_step(name)
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() - held

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
    print(
        f"{args.arch}, {args.image_size}x{args.image_size}, batch {args.batch}, {dev}, amp={args.amp}, "
        f"channels_last={args.channels_last}, keep_freed_memory={args.keep_freed_memory}, median of {args.reps}, "
        f"torch {torch.__version__}\n"
    )
    if args.json:
        figures = {}
        for name in names:
            figures[name] = _figures(
                times[name],
                times["none"],
                args.batch,
                first_step[name],
                memory.get(name),
                memory["none"],
                peak.get(name),
                peak.get("none"),
            )
            same_mode = f"none@{modes[name]}"
            if modes[name] and same_mode in names:  # also against no attention compiled the same way
                figures[name]["vs " + same_mode] = _figures(
                    times[name],
                    times[same_mode],
                    args.batch,
                    first_step[name],
                    None,
                    None,
                    peak.get(name),
                    peak.get(same_mode),
                )
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "only")}
        meta.update(device_name=dev, torch=torch.__version__, default_cbam=default_variant("cbam (default)", device))
        args.json.write_text(json.dumps({"meta": meta, "variants": figures, "dropped": dropped}, indent=2))
    print(
        "| variant | train step (s) | train ratio | quartiles | 95% CI | inference (s) | inference ratio "
        "| quartiles | 95% CI | saved MiB | saved ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        saved = f"{memory[name] / 2**20:.1f} | {memory[name] / memory['none']:.3f}x" if name in memory else "- | -"
        print(
            f"| {name} | {seconds(name, 'train')} | {ratio(name, 'train')} | {seconds(name, 'infer')} | "
            f"{ratio(name, 'infer')} | {saved} |"
        )
    return 0


def _figures(times, base, batch, first_step, saved, saved_base, peak, peak_base) -> dict:
    """One variant's figures for ``--json``: medians, ratios to no attention with quartiles and 95% CI."""
    out = {"first_step_s": first_step}
    for kind, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, base[kind], strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[kind] = {
            "median_s": statistics.median(ts),
            "img_per_s": batch / statistics.median(ts),
            "ratio": statistics.median(ratios),
            "quartiles": [q1, q3],
            "ci95": list(median_ci(ratios)),
        }
    if saved is not None:
        out["saved_mib"], out["saved_ratio"] = saved / 2**20, saved / saved_base
    if peak is not None:
        out["peak_step_mib"], out["peak_ratio"] = peak / 2**20, peak / peak_base
    return out


if __name__ == "__main__":
    sys.exit(main())
