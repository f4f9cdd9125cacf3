#!/usr/bin/env python
"""Summarise one or more (multi)runs as an ablation table: one row per variant, seeds pooled.

    python scripts/ablation_table.py runs/ablation_fmnist/multirun_2026-11-24_10-00-00
    python scripts/ablation_table.py RUN_DIR... --out report/   # CSV and PNG go there

Every run folder below the given paths (a folder with ``.hydra/config.yaml``) is read: its
``results.json`` for final metrics and its TensorBoard events for validation curves. Runs are grouped by
every config field that varies between them, except the seed; each row reports the number of seeds,
mean +- std (sample std, n-1) of top-1 and top-5 error, params, GMACs and training images/s, and, for
ImageNet variants the paper reports, the paper's error and the difference. Against a baseline
attention variant (``--baseline``, default ``none``; the same other fields), each row also gets the mean
difference of top-1 error paired by seed, with its 95% confidence interval (Student's t,
``analysis.stats``), marked * where the interval excludes zero: a difference that the seeds' spread
cannot explain. A line above the table names the data set, epochs and recipe. Runs without a finished
``results.json`` are listed as unfinished or failed, never averaged.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from analysis.paper import find_row
from analysis.stats import PairedDifference, paired_difference
from engine.sweep import read_status
from models import backbone_options

IGNORED = {"seed", "name", "resume", "paths.log_dir", "paths.output_dir"}
PREFERRED = ("attention.name", "recipe", "model.arch", "data.name")  # kept when another field says the same


@dataclass
class Run:
    path: Path
    config: dict
    results: dict | None
    status: str  # finished | unfinished | stopped | failed [(kind: reason)]


@dataclass
class Variant:
    key: tuple
    runs: list[Run] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished"]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def read_run(path: Path) -> Run:
    """A run folder: finished (results.json), failed (its status.json says why), stopped, or unfinished
    (still running, or killed before it could record anything)."""
    config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
    results_file = path / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        return Run(path, config, results, "finished" if results.get("status") == "finished" else "failed")
    status = read_status(path)
    if status is not None and status["status"] != "finished":
        reason = f" ({status['kind']}: {status['reason']})" if status["status"] == "failed" else ""
        return Run(path, config, None, status["status"] + reason)
    log = path / "train.log"
    failed = log.is_file() and ("error:" in log.read_text() or "Traceback" in log.read_text())
    return Run(path, config, None, "failed" if failed else "unfinished")


def _natural(path: Path) -> list:
    """Sort key that puts multirun job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def find_runs(paths: list[Path]) -> list[Run]:
    runs = []
    for p in paths:
        for cfg in sorted(p.glob("**/.hydra/config.yaml"), key=_natural):
            runs.append(read_run(cfg.parent.parent))
    return runs


