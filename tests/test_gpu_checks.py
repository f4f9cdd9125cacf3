"""scripts/gpu_checks.sh in its CPU mode: every step of the GPU check runs and lands in one JSON file."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_gpu_check_cpu_mode_writes_every_figure(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), GPU_CHECKS_LIMIT="1200")
    proc = subprocess.run(
        ["bash", "scripts/gpu_checks.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert report["mode"] == "cpu" and report["environment"]["torch"]
    runs = report["quickstart"]
    assert set(runs) == {"defaults (= fused)"}
    run = runs["defaults (= fused)"]
    assert run["status"] == "ok" and run["train_img_per_s"] > 0 and 0 <= run["top1"] <= 100
    assert run["settings"]["attention_impl"] == "fused"
    step = report["train_step"]
    assert step["status"] == "ok" and not step["dropped"]
    # on the CPU the defaults are eager: "none (default)" is "none", "cbam (default)" the fused Function
    assert set(step["variants"]) == {
        "none",
        "cbam (reference)",
        "timm resnet18-cbam",
        "cbam (fused)",
        "timm resnet18-cbam@default",
    }
    for name, figures in step["variants"].items():
        assert figures["train"]["img_per_s"] > 0 and figures["first_step_s"] > 0, name
    assert step["variants"]["none"]["train"]["ratio"] == 1.0
    assert step["meta"]["default_cbam"] == "cbam (fused)"
    # the variants that may compile ran their first steps beforehand, each in its own process, at once
    precompiled = step["precompile"]
    assert set(precompiled) == {"cbam (default)", "none (default)", "timm resnet18-cbam@default"}
    for name, entry in precompiled.items():
        assert entry["status"] == "ok" and not entry["dropped"], name
        (figures,) = entry["variants"].values()
        assert figures["first_step_s"] > 0 and (tmp_path / entry["log"]).exists(), name
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu_checks.json", "train_step.log"}
    # DDP under torchrun (one process): no synchronisation inside the steps between logging steps
    ddp = report["ddp_step"]
    assert ddp["status"] == "ok" and ddp["ddp"] and ddp["steps_counted"] > 0 and ddp["syncs"] == 0, ddp
    assert "input" not in report  # opt-in (--steps ... input); its parts have tests of their own
