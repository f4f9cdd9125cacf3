"""Real train.py / eval.py processes on synthetic data, Fashion-MNIST, CIFAR pickles and JPEG folders."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbam.errors import RunFolderInUse
from conftest import needs_fmnist
from engine.checkpoint import CheckpointError
from engine.data import DataError, load_cifar
from helpers import ROOT, TINY, results, run, train, train_here, write_cifar

SMOKE = ["experiment=smoke", *TINY]


def events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    train(run_dir, *SMOKE)
    return run_dir


def test_synthetic_run_writes_everything(smoke_run):
    r = results(smoke_run)
    for key in (
        "top1",
        "top5",
        "top1_err",
        "top5_err",
        "best_top1",
        "params",
        "gmacs",
        "epochs",
        "wall_s",
        "train_img_per_s",
    ):
        assert key in r, key
    assert r["epochs"] == 2 and r["status"] == "finished"
    assert r["top1"] + r["top1_err"] == pytest.approx(100) and r["top5"] >= r["top1"]
    assert r["best_top1"] == max(h["val"]["top1"] for h in r["history"])
    assert (smoke_run / "checkpoints" / "last.pt").is_file() and (smoke_run / "checkpoints" / "best.pt").is_file()
    assert (smoke_run / ".hydra" / "config.yaml").is_file()
    assert not list(smoke_run.rglob("*.tmp"))


def test_tensorboard_has_scalars_hparams_images_histograms(smoke_run):
    acc = events(smoke_run)
    tags = acc.Tags()
    for tag in (
        "train/loss",
        "val/top1",
        "val/top1_best",
        "val/top5",
        "val/top1_err",
        "train/lr",
        "train/img_per_s",
        "train/epoch_s",
    ):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("val/top1")] == [1, 2]
    assert acc.Scalars("val/top1")[-1].value == pytest.approx(results(smoke_run)["top1"])
    r = results(smoke_run)
    assert [e.value for e in acc.Scalars("val/top1_best")] == pytest.approx(
        [max(h["val"]["top1"] for h in r["history"][: i + 1]) for i in range(2)]
    )
    # TensorBoard sorts tag groups by name and opens the first two: training's and validation's figures,
    # then the images (the model's size is an hparam, not a constant series)
    groups = sorted({t.split("/")[0] for kind in ("scalars", "images", "histograms") for t in tags[kind]})
    assert groups == ["train", "val", "val_attention"]
    spatial = sorted(t for t in tags["images"] if t.startswith("val_attention/spatial_"))
    assert spatial == [f"val_attention/spatial_{i}_{s}x{s}" for i, s in enumerate((16, 8, 4, 2), start=1)]
    assert {"val_attention/inputs", "val_attention/gradcam_last_stage"} <= set(tags["images"])
    # attention maps in colour over the inputs: the red and blue channels differ
    picture = np.asarray(Image.open(io.BytesIO(acc.Images("val_attention/spatial_1_16x16")[-1].encoded_image_string)))
    assert picture.shape[-1] >= 3 and np.abs(picture[..., 0].astype(int) - picture[..., 2]).mean() > 10
    assert any(t.startswith("val_attention/channel_weights_layer") for t in tags["histograms"])
    # hparams live in the run's own folder (no extra sub-run folder) and add no one-dot hparam/* charts
    assert not [t for t in tags["scalars"] if t.startswith("hparam")]
    assert {p.name for p in smoke_run.iterdir() if p.is_dir()} == {"checkpoints", ".hydra"}


def test_the_documented_tensorboard_link_pins_real_tags_and_colours_runs_by_variant(smoke_run):
    """docs/usage.md's link, read as a browser sends it (a query string's ``+`` is a space): its pinned
    cards are tags that a run writes, and its colour regex finds the variant in a sweep's run names."""
    from urllib.parse import parse_qs, urlsplit

    from engine.config import run_name

    (link,) = re.findall(r"^http://localhost:6006/\S+$", (ROOT / "docs" / "usage.md").read_text(), re.MULTILINE)
    query = parse_qs(urlsplit(link).query)
    pinned = {card["tag"] for card in json.loads(query["pinnedCards"][0])}
    assert pinned == {"val/top1", "val/top1_best"} and pinned <= set(events(smoke_run).Tags()["scalars"])
    kind, _, pattern = query["runColorGroup"][0].partition(":")
    assert kind == "regex"
    for variant in ("cbam", "none"):
        assert re.search(pattern, run_name([f"attention={variant}", "seed=1"], 0))[1] == variant


