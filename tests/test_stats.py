"""Paired differences between variants (analysis.stats) against hand computations, and ablation_table.py's
report of them on run folders written in the trainer's formats."""

import csv
import json
import math

import pytest
import yaml

from analysis.stats import paired_difference
from helpers import load_script

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t quantiles, from printed tables


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    variant, baseline = {0: 10.0, 1: 12.0, 2: 14.0, 7: 1.0}, {0: 9.0, 1: 10.0, 2: 11.0, 3: 50.0}
    d = paired_difference(variant, baseline)  # seeds 0-2 pair: differences 1, 2, 3 (mean 2, sd 1)
    half = T_975[2] * 1.0 / math.sqrt(3)
    assert d.pairs == 3 and d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert not d.significant  # -0.48 to 4.48 holds zero
    diffs = [0.5, 0.6, 0.7, 0.55]
    d = paired_difference(dict(enumerate(diffs)), dict.fromkeys(range(4), 0.0))
    sd = math.sqrt(sum((x - 0.5875) ** 2 for x in diffs) / 3)
    assert d.mean == pytest.approx(0.5875) and d.high - d.mean == pytest.approx(T_975[3] * sd / 2)
    assert d.significant
    one = paired_difference({0: 3.0}, {0: 1.0, 1: 2.0})
    assert one.pairs == 1 and one.mean == 2.0 and math.isnan(one.low) and not one.significant
    assert paired_difference({0: 1.0}, {1: 1.0}).pairs == 0


def write_run(folder, attention: str, seed: int, top1_err: float) -> None:
    """A finished run as train.py leaves it: .hydra/config.yaml and results.json."""
    config = {
        "model": {"arch": "resnet18", "width": 0.25},
        "attention": {"name": attention},
        "data": {"name": "fashion_mnist"},
        "optim": {"name": "sgd", "lr": 0.1},
        "sched": {"name": "step"},
        "trainer": {"epochs": 5, "batch_size": 128},
        "name": "ablation_fmnist",
        "seed": seed,
    }
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"status": "finished", "top1_err": top1_err, "top5_err": 0.5, "params": 1e6, "gmacs": 0.1}
    (folder / "results.json").write_text(json.dumps({**results, "train_img_per_s": 100.0, "config": config}))


def test_ablation_table_reports_paired_differences_against_the_baseline(tmp_path, capsys):
    errors = {"none": [10.0, 11.0, 12.0], "se": [9.0, 10.0, 11.5], "cbam": [10.5, 12.0, 12.0]}
    for attention, by_seed in errors.items():
        for seed, err in enumerate(by_seed):
            write_run(tmp_path / "sweep" / f"attention={attention},seed={seed}", attention, seed, err)
    assert load_script("ablation_table").main([str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    first, header = out.splitlines()[0], out.splitlines()[2]
    recipe = "optim sgd; lr 0.1; schedule step; batch 128"
    assert first == f"data fashion_mnist; epochs 5; {recipe}; experiment ablation_fmnist"
    assert "training img/s" in header and "top-1 err - none (95% CI, paired t)" in header and "paper" not in header
    rows = {r["attention"]: r for r in csv.DictReader(open(tmp_path / "r" / "ablation.csv"))}
    assert rows["none"]["diff_mean"] == ""  # the baseline itself
    for name in ("se", "cbam"):
        diffs = [v - b for v, b in zip(errors[name], errors["none"], strict=True)]
        mean, sd = sum(diffs) / 3, math.sqrt(sum((x - sum(diffs) / 3) ** 2 for x in diffs) / 2)
        assert float(rows[name]["diff_mean"]) == pytest.approx(mean)
        assert float(rows[name]["diff_high"]) == pytest.approx(mean + T_975[2] * sd / math.sqrt(3))
    # se: -1, -1, -0.5 (mean -0.83, interval below zero); cbam: +0.5, +1, 0 (holds zero)
    assert rows["se"]["diff_significant"] == "True" and rows["cbam"]["diff_significant"] == "False"
    se_line = next(line for line in out.splitlines() if line.startswith("| se "))
    assert se_line.rstrip(" |").endswith("*") and "-0.83 (" in se_line
