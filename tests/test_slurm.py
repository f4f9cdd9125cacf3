"""SLURM, simulated: the environment that ``srun`` gives two tasks of one job (no torchrun), preemption
by SIGUSR1 with ``scontrol requeue``, and the requeued job's ``resume=auto``."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from engine import checkpoint as ckpt_io
from engine.distributed import first_host, slurm_to_torchrun_env
from engine.sweep import read_status, write_status
from helpers import ROOT, TINY, assert_equal_tree, results, torchrun

COMMON = [
    "experiment=smoke",
    *TINY,
    "trainer.sync_bn=true",
    "trainer.batch_size=64",
    "trainer.image_every=0",
    "optim.lr=0.01",
]


def test_first_host_of_a_slurm_host_list():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node3") == "node3"
    assert first_host("a-b[001-004]") == "a-b001"


def test_slurm_variables_become_torchrun_variables():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    assert slurm_to_torchrun_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "20123"
    torchrun_env = {"WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert not slurm_to_torchrun_env(torchrun_env) and torchrun_env["WORLD_SIZE"] == "2"


def test_only_rank_0_writes_the_run_status(tmp_path, monkeypatch):
    """The processes of a distributed run share its folder: two writers of status.json raced (one's
    temporary file renamed away under the other)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")  # a second srun task, before its process group exists
    write_status(tmp_path, "finished")
    monkeypatch.setenv("RANK", "1")  # under torchrun
    write_status(tmp_path, "failed", "crash", "boom")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    write_status(tmp_path, "stopped")
    assert read_status(tmp_path) == {"status": "stopped"} and sorted(tmp_path.iterdir()) == [tmp_path / "status.json"]


def slurm_tasks(run_dir, *overrides, job_id: int, extra_env=None):
    """Two train.py processes as the two tasks of one single-node SLURM job."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    procs = []
    for task in range(2):
        env = dict(
            base,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            SLURM_PROCID=str(task),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(task),
            SLURM_NODEID="0",
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NODELIST="localhost",
            SLURM_NNODES="1",
            **(extra_env or {}),
        )
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def wait_all(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


def _job_id() -> int:
    return random.randint(1000, 19000)  # its MASTER_PORT, 20000 + id, differs from run to run


EXACT = [*COMMON, "trainer.epochs=3"]


@pytest.fixture(scope="module")
def slurm_job(tmp_path_factory):
    """A two-task SLURM job of three epochs, uninterrupted: the run that torchrun and a preempted,
    requeued job must each reproduce."""
    run_dir = tmp_path_factory.mktemp("slurm")
    wait_all(slurm_tasks(run_dir, *EXACT, job_id=_job_id()))
    return run_dir


@pytest.mark.slow
def test_two_slurm_tasks_train_like_torchrun(tmp_path, slurm_job):
    torchrun(tmp_path / "torchrun", *EXACT)
    a, b = results(tmp_path / "torchrun"), results(slurm_job)
    assert a["history"] == b["history"] and b["steps"] == 3 * 8
    last = [ckpt_io.load(d / "checkpoints" / "last.pt") for d in (tmp_path / "torchrun", slurm_job)]
    assert_equal_tree(last[0]["model"], last[1]["model"])
    assert sorted(p.name for p in (slurm_job / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_preemption_requeues_and_the_requeued_job_ends_like_an_uninterrupted_one(tmp_path, slurm_job):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    path = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    job = _job_id()
    procs = slurm_tasks(tmp_path / "preempted", *EXACT, job_id=job, extra_env=path)
    deadline = time.time() + 300
    while "epoch 2/3 step 2/8" not in (line := procs[0].stdout.readline()):  # mid-epoch 2 (logged every 5 steps)
        assert (line or procs[0].poll() is None) and time.time() < deadline, "train.py ended early"
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    outs = wait_all(procs)
    assert "job requeued" in outs[0]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", str(job)]  # rank 0 only, once
    assert not (tmp_path / "preempted" / "results.json").exists()
    assert read_status(tmp_path / "preempted") == {"status": "stopped"}
    # the requeued job: same command (with resume=auto), SLURM_RESTART_COUNT=1
    wait_all(
        slurm_tasks(
            tmp_path / "preempted", *EXACT, "resume=auto", job_id=job, extra_env={**path, "SLURM_RESTART_COUNT": "1"}
        )
    )
    assert read_status(tmp_path / "preempted") == {"status": "finished"}
    a, b = results(slurm_job), results(tmp_path / "preempted")
    assert a["history"] == b["history"]
    ca, cb = (ckpt_io.load(d / "checkpoints" / "last.pt") for d in (slurm_job, tmp_path / "preempted"))
    assert_equal_tree(ca, cb)


@pytest.mark.slow
def test_compiled_ddp_trains_as_eager_ddp_and_both_ranks_stop_together(tmp_path):
    """trainer.compile=true with two processes (DDP wrapped, then compiled; gloo on the CPU): under torchrun
    the same history as eager DDP to float precision; as two SLURM tasks, SIGTERM to both mid-epoch ends
    both within the grace period, at the same step, with one checkpoint.

    Compiled by aot_eager: what DDP adds to compilation (dynamo's DDPOptimizer splits the graph at the
    gradient buckets, whose all-reduces must fire from AOT autograd's backward) is all there, without
    inductor's cold C++ compile in both ranks at once. Inductor's code for this model is
    test_compile.py's whole-model test."""
    common = [
        "experiment=smoke",
        *TINY,
        "trainer.batch_size=64",
        "trainer.image_every=0",
        "optim.lr=0.01",
        "attention.impl=reference",
        "trainer.compile_backend=aot_eager",
    ]
    torchrun(tmp_path / "eager", *common, "trainer.compile=false")
    torchrun(tmp_path / "compiled", *common, "trainer.compile=true")
    eager, compiled = results(tmp_path / "eager"), results(tmp_path / "compiled")
    assert compiled["settings"]["compile"] == "aot_eager" and eager["settings"]["compile"] == "off"
    for he, hc in zip(eager["history"], compiled["history"], strict=True):
        for split in ("train", "val"):
            assert hc[split]["loss"] == pytest.approx(he[split]["loss"], rel=1e-4)
            assert hc[split]["top1"] == pytest.approx(he[split]["top1"], abs=100 / he[split]["samples"])

    procs = slurm_tasks(tmp_path / "slurm", *common, "trainer.compile=true", "trainer.epochs=3", job_id=_job_id())
    deadline = time.time() + 300
    while "epoch 2/3 step 2/8" not in (line := procs[0].stdout.readline()):
        assert (line or procs[0].poll() is None) and time.time() < deadline, "train.py ended early"
    sent = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = wait_all(procs)
    # the checkpoint is written within trainer.stop_grace_s of the signal; the processes' exits (interpreter
    # teardown included, seconds on a loaded machine) within SLURM's default KillWait, 30 s
    assert time.time() - sent < 30, outs[0]
    stamp = re.search(r"\[([\d-]+ [\d:]+,\d+)\]\[cbam\]\[WARNING\] - stopped at epoch", outs[0])
    assert stamp, outs[0]
    assert datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - sent < 10, outs[0]
    progress = ckpt_io.load(tmp_path / "slurm" / "checkpoints" / "last.pt")["progress"]
    # the ranks agree every few steps (a quarter of the grace period) and at each epoch's start
    where = (progress["epoch"] + 1, progress["next_batch"])
    assert where[0] == 2 and 2 <= where[1] < 8 or where == (3, 0), progress
    assert f"stopped at epoch {where[0]}, batch {where[1]}" in outs[0]
    assert sorted(p.name for p in (tmp_path / "slurm" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