def test_hparams_show_the_key_fields_first_and_the_run_figures_as_metrics(smoke_run):
    from tensorboard.plugins.hparams import metadata

    plugin = events(smoke_run).PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(plugin[metadata.EXPERIMENT_TAG])
    names = [h.name for h in experiment.hparam_infos]
    # the key fields, then the fields the command line set (SMOKE's, not hydra.run.dir nor experiment=)
    assert names == [
        "experiment",
        "recipe",
        "data",
        "arch",
        "attention",
        "lr",
        "batch_size",
        "epochs",
        "seed",
        "model.width",
        "trainer.log_every",
        "params_M",
        "GMACs",
    ]
    # model.width changes the model's size: the size is shown among what differs
    differs = {h.name for h in experiment.hparam_infos if h.differs}
    assert differs == {"model.width", "trainer.log_every", "params_M", "GMACs"}
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == ["val/top1", "val/top1_best", "val/top5", "train/img_per_s"]  # the last top-1 and the best
    start = metadata.parse_session_start_info_plugin_data(plugin[metadata.SESSION_START_INFO_TAG])
    r = results(smoke_run)
    config = r["config"]
    assert start.hparams["params_M"].number_value == pytest.approx(r["params"] / 1e6)
    assert start.hparams["GMACs"].number_value == pytest.approx(r["gmacs"])
    assert start.hparams["experiment"].string_value == "smoke" and start.hparams["data"].string_value == "synthetic"
    assert start.hparams["recipe"].string_value == "custom"  # smoke sets its own optimizer and schedule
    assert start.hparams["arch"].string_value == config["model"]["arch"] == "resnet18"
    assert start.hparams["lr"].number_value == config["optim"]["lr"]
    assert start.hparams["model.width"].number_value == 0.25
    # integers as text: the HParams tab shows a number as 64.000
    assert start.hparams["batch_size"].string_value == "64" and start.hparams["seed"].string_value == "0"


def test_custom_scalars_draw_training_and_validation_together(smoke_run):
    """The Custom Scalars tab's charts (TensorBoard reads their tags as regular expressions): each one
    draws exactly the named series of this run, train and val in one chart."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = events(smoke_run)
    layout = layout_pb2.Layout.FromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = {c.title: c.multiline.tag for cat in layout.category for c in cat.chart}
    assert list(charts)[:2] == ["top-1 (%)", "loss"]
    scalars = acc.Tags()["scalars"]
    drawn = {
        title: sorted(t for t in scalars if any(re.search(rx, t) for rx in regexes))
        for title, regexes in charts.items()
    }
    assert drawn["top-1 (%)"] == ["train/top1", "val/top1"] and drawn["loss"] == ["train/loss", "val/loss"]
    assert drawn["learning rate"] == ["train/lr"]
    assert all(len(tags) == len(charts[title]) for title, tags in drawn.items()), drawn


def test_eval_reproduces_final_accuracy_exactly(smoke_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run("eval.py", f"checkpoint={smoke_run / 'checkpoints' / 'last.pt'}", f"output={out}")
    ev, r = json.loads(out.read_text()), results(smoke_run)
    assert ev["top1"] == r["top1"] and ev["top5"] == r["top5"] and ev["top1_err"] == r["top1_err"]
    assert ev["params"] == r["params"] and ev["gmacs"] == r["gmacs"] and ev["img_per_s"] > 0
    assert "top-1" in proc.stdout


@pytest.mark.any_torch  # the command line: Hydra's and the script's
def test_eval_writes_nothing_into_the_current_folder(smoke_run, tmp_path):
    """Its log goes to the console; its JSON beside the checkpoint unless output= says otherwise."""
    import subprocess
    import sys

    ckpt = smoke_run / "checkpoints" / "last.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"checkpoint={ckpt}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert (ckpt.parent / "eval_last.json").is_file()


@pytest.mark.any_torch  # the command line: Hydra's and the script's
def test_eval_refuses_bad_arguments_with_its_usage(smoke_run, tmp_path):
    proc = run("eval.py", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text
    assert "no checkpoint given. Usage: python eval.py checkpoint=PATH" in text
    proc = run(
        "eval.py",
        f"checkpoint={smoke_run / 'checkpoints' / 'last.pt'}",
        f"data_root={tmp_path / 'nowhere'}",
        check=False,
    )
    assert proc.returncode == 2 and "is not a folder" in proc.stdout + proc.stderr


@pytest.mark.any_torch  # the command line: Hydra's and the script's
def test_eval_help_lists_only_its_own_options():
    text = run("eval.py", "--help").stdout
    for option in ("checkpoint:", "batch_size:", "data_root:", "output:"):
        assert option in text
    for training_group in ("model:", "attention:", "optim:", "base_", "trainer"):
        assert training_group not in text, text


def test_resume_auto_continues_from_the_next_epoch(tmp_path, caplog):
    train_here(tmp_path, *SMOKE, "trainer.epochs=1")
    first = results(tmp_path)
    caplog.set_level("INFO", logger="cbam")
    train_here(tmp_path, *SMOKE, "trainer.epochs=2", "resume=auto")
    assert "resumed from" in caplog.text and "at epoch 2, batch 0" in caplog.text
    r = results(tmp_path)
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert r["history"][0] == first["history"][0]
    assert r["wall_s"] > first["wall_s"]  # wall time adds up across the two runs


def test_same_run_dir_without_resume_is_refused(smoke_run):
    before = (smoke_run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(RunFolderInUse, match=r"already holds a run .*Fix: pass resume=auto"):
        train_here(smoke_run, *SMOKE)
    assert (smoke_run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
@needs_fmnist
def test_short_real_fashion_mnist_run(tmp_path):
    """The real data set in this process, then eval.py on its checkpoint as a user runs it."""
    r = train_here(
        tmp_path,
        "experiment=quickstart",
        "trainer.epochs=1",
        "trainer.limit_train_batches=40",
        "trainer.batch_size=128",
    )
    assert r["history"][0]["val"]["samples"] == 10000  # the real test set
    assert r["top1"] > 50  # 40 steps of 128 images learn something real
    assert events(tmp_path).Tags()["images"]
    out = tmp_path / "eval.json"
    run("eval.py", f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}", f"output={out}")
    assert json.loads(out.read_text())["top1"] == r["top1"]


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loaders_read_the_pickled_format(tmp_path, kind):
    written = write_cifar(tmp_path, kind)
    train_split, test_split = load_cifar(kind, str(tmp_path), download=False, verify=False)
    first = "data_batch_1" if kind == "cifar10" else "train"
    data, labels = written[first]
    assert train_split.images.shape == (100, 3, 32, 32) and train_split.images.dtype == torch.uint8
    # row layout: 1024 red, then green, then blue values, each row-major 32x32
    assert torch.equal(train_split.images[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train_split.labels[: len(labels)].tolist() == labels
    assert test_split.images.shape[0] == 20


def _publish_checksums(monkeypatch, folder):
    """torchvision's CIFAR-10 sums replaced by those of the files a test wrote, as if they were the real ones."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    md5 = {p.name: calculate_md5(str(p)) for p in folder.iterdir()}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})


