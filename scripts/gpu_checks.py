#!/usr/bin/env python
"""The GPU check: every figure that decides the CUDA defaults, measured in one command, into one JSON file.

    python scripts/gpu_checks.py --out gpu-checks            # on a CUDA machine (scripts/gpu_checks.sh sets it up)
    python scripts/gpu_checks.py --cpu --out /tmp/checks     # toy sizes on the CPU (tests), compiled by aot_eager

Steps, each a separate process under a hard time limit (its whole process group is killed past it), each
adding its figures to ``<out>/gpu_checks.json`` as soon as it ends, so that a step that fails or runs
out of time loses only its own figures. On CUDA the default plan's limits (``LIMITS``) add up to about
6 minutes:

1. ``environment``: torch, Triton, timm and the GPU.
2. ``quickstart``: ``train.py experiment=quickstart`` with the defaults (no flag); ``--candidates`` adds
   the eager reference, whole-model compilation, CUDA graphs, the fused Function:
   ``train_img_per_s``, top-1, warm-up (compilation) and wall time from each run's results.json.
3. ``train_step``: ``scripts/bench_attention.py`` on ResNet-50 at 224x224, bf16 autocast, channels_last,
   batch 256, in one process, interleaved: training images/s and peak step memory of no attention,
   CBAM's reference, timm's ``resnet50`` with CBAM, then the default CBAM and compiled variants
   (``--variants`` for others). Each variant's first step (compilation) is timed apart. Compiling
   ResNet-50 on a cold cache takes minutes per variant, most of it in one thread; so first the
   compiled variants compile at the same time, one process each (``precompile``, their compile times
   reported), and the measuring process then finds their graphs in inductor's on-disk caches.
4. ``ddp_step``: ``torchrun --nproc_per_node=1 scripts/count_syncs.py`` on the quickstart: a DDP run
   with the defaults (compiled), its training images/s and the synchronisations per training step
   between logging steps (torch's sync debug mode; the goal is zero).
5. ``cuda_tests`` (with ``--steps``): ``pytest -m cuda`` (the fused kernels compiled by Triton against
   the reference, the image input decoded on the device against the CPU's).
6. ``input`` (with ``--steps``): ImageNet-like JPEGs written here, prepared as shards (longest side 256);
   ``bench_data.py`` on them (per core, and the whole input with its workers onto the GPU, decoded by
   the workers and by the GPU), then ResNet-50 bf16 training steps (batch 256, no attention, eager: the
   fastest model, the hardest to feed) from the shards against the same model fed from in-memory
   tensors; the ratio of their images/s says whether the input keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Quickstart candidates: name -> train.py overrides. The defaults run first, with no override, in place
# of the candidate that they equal (``default_candidate``).
CANDIDATES = {
    "eager reference": ["trainer.compile=false", "attention.impl=reference"],
    "compile default": ["trainer.compile=true", "trainer.compile_mode=default", "attention.impl=reference"],
    "compile reduce-overhead": [
        "trainer.compile=true",
        "trainer.compile_mode=reduce-overhead",
        "attention.impl=reference",
    ],
    "fused": ["trainer.compile=false", "attention.impl=fused", "trainer.epochs=1"],  # throughput only
}
# Eager variants first (seconds), then the compiled ones, each of whose first steps may take minutes on
# a cold cache: those past --first-step-limit are reported as dropped. More with --variants.
TRAIN_STEP_VARIANTS = [
    "none",
    "cbam (reference)",
    "timm {arch}-cbam",
    "cbam (default)",
    "none (default)",
    "timm {arch}-cbam@default",
]
QUICKSTART_RUNS = ("defaults",)  # more with --candidates ("eager reference", ...)
STEPS = ("quickstart", "train_step", "ddp_step", "cuda_tests", "input")
DEFAULT_STEPS = ("quickstart", "train_step", "ddp_step")  # cuda_tests and input with --steps
# Seconds per step on CUDA (the CPU mode allows more: compilation on a small CPU is slower). The default plan's
# add up to 360 s: "precompile" compiles train_step's compiled variants, each in its own process at the same time,
# so that train_step's own first steps find their graphs in inductor's caches. "input" (opt-in) is the sum of its
# parts' limits: 3 x 90 s (make, prepare, bench_data) and 3 x 60 s (training runs).
LIMITS = {
    "quickstart": 60,
    "quickstart eager reference": 55,
    "precompile": 140,
    "train_step": 100,
    "first_step": 50,
    "ddp_step": 60,
    "cuda_tests": 60,
}


def run_steps(steps: dict[str, list[str]], limit: float, log_dir: Path, env: dict | None = None) -> dict[str, dict]:
    """Run the commands of ``steps`` at the same time, each in its own process group, under one hard limit
    (a process group still running at the limit is killed); each one's output goes to ``<log_dir>/<name>.log``."""
    tic = time.perf_counter()
    running, logs, ended = {}, {}, {}
    for name, cmd in steps.items():
        logs[name] = log_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".log")
        with open(logs[name], "w") as log:  # the child keeps its own copy of the file
            running[name] = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
    while running and time.perf_counter() - tic < limit:
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                ended[name] = proc.returncode, time.perf_counter() - tic
                del running[name]
        time.sleep(0.1)
    for name, proc in running.items():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ended[name] = None, time.perf_counter() - tic
    entries = {}
    for name in steps:
        rc, seconds = ended[name]
        status = "ok" if rc == 0 else ("timed out" if rc is None else f"exit {rc}")
        print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
        entries[name] = {"status": status, "seconds": round(seconds, 1), "log": logs[name].name}
    return entries


