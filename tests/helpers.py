"""Shared test helpers: run the real entry points, write data sets in their real on-disk formats."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=0.25", "trainer.log_every=5"]


def run(script: str, *args: str | Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train.py``, ``eval.py`` or ``scripts/<name>.py`` with ``args`` as a user would, in a process; fail
    with its output when it fails (``check``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    args = [str(a) for a in args]
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_script(name: str):
    """``scripts/<name>.py`` as a module, to call its ``main`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def script_here(name: str, *args) -> tuple[int, str, str]:
    """``scripts/<name>.py`` with ``args``, its ``main`` in this process: the exit status (what ``main``
    returns, or the ``SystemExit`` of argparse's refusals), stdout and stderr. For tests whose subject is
    the script's work or refusals; one test per script runs it in a process (``run``)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = load_script(name).main([str(a) for a in args])
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def compose(*overrides: str, run_dir: Path | str = "unused"):
    """The typed config (``engine.config.TrainConfig``) that ``train.py`` builds from ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from engine.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return to_object(cfg)


def train_here(run_dir: Path, *overrides: str, stop=None) -> dict | None:
    """``train.py``'s run in this process (no interpreter start, no imports): the same trainer on the same
    config, writing the same files into ``run_dir``; returns the results (None if stopped). For tests
    whose subject is not the process itself (signals, exit codes, torchrun: those run ``train``)."""
    from engine.trainer import Trainer

    return Trainer(compose(*overrides, run_dir=run_dir), run_dir, stop, list(overrides)).fit()


def kill_in_process_then_resume(run_dir: Path, *overrides: str, kill_at_step: int):
    """The trainer in this process, killed (KeyboardInterrupt) as it starts step ``kill_at_step``, then resumed
    with ``resume=auto`` to its end. Returns the killed trainer, with ``checkpoint_at_kill``: the global step
    of the last checkpoint it left."""
    import pytest

    from engine.trainer import Trainer

    trainer = Trainer(compose(*overrides, run_dir=run_dir), run_dir)
    real_step = trainer.train_step

    def step(x, y):
        if trainer.global_step == kill_at_step:
            raise KeyboardInterrupt("killed")
        real_step(x, y)

    trainer.train_step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.checkpoint_at_kill = final_checkpoint(run_dir)["progress"]["global_step"]
    Trainer(compose(*overrides, "resume=auto", run_dir=run_dir), run_dir).fit()
    return trainer


def synthetic_batches(world_size=1, rank=0, train=True, augment=True, batch_size=8, randaugment=""):
    """Training (or evaluation) batches of a small synthetic set (50 images of 12 px), seed 3, crops padded by 2."""
    from engine.data import TensorBatches, synthetic

    split, _ = synthetic(5, 3, 12, 50, 10)
    return TensorBatches(
        split.images,
        split.labels,
        batch_size,
        [0.5] * 3,
        [0.25] * 3,
        train,
        seed=3,
        augment=augment,
        crop_padding=2,
        rank=rank,
        world_size=world_size,
        randaugment=randaugment,
    )


def torchrun(run_dir, *overrides):
    """``train.py`` in two processes under ``torchrun`` (gloo on the CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run("train.py", f"hydra.run.dir={run_dir}", *overrides, **kwargs)


def sigterm_after_output(
    cmd: list[str], marker: str, env: dict | None = None, timeout: float = 120, group: bool = False
):
    """Start ``cmd``, send SIGTERM as soon as a line of its output contains ``marker``; (output, exit
    status, seconds from the signal to the exit). ``group``: to every process the command started (its
    own process group), as SLURM signals a job's processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") if env is None else env
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=group
    )
    lines, deadline = [], time.time() + timeout
    try:
        while not any(marker in line for line in lines):
            line = proc.stdout.readline()
            assert (line or proc.poll() is None) and time.time() < deadline, "".join(lines)
            lines.append(line)
    except BaseException:  # the marker never came: leave no process behind
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait()
        raise
    sent = time.time()
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return "".join(lines) + out, proc.returncode, time.time() - sent


def results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def write_cifar(root: Path, kind: str = "cifar10", per_batch: int = 20, seed: int = 0) -> dict:
    """A small CIFAR tree in torchvision's on-disk format: pickled dicts of uint8 rows (3072 = 3x32x32,
    channel-major) and label lists. Returns the arrays written, for comparison."""
    rng = np.random.default_rng(seed)
    written = {}

    def dump(path: Path, n: int, classes: int):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        entry = {"data": data, ("labels" if kind == "cifar10" else "fine_labels"): labels}
        if kind == "cifar100":
            entry["coarse_labels"] = [lbl // 5 for lbl in labels]
        path.write_bytes(pickle.dumps(entry, protocol=2))
        written[path.name] = (data, labels)

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", per_batch, 10)
        dump(folder / "test_batch", per_batch, 10)
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", per_batch * 5, 100)
        dump(folder / "test", per_batch, 100)
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=2))
    return written


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "JPEG"), **options)
    return buffer.getvalue()


def write_odd_images(folder: Path, rng: np.random.Generator) -> dict[str, Image.Image]:
    """The kinds of file real ImageNet holds besides RGB JPEGs, each from a smooth random picture: a
    greyscale JPEG, a CMYK JPEG, a progressive JPEG and a PNG named ``.JPEG``; returns name -> the PIL
    image as written (before encoding)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = smooth_picture(rng, 52, 70)
    images = {
        "grey.JPEG": (base.convert("L"), {"quality": 90}),
        "cmyk.JPEG": (base.convert("CMYK"), {"quality": 90}),
        "progressive.JPEG": (base, {"quality": 90, "progressive": True}),
        "png_named.JPEG": (base, {"format": "PNG"}),
    }
    for name, (image, options) in images.items():
        (folder / name).write_bytes(jpeg(image, **options))
    return {name: image for name, (image, _) in images.items()}


def smooth_picture(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A picture with smooth structure (upsampled noise) that JPEG compresses as it does photographs."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 6 + 2, width // 6 + 2, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BICUBIC)


def final_checkpoint(run_dir: Path) -> dict:
    from engine import checkpoint as ckpt_io

    return ckpt_io.load(Path(run_dir) / "checkpoints" / "last.pt")


def assert_same_run(a: Path, b: Path) -> None:
    """Everything in the final checkpoint (weights, optimizer, scaler, meters, RNG states, progress but its
    durations) and the metrics equal the uninterrupted run's."""
    assert_equal_tree(final_checkpoint(a), final_checkpoint(b))
    ra, rb = results(a), results(b)
    assert ra["history"] == rb["history"] and ra["top1"] == rb["top1"]


# The only checkpoint entries that may differ between two runs of the same training: durations and the images
# they timed (each process leaves its first steps out), the run's folder and whether it was resumed.
RUN_SPECIFIC = {"train_time", "wall_s", "train_images", "output_dir", "resume"}


def assert_equal_tree(x, y, where="checkpoint"):
    """Nested dicts, lists and tuples of tensors and plain values, equal element for element."""
    import torch

    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            if k not in RUN_SPECIFIC:
                assert_equal_tree(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_equal_tree(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"
