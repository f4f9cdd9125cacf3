"""Paper-table sweeps launch exactly their variants; ablation_table.py summarises real multiruns."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from analysis.paper import TABLES
from cbam import PRESETS, resolve_spec
from engine.tblog import KEY_FIELDS
from helpers import ROOT, results, run

pytestmark = pytest.mark.any_torch  # sweeps and the ablation table's output

TINY_SWEEP = [
    "data=synthetic",
    "data.train_size=16",
    "data.val_size=8",
    "trainer.batch_size=8",
    "trainer.epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.image_every=0",
]


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


@pytest.mark.parametrize("table", [1, 2, 3, 4, 5])
def test_paper_table_sweep_launches_exactly_its_variants(tmp_path, table):
    """Each job of the sweep, as a dry run (composed and checked, its folder and .hydra/ written, nothing
    trained): exactly the table's variants, each folder named by the fields its job changes. That jobs train
    and are summarised is test_ablation_table_on_a_real_multirun's."""
    width = [] if table == 5 else ["model.width=0.25"]
    seeds = (0, 1) if table == 3 else (0,)  # the seed axis is tested on table 3
    proc = run(
        "train.py",
        "-m",
        f"experiment=paper/table{table}",
        *TINY_SWEEP,
        *width,
        f"seed={','.join(map(str, seeds))}",
        "dry_run=true",
        f"hydra.sweep.dir={tmp_path}",
    )
    expected = {(r.arch, r.attention, r.width if table == 5 else 0.25, s) for r in TABLES[table] for s in seeds}
    jobs = launched(tmp_path)
    assert sorted(jobs) == sorted(expected)
    assert proc.stdout.count("dry run:") + proc.stderr.count("dry run:") == len(expected)
    job_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(job_dirs) == len(expected) and not any((p / "checkpoints").exists() for p in job_dirs)
    for job in job_dirs:  # each folder is named by the fields its job changes: attention=cbam,model=resnet18,...
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        fields = dict(part.split("=") for part in job.name.split(","))
        assert fields["attention"] == config["attention"]["name"], job.name
        assert fields.get("model", config["model"]["arch"]) == config["model"]["arch"], job.name
        assert float(fields.get("model.width", config["model"]["width"])) == config["model"]["width"], job.name


@pytest.mark.slow
def test_ablation_table_on_a_real_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    run(
        "train.py",
        "-m",
        "experiment=smoke",
        "model.width=0.25",
        "trainer.epochs=1",
        "data.train_size=128",
        "data.val_size=64",
        "trainer.image_every=0",
        "attention=none,se",
        "seed=0,1,2",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(
        f"attention={a},seed={s}" for a in ("none", "se") for s in range(3)
    )  # named by what the sweep varies
    events = EventAccumulator(str(sweep / "attention=se,seed=1"))
    events.Reload()
    experiment = metadata.parse_experiment_plugin_data(events.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG])
    # the key fields and the model's size only: model.width and trainer.epochs are the same in every job of the
    # sweep; the attention changes the size, so the size is among what differs
    assert [h.name for h in experiment.hparam_infos] == [*KEY_FIELDS.values(), "params_M", "GMACs"]
    assert {h.name for h in experiment.hparam_infos if h.differs} == {"attention", "seed", "params_M", "GMACs"}
    failed = tmp_path / "failed"
    # lr 1e30 diverges at once; the skipped steps in a row reach trainer.max_nonfinite_steps (10) in epoch 2
    proc = run(
        "train.py",
        "experiment=smoke",
        "model.width=0.25",
        "attention=se",
        "optim.lr=1e30",
        "optim.momentum=0",
        f"hydra.run.dir={failed}",
        check=False,
    )
    assert proc.returncode == 2
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablation_table.py"), str(sweep), str(failed), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| "))
    assert "| attention |" in header and "| seed |" not in header and "| name |" not in header and "pool" not in header
    assert "failed (non-finite: the loss or the gradients were not finite in the last" in proc.stdout
    assert f"): {failed}" in proc.stdout
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


def test_failing_jobs_do_not_stop_a_sweep(tmp_path):
    """Job 0 is refused (bad input), job 1 diverges (non-finite loss), job 2 trains: all three run, each
    folder says how it ended, the end of the sweep lists the failures, the command exits 1."""
    sweep = tmp_path / "sweep"
    # 4 steps: enough for lr 1e30 to diverge, and its updates to be skipped twice in a row
    tiny = [
        "data.train_size=32",
        "data.val_size=8",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        "trainer.image_every=0",
        "optim.momentum=0",
        "trainer.max_nonfinite_steps=2",
    ]
    proc = run(
        "train.py",
        "-m",
        "experiment=smoke",
        *tiny,
        "model.width=-1,0.25",
        "optim.lr=0.1,1e30",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    statuses = {job.name: json.loads((job / "status.json").read_text()) for job in sweep.iterdir() if job.is_dir()}
    # width -1 (x2 lr) refused, width 0.25 with lr 1e30 diverges, one trains; each folder named by what it sweeps
    assert set(statuses) == {f"model.width={w},optim.lr={lr}" for w in ("-1", "0.25") for lr in ("0.1", "1e+30")}
    kinds = sorted(s.get("kind", s["status"]) for s in statuses.values())
    assert kinds == ["bad input", "bad input", "finished", "non-finite"], statuses
    assert "3 job(s) of the sweep failed" in text and "Traceback" not in text
    cmd = [sys.executable, str(ROOT / "scripts" / "ablation_table.py"), str(sweep), "--out", str(tmp_path / "r")]
    report = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert report.stdout.count("- failed (") == 3


def test_a_single_run_keeps_one_message_and_exit_code_2(tmp_path):
    proc = run("train.py", "experiment=smoke", "model.width=-1", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "model.width must be > 0" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "status.json").read_text())["kind"] == "bad input"