def test_cifar_files_are_checked_against_their_checksums(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    _publish_checksums(monkeypatch, folder)
    assert load_cifar("cifar10", str(tmp_path), download=False)[0].images.shape[0] == 100  # intact: read
    batch = folder / "data_batch_3"
    data = bytearray(batch.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    batch.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"data_batch_3 fails its MD5 check .*Fix: delete .*cifar-10-batches-py"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_corrupt_cifar_is_refused_before_training(tmp_path):
    """With torchvision's real checksums, hand-made files are what a corrupt download looks like."""
    write_cifar(tmp_path / "data", "cifar10")
    with pytest.raises(DataError, match=r"data_batch_1 fails its MD5 check.*data\.verify=false"):
        train_here(tmp_path / "run", "data=cifar10", f"data.root={tmp_path / 'data'}", "data.download=false", *TINY)


def test_cifar10_trains_from_pickles(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    train_here(
        tmp_path / "run",
        "data=cifar10",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.verify=false",
        "trainer.epochs=1",
        "trainer.batch_size=25",
        *TINY,
    )
    assert results(tmp_path / "run")["history"][0]["val"]["samples"] == 20


# ---- user errors: one message naming problem and fix, exit 2, no traceback ------------------------
# (in this process where the refusal is the trainer's: train.py's one message and exit code 2 for any of
# them is tests/test_ablation.py's test_a_single_run_keeps_one_message_and_exit_code_2)
def _refused(proc, *phrases):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    for phrase in phrases:
        assert phrase in text, text


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 not found under data\.root=.*Fix:"):
        train_here(tmp_path / "run", "data=cifar10", f"data.root={tmp_path}/nowhere", "data.download=false")


@pytest.mark.any_torch  # the command line: Hydra's and the script's
def test_unknown_group_option(tmp_path):
    _refused(train(tmp_path, "model=resnet51", check=False), "Could not find 'model/resnet51'", "resnet50")


@pytest.mark.any_torch  # the command line: Hydra's and the script's
def test_wrong_value_type(tmp_path):
    _refused(train(tmp_path, "trainer.epochs=ten", check=False), "trainer.epochs", "could not be converted to Integer")


def test_checkpoint_of_another_architecture(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "last.pt"
    with pytest.raises(
        CheckpointError,
        match=r"holds another architecture: .*attention\.spatial=True \(this run: "
        r"False\).*Fix:",
    ):
        train_here(tmp_path, *SMOKE, "attention=se", f"resume={ckpt}")