def group(runs: list[Run]) -> tuple[list[str], list[Variant]]:
    flat = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if k not in IGNORED and len({f.get(k) for f in flat}) > 1]
    # Drop fields that the others determine (a preset's pool when attention.name varies, say).
    for key in sorted(varying, key=lambda k: k in PREFERRED):
        rest = [k for k in varying if k != key]
        if rest and len({tuple(f.get(k) for k in rest) for f in flat}) == len(
            {tuple(f.get(k) for k in varying) for f in flat}
        ):
            varying = rest
    variants: dict[tuple, Variant] = {}
    for run, f in zip(runs, flat, strict=True):
        key = tuple(f.get(k) for k in varying)
        variants.setdefault(key, Variant(key)).runs.append(run)
    return varying, list(variants.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def short(key: str) -> str:
    """Column name of a config field: attention.name -> attention, attention.order -> order."""
    named = {"attention.name": "attention", "model.arch": "model", "data.name": "data"}
    if key in named:
        return named[key]
    return key.split(".", 1)[1] if key.startswith(("attention.", "model.")) else key


def summarise(varying: list[str], variant: Variant) -> dict:
    done = [r.results for r in variant.finished]
    config = variant.runs[0].config
    row = {short(k): v for k, v in zip(varying, variant.key, strict=True)}
    if not varying:
        row["variant"] = f"{config['model']['arch']} + {config['attention']['name']}"
    t1, t1s = mean_std([r["top1_err"] for r in done])
    t5, t5s = mean_std([r["top5_err"] for r in done])
    row.update(
        seeds=len(done),
        top1_err=t1,
        top1_err_std=t1s,
        top5_err=t5,
        top5_err_std=t5s,
        params_m=done[0]["params"] / 1e6 if done else float("nan"),
        gmacs=done[0]["gmacs"] if done else float("nan"),
        img_per_s=statistics.fmean(r["train_img_per_s"] for r in done) if done else float("nan"),
    )
    paper = None
    if config["data"]["name"] == "imagenet":
        arch = config["model"]["arch"]
        width = config["model"].get("width", 1.0) / backbone_options(arch).get("width", 1.0)  # MobileNet's alpha
        paper = find_row(arch, config["attention"]["name"], width)
    row["paper_top1_err"] = paper.top1_err if paper else None
    row["paper_top5_err"] = paper.top5_err if paper else None
    row["diff_top1_err"] = t1 - paper.top1_err if paper and done else None
    row["paper_approx"] = paper.approx if paper else None
    return row


def compare(varying: list[str], variants: list[Variant], baseline: str) -> dict[tuple, PairedDifference]:
    """Each variant's top-1 error against the variant whose attention is ``baseline`` and whose other
    varying fields are the same, paired by seed (variants without such a baseline, and the baseline
    itself, are left out)."""
    if "attention.name" not in varying:
        return {}
    at = varying.index("attention.name")
    by_key = {v.key: v for v in variants}
    out = {}
    for v in variants:
        base = by_key.get((*v.key[:at], baseline, *v.key[at + 1 :]))
        if base is None or base is v:
            continue
        out[v.key] = paired_difference(_errors_by_seed(v), _errors_by_seed(base))
    return out


def _errors_by_seed(variant: Variant) -> dict[int, float]:
    return {r.config["seed"]: r.results["top1_err"] for r in variant.finished}


def describe(runs: list[Run]) -> str:
    """The line above the table: what was trained and how, for every value found among the runs."""
    parts = []
    for label, key in [
        ("data", ("data", "name")),
        ("recipe", ("recipe",)),
        ("epochs", ("trainer", "epochs")),
        ("optim", ("optim", "name")),
        ("lr", ("optim", "lr")),
        ("schedule", ("sched", "name")),
        ("batch", ("trainer", "batch_size")),
        ("experiment", ("name",)),
    ]:
        values = []
        for r in runs:
            node = r.config
            for k in key:
                node = node.get(k) if isinstance(node, dict) else None
            if node is not None and node not in values:
                values.append(node)
        if values:
            parts.append(f"{label} {', '.join(map(str, values))}")
    return "; ".join(parts)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):  # no finished seed
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: list[dict], label_keys: list[str], baseline: str | None = None) -> str:
    """The table; the paired-difference column with a ``baseline``, the paper's columns where a row has them."""
    with_paper = any(r["paper_top1_err"] is not None for r in rows)
    head = [*label_keys, "seeds", "top-1 err (%)", "top-5 err (%)", "params (M)", "GMACs", "training img/s"]
    if baseline is not None:
        head.append(f"top-1 err - {baseline} (95% CI, paired t)")
    if with_paper:
        head += ["paper top-1 / top-5", "diff top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = "–"
        if r["paper_top1_err"] is not None:
            paper = f"{r['paper_top1_err']:.2f} / {r['paper_top5_err']:.2f}" + (
                " (approx.)" if r["paper_approx"] else ""
            )
        diff = f"{r['diff_top1_err']:+.2f}" if r["diff_top1_err"] is not None else "–"
        cells = [str(r[k]) for k in label_keys] + [
            str(r["seeds"]),
            _pm(r["top1_err"], r["top1_err_std"]),
            _pm(r["top5_err"], r["top5_err_std"]),
            f"{r['params_m']:.3f}",
            f"{r['gmacs']:.4f}",
            f"{r['img_per_s']:.0f}",
        ]
        if baseline is not None:
            cells.append(_paired(r))
        if with_paper:
            cells += [paper, diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(row: dict) -> str:
    if row.get("diff_pairs") is None:
        return "–"
    if row["diff_pairs"] < 2:
        return f"{row['diff_mean']:+.2f} (one seed)"
    mark = " *" if row["diff_significant"] else ""
    return f"{row['diff_mean']:+.2f} ({row['diff_low']:+.2f} to {row['diff_high']:+.2f}){mark}"


def val_curve(run: Run) -> list[tuple[int, float]]:
    """Validation top-1 error per epoch from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    acc.Reload()
    if "val/top1_err" not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars("val/top1_err")]


def plot(rows: list[dict], variants: list[Variant], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = [plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")(i % 20) for i in range(len(rows))]
    for x, (r, colour) in enumerate(zip(rows, colours, strict=True)):  # one colour per variant in both panels
        std = 0.0 if math.isnan(r["top1_err_std"]) else r["top1_err_std"]
        ax_bar.errorbar([x], [r["top1_err"]], yerr=[std], fmt="o", capsize=4, color=colour)
    ax_bar.set_xticks(list(range(len(rows))), labels, rotation=30, ha="right")
    ax_bar.set_ylabel("top-1 error (%), mean ± std over seeds")
    ax_bar.set_title("final validation error")
    for label, variant, colour in zip(labels, variants, colours, strict=True):
        curves = [c for c in (val_curve(r) for r in variant.finished) if c]
        if not curves:
            continue
        steps = sorted({s for c in curves for s, _ in c})
        mean = [statistics.fmean(v for c in curves for s2, v in c if s2 == s) for s in steps]
        ax_curve.plot(steps, mean, marker=".", label=label, color=colour)
    ax_curve.set_xlabel("epoch")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_ylabel("validation top-1 error (%), mean over seeds")
    ax_curve.set_title("validation curves")
    if ax_curve.lines:
        ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for ablation.csv / ablation.png (default: the first path)"
    )
    parser.add_argument(
        "--baseline", default="none", help="the attention variant that the others are compared with (default: none)"
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    runs = find_runs(args.paths)
    if not runs:
        parser.error("no runs found (folders with .hydra/config.yaml) under the given paths")
    varying, variants = group(runs)
    rows = [summarise(varying, v) for v in variants]
    differences = compare(varying, variants, args.baseline)
    for row, variant in zip(rows, variants, strict=True):
        d = differences.get(variant.key)
        row.update(
            diff_pairs=d.pairs if d else None,
            diff_mean=d.mean if d else None,
            diff_low=d.low if d else None,
            diff_high=d.high if d else None,
            diff_significant=d.significant if d else None,
        )
    label_keys = [short(k) for k in varying] or ["variant"]
    print(describe(runs) + "\n")
    print(markdown(rows, label_keys, args.baseline if differences else None))
    if differences:
        print(f"\n* the 95% interval of the difference from {args.baseline} (paired by seed) excludes zero")
    bad = [r for r in runs if r.status != "finished"]
    if bad:
        print("\nNot averaged (unfinished or failed):")
        for r in bad:
            print(f"- {r.status}: {r.path}")
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labels = [" / ".join(str(r[k]) for k in label_keys) for r in rows]
    plot(rows, variants, labels, out / "ablation.png")
    print(f"\nwrote {out / 'ablation.csv'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
