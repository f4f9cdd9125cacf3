"""Paper-table sweeps launch exactly their variants; ablation_table.py summarises real multiruns."""

import csv
import statistics
import subprocess
import sys

import pytest
import yaml

from cbam import PRESETS, resolve_spec
from cbam.paper import TABLES
from helpers import ROOT, results, run

TINY_SWEEP = ["data=synthetic", "data.train_size=16", "data.val_size=8", "trainer.batch_size=8", "trainer.epochs=1",
              "trainer.limit_train_batches=1", "trainer.image_every=0"]  # fmt: skip


def launched(sweep_dir):
    """(arch, attention, width, seed) of every job of a multirun, from each job's saved config."""
    jobs = []
    for cfg_file in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        cfg = yaml.safe_load(cfg_file.read_text())
        spec = {k: v for k, v in cfg["attention"].items()}
        assert resolve_spec(spec) == PRESETS[cfg["attention"]["name"]]  # every field is the preset's
        assert cfg["optim"]["lr"] == 0.1 and cfg["sched"]["name"] == "step" and cfg["trainer"]["epochs"] == 1
        jobs.append((cfg["model"]["arch"], cfg["attention"]["name"], cfg["model"]["width"], cfg["seed"]))
    return jobs


@pytest.mark.parametrize("table", [1, 2, 3, 5, pytest.param(4, marks=pytest.mark.slow)])
def test_paper_table_sweep_launches_exactly_its_variants(tmp_path, table):
    width = [] if table == 5 else ["model.width=0.25"]
    seeds = (0,) if table == 4 else (0, 1)  # 24 variants: one seed; the seed axis is tested on the others
    run("train.py", "-m", f"experiment=paper/table{table}", *TINY_SWEEP, *width, f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    expected = {(r.arch, r.attention, r.width if table == 5 else 0.25, s) for r in TABLES[table] for s in seeds}
    jobs = launched(tmp_path)
    assert sorted(jobs) == sorted(expected)
    assert all((p / "results.json").is_file() for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())


def test_ablation_table_on_a_real_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    run("train.py", "-m", "experiment=smoke", "model.width=0.25", "trainer.epochs=2", "attention=none,se",
        "seed=0,1,2", f"hydra.sweep.dir={sweep}")  # fmt: skip
    failed = tmp_path / "failed"
    proc = run("train.py", "experiment=smoke", "model.width=0.25", "attention=se", "optim.lr=1e30",
               "optim.momentum=0", f"hydra.run.dir={failed}", check=False)  # fmt: skip
    assert proc.returncode == 2
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation_table.py"), str(sweep), str(failed),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, check=True)  # fmt: skip
    header = proc.stdout.splitlines()[0]
    assert "| attention |" in header and "| seed |" not in header and "| name |" not in header and "pool" not in header
    assert f"failed: {failed}" in proc.stdout
    table = list(csv.DictReader(open(out / "ablation.csv")))
    rows = {r["attention"]: r for r in table if r["seeds"] != "0"}
    assert [r["attention"] for r in table if r["seeds"] == "0"] == ["se"]  # the failed variant: listed, no mean
    per_variant = {}
    for job in sweep.iterdir():
        if (job / "results.json").is_file():
            r = results(job)
            per_variant.setdefault(r["config"]["attention"]["name"], []).append(r)
    assert set(per_variant) == {"none", "se"} and all(len(v) == 3 for v in per_variant.values())
    for name, rs in per_variant.items():
        row = rows[name]
        assert int(row["seeds"]) == 3
        assert float(row["top1_err"]) == pytest.approx(statistics.fmean(r["top1_err"] for r in rs))
        assert float(row["top1_err_std"]) == pytest.approx(statistics.stdev(r["top1_err"] for r in rs))
        assert float(row["top5_err"]) == pytest.approx(statistics.fmean(r["top5_err"] for r in rs))
        assert float(row["params_m"]) == pytest.approx(rs[0]["params"] / 1e6)
    assert (out / "ablation.png").stat().st_size > 10_000