def run_step(name: str, cmd: list[str], limit: float, log_dir: Path, env: dict | None = None) -> dict:
    """``cmd`` alone under a hard limit (``run_steps``)."""
    return run_steps({name: cmd}, limit, log_dir, env)[name]


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    for module in ("triton", "timm", "torchvision"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["driver"] = smi.stdout.strip() or None
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def default_candidate(device_type: str) -> str:
    """The candidate that the defaults (impl=auto, trainer.compile=null) amount to on the device."""
    import torch

    sys.path.insert(0, str(ROOT))
    from cbam.fused import auto_uses_fused
    from engine.device import compile_mode

    mode = compile_mode(None, "auto", torch.device(device_type))
    if mode is not None:
        return f"compile {mode}"
    return "fused" if auto_uses_fused(device_type) else "eager reference"


def quickstart_overrides(cpu: bool, data_root: str | None) -> list[str]:
    if cpu:  # seconds: the smoke recipe, two steps of one epoch
        return [
            "experiment=smoke",
            "model.width=0.25",
            "trainer.epochs=1",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1",
            "trainer.device=cpu",
        ]
    return ["experiment=quickstart", *([f"data.root={data_root}"] if data_root else [])]


def input_step(cpu: bool, out: Path, env: dict) -> dict:
    """ImageNet-like JPEGs, their shards, bench_data.py, and training from the shards against in-memory
    tensors (``input`` in the module's docstring)."""
    py, tmp = sys.executable, Path(tempfile.mkdtemp())
    images, distinct, batch, steps = (64, 16, 8, 4) if cpu else (4096, 512, 256, 40)
    entry: dict = {}
    make = [
        py,
        "scripts/make_image_folder.py",
        str(tmp / "jpegs"),
        "--classes",
        "8",
        "--train-per-class",
        str(images // 8),
        "--val-per-class",
        "4",
        "--distinct",
        str(distinct),
    ]
    prepare = [py, "scripts/prepare_data.py", str(tmp / "jpegs"), str(tmp / "shards"), "--quiet"]
    bench = [
        py,
        "scripts/bench_data.py",
        str(tmp / "jpegs"),
        "--rounds",
        "1",
        "--decode-on-device",
        "--batch",
        "32",
        "--json",
        str(out / "bench_data.json"),
    ]
    for name, cmd in (("make_image_folder", make), ("prepare_data", prepare), ("bench_data", bench)):
        entry[name] = run_step(f"input {name}", cmd, 600 if cpu else 90, out, env)
    if (out / "bench_data.json").exists():
        entry["bench_data"].update(json.loads((out / "bench_data.json").read_text()))
    model = [
        "model=resnet50",
        "attention=none",
        "trainer.compile=false",
        f"trainer.batch_size={batch}",
        "trainer.epochs=1",
        f"trainer.limit_train_batches={steps}",
        "trainer.limit_val_batches=1",
        "trainer.image_every=0",
        "trainer.log_every=1000",
        "data.num_classes=8",
    ]
    if cpu:
        model += ["model.width=0.25", "data.image_size=64", "trainer.device=cpu"]
    runs = {
        "shards": [
            "data=imagenet",
            "data.format=shards",
            f"data.root={tmp / 'shards'}",
            "data.workers=2" if cpu else f"data.workers={max(1, (os.cpu_count() or 2) - 2)}",
        ],
        "in_memory": [
            "data=synthetic",
            f"data.train_size={images}",
            "data.val_size=32",
            "data.image_size=64" if cpu else "data.image_size=224",
            "data.mean=[0.5,0.5,0.5]",
        ],
    }
    if not cpu:
        runs["shards decoded on the GPU"] = [*runs["shards"], "data.decode=device"]
    for name, overrides in runs.items():
        run_dir = tmp / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        cmd = [py, "train.py", *overrides, *model, f"hydra.run.dir={run_dir}"]
        entry[name] = run_step(f"input {name}", cmd, 600 if cpu else 60, out, env)
        if (run_dir / "results.json").exists():
            entry[name]["train_img_per_s"] = json.loads((run_dir / "results.json").read_text())["train_img_per_s"]
    if entry["in_memory"].get("train_img_per_s") and entry["shards"].get("train_img_per_s"):
        entry["shards_vs_in_memory"] = round(
            entry["shards"]["train_img_per_s"] / entry["in_memory"]["train_img_per_s"], 3
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-checks"))
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="toy sizes on the CPU, compiled variants by aot_eager: checks that the steps run",
    )
    parser.add_argument("--data-root", help="Fashion-MNIST folder for the quickstart (default: its usual lookup)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of the training-step benchmark")
    parser.add_argument(
        "--steps",
        nargs="*",
        default=list(DEFAULT_STEPS),
        choices=STEPS,
        help=f"steps to run (default: {' '.join(DEFAULT_STEPS)})",
    )
    parser.add_argument("--no-precompile", action="store_true", help="train_step compiles its variants itself")
    parser.add_argument("--variants", nargs="*", help="train_step variants (default: TRAIN_STEP_VARIANTS)")
    parser.add_argument(
        "--candidates", nargs="*", help="quickstart runs: 'defaults' and names of CANDIDATES (default: QUICKSTART_RUNS)"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "gpu_checks.json"
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu" if args.cpu else "cuda"}

    def save():
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, report_path)

    report["environment"] = environment()
    save()
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    if "quickstart" in args.steps:
        report["quickstart"] = {}
        default = default_candidate("cpu" if args.cpu else "cuda")
        runs = {f"defaults (= {default})": [], **{k: v for k, v in CANDIDATES.items() if k != default}}
        runs = {k: v for k, v in runs.items() if k.split(" (")[0] in (args.candidates or QUICKSTART_RUNS)}
        if args.cpu:
            runs = {k: v for k, v in runs.items() if "reduce-overhead" not in k}
        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides in runs.items():
                run_dir = Path(tmp) / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
                cmd = [
                    py,
                    "train.py",
                    *quickstart_overrides(args.cpu, args.data_root),
                    *overrides,
                    f"hydra.run.dir={run_dir}",
                ]
                limit = 150 if args.cpu else LIMITS.get(f"quickstart {name}", LIMITS["quickstart"])
                entry = run_step("quickstart " + name, cmd, limit, out, env)
                results = run_dir / "results.json"
                if results.exists():
                    r = json.loads(results.read_text())
                    entry.update(
                        {
                            k: r[k]
                            for k in ("top1", "top5", "train_img_per_s", "warmup_s", "train_s", "wall_s", "epochs")
                        }
                    )
                    entry["settings"] = r["settings"]
                report["quickstart"][name] = entry
                save()

    if "train_step" in args.steps:
        figures_dir = Path(tempfile.mkdtemp())
        arch, size, batch, device = ("resnet18", "32", "2", "cpu") if args.cpu else (args.arch, "224", "256", "cuda")
        variants = [v.format(arch=arch) for v in (args.variants or TRAIN_STEP_VARIANTS)]
        if args.cpu:  # CUDA graphs need CUDA
            variants = [v for v in variants if "reduce-overhead" not in v]
        bench = [
            py,
            "scripts/bench_attention.py",
            "--arch",
            arch,
            "--image-size",
            size,
            "--batch",
            batch,
            "--device",
            device,
            "--measure",
            "train",
        ]
        if not args.cpu:
            bench += ["--amp", "bf16", "--channels-last"]
        else:  # the steps' flow at toy sizes: inductor's code generation on the CPU has tests of its own
            bench += ["--compile-backend", "aot_eager"]
        compiled = [v for v in variants if "@" in v or v.endswith("(default)")]  # (default): compiled on CUDA
        precompile = {}
        if compiled and not args.no_precompile:
            jobs = {
                f"precompile {v}": [*bench, "--first-step-only", "--json", str(figures_dir / f"{i}.json"), "--only", v]
                for i, v in enumerate(compiled)
            }
            precompile = run_steps(jobs, 600 if args.cpu else LIMITS["precompile"], out, env)
            for i, v in enumerate(compiled):
                figures = figures_dir / f"{i}.json"
                if figures.exists():
                    precompile[f"precompile {v}"].update(json.loads(figures.read_text()))
        bench_json = figures_dir / "train_step.json"
        first_step_limit = 300 if args.cpu else LIMITS["first_step"]
        cmd = [
            *bench,
            "--reps",
            str(2 if args.cpu else args.reps),
            "--warmup",
            "1",
            "--first-step-limit",
            str(first_step_limit),
            "--json",
            str(bench_json),
            "--only",
            *variants,
        ]
        report["train_step"] = run_step("train_step", cmd, 600 if args.cpu else LIMITS["train_step"], out, env)
        if bench_json.exists():
            report["train_step"].update(json.loads(bench_json.read_text()))
        report["train_step"]["precompile"] = {k.removeprefix("precompile "): v for k, v in precompile.items()}
        save()

    if "ddp_step" in args.steps:
        figures = out / "ddp_step.json"
        steps = [
            "trainer.epochs=1",
            "trainer.limit_train_batches=8" if args.cpu else "trainer.limit_train_batches=60",
            "trainer.log_every=4" if args.cpu else "trainer.log_every=20",
            "trainer.image_every=0",
        ]
        cmd = [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "scripts/count_syncs.py",
            "--json",
            str(figures),
            "--",
            *quickstart_overrides(args.cpu, args.data_root),
            *steps,
        ]
        report["ddp_step"] = run_step("ddp_step", cmd, 300 if args.cpu else LIMITS["ddp_step"], out, env)
        if figures.exists():
            report["ddp_step"].update(json.loads(figures.read_text()))
        save()

    if "cuda_tests" in args.steps and not args.cpu:
        cmd = [
            py,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "tests/test_fused.py",
            "tests/test_image_data.py",
        ]
        report["cuda_tests"] = run_step("cuda_tests", cmd, LIMITS["cuda_tests"], out, env)
        save()

    if "input" in args.steps:
        report["input"] = input_step(args.cpu, out, env)
        save()

    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status", "ok") != "ok"]
    failed += [f"quickstart {k}" for k, v in report.get("quickstart", {}).items() if v["status"] != "ok"]
    failed += [f"input {k}" for k, v in report.get("input", {}).items() if isinstance(v, dict) and v["status"] != "ok"]
    print(f"figures in {report_path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
