"""Long-run reliability: killed and resumed runs end bit-identical, checkpoints never corrupt,
bad input is refused before any work, torchrun matches a single process."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cbam.errors import UserError
from engine import checkpoint as ckpt_io
from engine.trainer import Trainer
from helpers import ROOT, TINY, assert_same_run, compose, results, sigterm_after_output, torchrun, train, train_here

# 4 epochs x 8 steps on synthetic data, a checkpoint every 3 steps.
EXACT = ["experiment=smoke", *TINY, "trainer.epochs=4", "trainer.ckpt_every_steps=3", "trainer.image_every=0"]


def _refused(proc, *phrases):
    """Exit code 2 and one message (on the console, which Hydra's logging sends to stdout)."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for phrase in phrases:
        assert phrase in text, text


def final_weights(run_dir):
    return ckpt_io.load(run_dir / "checkpoints" / "last.pt")["model"]


def test_checkpoints_follow_the_umask(reference_run, tmp_path):
    """0644 under the usual umask 022, as any file (mkstemp alone makes them 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("last.pt", "best.pt"):
        assert (reference_run / "checkpoints" / name).stat().st_mode & 0o777 == 0o666 & ~mask
    old = os.umask(0o027)
    try:
        ckpt_io.save_atomic({"x": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, in this process: what the killed and resumed processes must end as."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_here(run_dir, *EXACT)
    return run_dir


def _command(run_dir, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *EXACT, *overrides]


def _start(run_dir, *overrides):
    return subprocess.Popen(
        _command(run_dir, *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_checkpoint(run_dir, proc, timeout=120):
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_is_bit_identical(reference_run, tmp_path):
    proc = _start(tmp_path)
    _wait_for_checkpoint(tmp_path, proc)
    time.sleep(random.uniform(0, 4))
    proc.kill()
    proc.wait()
    assert not (tmp_path / "results.json").exists(), "the run finished before it was killed; nothing tested"
    train_here(tmp_path, *EXACT, "resume=auto")
    assert_same_run(reference_run, tmp_path)


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_0_with_checkpoint_and_resumes_bit_identical(reference_run, tmp_path):
    cmd = _command(tmp_path, "trainer.ckpt_every_steps=0")
    out, rc, elapsed = sigterm_after_output(cmd, "epoch 1/4 step 5/8")  # mid-epoch, after step 5
    assert rc == 0 and elapsed < 10, f"exit {rc} after {elapsed:.1f} s:\n{out}"
    progress = ckpt_io.load(tmp_path / "checkpoints" / "last.pt")["progress"]
    assert progress["epoch"] == 0 and 5 <= progress["next_batch"] < 8, progress
    assert "stopped at epoch 1" in out
    train_here(tmp_path, *EXACT, "resume=auto")
    assert_same_run(reference_run, tmp_path)


def test_truncated_checkpoint_is_refused_clearly(reference_run, tmp_path):
    broken = tmp_path / "last.pt"
    data = (reference_run / "checkpoints" / "last.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt or truncated .*Fix:"):
        Trainer(compose(*EXACT, f"resume={broken}"), tmp_path / "run")


def test_failed_save_leaves_previous_checkpoint_loadable(reference_run, tmp_path, monkeypatch):
    """A write error mid-save (a full disk) must leave the old file intact and no temporary file."""
    path = tmp_path / "last.pt"
    shutil.copy(reference_run / "checkpoints" / "last.pt", path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt_io.CheckpointError, match="No space left.*previous checkpoint there, if any, is unchanged"):
        ckpt_io.save_atomic({"model": {}, "config": {}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    assert ckpt_io.load(path)["progress"]["epoch"] == 4


@pytest.mark.skipif(not shutil.which("mount") or os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_full_tmpfs_during_save_keeps_previous_checkpoint(reference_run, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt_io.save_atomic({"model": {"w": torch.zeros(10)}, "config": {}}, mnt / "last.pt")
        with pytest.raises(ckpt_io.CheckpointError, match="could not write checkpoint"):
            ckpt_io.save_atomic({"model": {"w": torch.zeros(1_000_000)}, "config": {}}, mnt / "last.pt")
        assert ckpt_io.load(mnt / "last.pt")["model"]["w"].shape == (10,)
        assert [p.name for p in mnt.iterdir()] == ["last.pt"]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_diverging_run_stops_with_exit_2_and_a_checkpoint_of_finite_weights(tmp_path):
    """lr 1e30: after the first update every step's loss is not finite and is skipped; the run stops once
    trainer.max_nonfinite_steps (3) in a row were, read on the next logging step."""
    proc = train(tmp_path, *EXACT, "optim.lr=1e30", "optim.momentum=0", "trainer.max_nonfinite_steps=3", check=False)
    _refused(proc, "were not finite in the last", "their updates were skipped", "checkpoint of the last finite weights")
    assert json.loads((tmp_path / "status.json").read_text())["kind"] == "non-finite"
    ckpt = ckpt_io.load(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["progress"]["global_step"] == 5  # the first logging step (every 5th) after 3 skipped in a row


def test_deterministic_runs_are_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        for d in (a, b):
            train_here(d, "experiment=smoke", *TINY, "trainer.epochs=1", "trainer.deterministic=true")
    finally:
        torch.use_deterministic_algorithms(False)  # what trainer.deterministic=true set for this process
    assert_same_run(a, b)


# ---- bad input refused before any work: one message, non-zero exit, nothing overwritten -------------
BAD_INPUTS = [
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-0.1", "optim.lr must be > 0"),
    ("trainer.batch_size=0", "trainer.batch_size must be >= 1"),
    ("trainer.epochs=0", "trainer.epochs must be >= 1"),
    ("model.width=0", "model.width must be > 0"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing must be in [0, 1)"),
    ("attention.kernel_size=4", "kernel_size must be a positive odd integer"),
    ("attention.reduction=64", "leaves no hidden units"),
    ("trainer.batch_size=100000", "is larger than the training set"),
    ("trainer.device=cuda:7", "no CUDA device is available"),
    ("trainer.amp=fp16", "trainer.amp=fp16 needs CUDA"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(tmp_path, override, message):
    """Refused as the trainer is built, before any work (in this process; that train.py turns the refusal
    into one message and exit code 2 is tests/test_ablation.py's test_a_single_run_keeps_one_message...)."""
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=re.escape(message)):
        Trainer(compose("experiment=smoke", *TINY, override), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_unwritable_output_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "checkpoints").mkdir()
    os.chmod(ro / "checkpoints", 0o500)
    try:
        if os.access(ro / "checkpoints", os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        proc = train(ro, "experiment=smoke", *TINY, check=False)
        _refused(proc, "cannot write to the output directory")
    finally:
        os.chmod(ro / "checkpoints", 0o700)


def test_image_folder_with_wrong_layout_is_refused(tmp_path):
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match=r"lacks val/ \(data\.format=folder\)\. Fix:"):
        Trainer(compose("data=imagenet", f"data.root={tmp_path / 'imgs'}"), tmp_path / "run")


# ---- torchrun ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """Two epochs of the same global batch: 2 processes (gloo, synchronised BN) and 1 process agree to
    float precision. Summation order differs between the two, and SGD amplifies such rounding
    differences step by step; at lr 0.01 over 16 steps they stay around 1e-5. At 32 px, not the smoke run's
    16: there the last stage's 2x2 maps leave synchronised BN 128 values a channel, and the differences grow
    past 1e-3."""
    common = [
        "experiment=smoke",
        *TINY,
        "data.image_size=32",
        "trainer.sync_bn=true",
        "trainer.batch_size=64",
        "trainer.image_every=0",
        "optim.lr=0.01",
    ]
    train_here(tmp_path / "single", *common)
    torchrun(tmp_path / "ddp", *common)
    single, ddp = results(tmp_path / "single"), results(tmp_path / "ddp")
    for h_single, h_ddp in zip(single["history"], ddp["history"], strict=True):
        for split in ("train", "val"):
            hs, hd = h_single[split], h_ddp[split]
            assert hd["samples"] == hs["samples"]
            assert hd["loss"] == pytest.approx(hs["loss"], rel=1e-4)
            assert hd["top1"] == pytest.approx(hs["top1"], abs=100 / hs["samples"])  # at most one borderline image
    ws, wd = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in ws:
        if ws[k].is_floating_point():
            torch.testing.assert_close(wd[k], ws[k], rtol=1e-3, atol=1e-3)
    # one TensorBoard run, one set of checkpoints, written by rank 0
    assert len(list((tmp_path / "ddp").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # resume under torchrun: continue to a third epoch
    torchrun(tmp_path / "ddp", *common, "trainer.epochs=3", "resume=auto")
    r = results(tmp_path / "ddp")
    assert r["epochs"] == 3 and r["steps"] == 3 * 8 and r["history"][:2] == ddp["history"]
