"""The image-set input: decoding every kind of file against PIL, the paper's crops, prepared shards, the
sample order under resume and DDP, and both formats through the trainer."""

import io
import json
import math
import os
import random
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchvision import transforms
from torchvision.transforms import RandomResizedCrop

from engine.config import DataConfig
from engine.data import build_batches, eval_geometry
from engine.data.decode import decode_rgb
from engine.data.errors import DataError
from engine.data.folder import FolderSource
from engine.data.geometry import center_crop, random_resized_crop, resized_crop, train_resolution
from engine.data.prepare import Options, prepare, prepare_split
from engine.data.shards import ShardSource, verify
from helpers import (
    ROOT,
    TINY,
    assert_same_run,
    final_checkpoint,
    jpeg,
    load_script,
    run,
    sigterm_after_output,
    smooth_picture,
    train_here,
    write_odd_images,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
prepare_data = load_script("prepare_data")


def pil_rgb(path_or_bytes) -> torch.Tensor:
    """PIL's decode, ``convert("RGB")``, as (3, H, W) uint8."""
    with Image.open(path_or_bytes) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    return 10 * math.log10(255**2 / (image.float() - reference.float()).square().mean().item())


def write_tree(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3, odd: bool = False):
    """train/ and val/ of smooth pictures of varied sizes (some larger than 64 px), one folder per class;
    with ``odd``, the first class of train/ also holds a greyscale, a CMYK, a progressive JPEG and a PNG."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
                (folder / f"img_{i}.JPEG").write_bytes(jpeg(smooth_picture(rng, h, w), quality=90))
    if odd:
        write_odd_images(root / "train" / "n00000000", rng)


def image_config(root: Path, fmt: str = "folder", **extra) -> DataConfig:
    options = dict(name="imagenet", root=str(root), format=fmt, num_classes=3, in_chans=3, image_size=32)
    options.update(eval_size=0, resize_size=36, mean=MEAN, std=STD, workers=0)
    return DataConfig(**{**options, **extra})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    write_tree(root, odd=True)
    return root


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards")
    prepare(tree, dst, Options(max_side=64, quality=90, shard_size=7), workers=2, progress=False)
    return dst


# ---- decoding ------------------------------------------------------------------------------------------
def test_every_kind_of_imagenet_file_decodes_as_pil_converts_it(tmp_path):
    written = write_odd_images(tmp_path, np.random.default_rng(1))
    assert set(written) == {"grey.JPEG", "cmyk.JPEG", "progressive.JPEG", "png_named.JPEG"}
    for name in written:
        ours = decode_rgb((tmp_path / name).read_bytes(), name)
        theirs = pil_rgb(tmp_path / name)
        assert ours.shape == theirs.shape and ours.dtype == torch.uint8
        # same libjpeg-turbo (or libpng) in both: equal up to the decoders' rounding
        assert (ours.int() - theirs.int()).abs().max() <= 1, name
    assert torch.equal(
        decode_rgb((tmp_path / "png_named.JPEG").read_bytes(), "p"), pil_rgb(tmp_path / "png_named.JPEG")
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_undecodable_file_names_itself_and_the_fix(tmp_path, damage):
    good = jpeg(smooth_picture(np.random.default_rng(2), 60, 80), quality=90)
    data = {"truncated": good[: len(good) // 2], "garbage": os.urandom(500), "empty": b""}[damage]
    with pytest.raises(DataError, match=r"broken\.JPEG cannot be decoded .*Fix: replace it"):
        decode_rgb(data, "/data/train/n1/broken.JPEG")


# ---- the paper's crops ---------------------------------------------------------------------------------
def test_training_crop_equals_pil_on_the_same_box():
    """The fast path (uint8 tensors, antialiased bilinear) against PIL's resize of the same box, as
    torchvision's v1 RandomResizedCrop runs it on a PIL image."""
    data = jpeg(smooth_picture(np.random.default_rng(3), 375, 500), quality=90)
    image = decode_rgb(data, "x")
    rng = random.Random(0)
    for _ in range(20):
        box, _ = random_resized_crop(375, 500, rng)
        top, left, h, w = box
        ours = resized_crop(image, box, 224).permute(2, 0, 1)
        with Image.open(io.BytesIO(data)) as pil:
            theirs = transforms.functional.resized_crop(pil.convert("RGB"), top, left, h, w, [224, 224])
        diff = (ours.int() - torch.from_numpy(np.asarray(theirs).copy()).permute(2, 0, 1).int()).abs()
        assert diff.float().mean() < 0.6 and diff.max() <= 3, (box, diff.float().mean(), diff.max())


def test_evaluation_crop_equals_torchvision_resize_and_centre_crop():
    data = jpeg(smooth_picture(np.random.default_rng(4), 375, 500), quality=90)
    ours = center_crop(decode_rgb(data, "x"), 256, 224).permute(2, 0, 1)
    with Image.open(io.BytesIO(data)) as pil:
        theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(pil.convert("RGB"))
    diff = (ours.int() - torch.from_numpy(np.asarray(theirs).copy()).permute(2, 0, 1).int()).abs()
    assert ours.shape == (3, 224, 224) and diff.float().mean() < 0.6 and diff.max() <= 3


def test_crop_boxes_follow_torchvisions_distribution():
    """The per-sample sampler runs torchvision's RandomResizedCrop.get_params algorithm: the same
    distribution of box sizes and positions (4000 draws each, quantiles within sampling noise)."""
    height, width, n = 300, 500, 4000
    rng = random.Random(0)
    ours = np.array([random_resized_crop(height, width, rng)[0] for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    shape = torch.empty(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(shape, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)
    for column in range(4):  # top, left, height, width
        q_ours, q_theirs = (
            np.quantile(ours[:, column], [0.1, 0.5, 0.9]),
            np.quantile(theirs[:, column], [0.1, 0.5, 0.9]),
        )
        assert np.allclose(q_ours, q_theirs, atol=0.04 * max(height, width)), (column, q_ours, q_theirs)
    assert ((ours[:, 2] * ours[:, 3]) / (height * width)).min() >= 0.079
    flips = [random_resized_crop(height, width, rng)[1] for _ in range(n)]
    assert abs(np.mean(flips) - 0.5) < 0.03


def test_a_crop_that_cannot_fit_falls_back_to_the_centre_as_torchvision():
    for height, width in ((100, 1000), (1000, 100), (100, 110)):  # 4x the image's area never fits: the fallback
        box, _ = random_resized_crop(height, width, random.Random(0), scale=(4.0, 4.0))
        torch.manual_seed(0)
        expected = RandomResizedCrop.get_params(torch.empty(1, height, width), [4.0, 4.0], [3 / 4, 4 / 3])
        assert box == expected


def test_progressive_resolution_is_ffcvs():
    """FFCV's ResNet-50 configs: 160 up to start_ramp, 192 from end_ramp, multiples of 32 between."""
    for epochs, ramp in ((16, (11, 13)), (88, (65, 76))):
        sizes = [train_resolution(e, 192, 160, ramp) for e in range(epochs)]
        assert sizes[: ramp[0] + 1] == [160] * (ramp[0] + 1) and sizes[ramp[1] :] == [192] * (epochs - ramp[1])
        assert all(s in (160, 192) for s in sizes)
        expected = [
            160 if e <= ramp[0] else 192 if e >= ramp[1] else int(np.round(np.interp(e, ramp, [160, 192]) / 32)) * 32
            for e in range(epochs)
        ]
        assert sizes == expected
    assert [train_resolution(e, 224) for e in range(3)] == [224] * 3


# ---- prepared shards -----------------------------------------------------------------------------------
def test_shards_round_trip_every_image_and_label(tree, shards):
    for split in ("train", "val"):
        folder, prepared = FolderSource(tree / split), ShardSource(shards / split)
        assert len(prepared) == len(folder) and prepared.classes == folder.classes
        assert np.array_equal(prepared.labels, folder.labels)
        for i in range(len(folder)):
            original = Path(folder.paths[i]).read_bytes()
            stored = prepared.read(i)
            assert prepared.name(i).endswith(os.path.relpath(folder.paths[i], tree / split))
            source = decode_rgb(original, folder.paths[i])
            if max(source.shape[-2:]) <= 64 and Path(folder.paths[i]).name not in ("cmyk.JPEG", "png_named.JPEG"):
                assert stored == original  # small RGB or greyscale JPEGs are kept byte for byte
                continue
            pixels = decode_rgb(stored, prepared.name(i))
            assert max(pixels.shape[-2:]) == min(64, max(source.shape[-2:]))
            scale = pixels.shape[-1] / source.shape[-1]
            assert abs(pixels.shape[-2] - source.shape[-2] * scale) <= 1  # aspect ratio kept
            shrunk = torch.nn.functional.interpolate(
                source[None].float(), size=pixels.shape[-2:], mode="bilinear", antialias=True
            )[0]
            # as close to the shrunk original as PIL's own JPEG of quality 90 of it is
            reference = pil_rgb(
                io.BytesIO(jpeg(Image.fromarray(shrunk.round().byte().permute(1, 2, 0).numpy()), quality=90))
            )
            assert psnr(pixels, shrunk) > psnr(reference, shrunk) - 1
    meta = json.loads((shards / "train" / "meta.json").read_text())
    assert meta["options"] == {"max_side": 64, "quality": 90, "shard_size": 7}
    assert len(meta["shards"]) == math.ceil(len(FolderSource(tree / "train")) / 7)
    assert verify(shards / "train") == [] and verify(shards / "val") == []


def test_shards_are_plain_tar_files_in_webdatasets_layout(shards):
    index = np.load(shards / "train" / "index.npy")
    with tarfile.open(shards / "train" / "shard-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["00000007.jpg", "00000007.cls"]
        jpgs = [m for m in members if m.name.endswith(".jpg")]
        for member, record in zip(jpgs, index[index["shard"] == 1], strict=True):
            assert (member.offset_data, member.size) == (record["offset"], record["size"])
            assert int(tar.extractfile(member.name[:-4] + ".cls").read()) == record["label"]


def _copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(shards, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_refused_with_its_name_and_the_fix(shards, tmp_path, damage):
    dst = _copy(shards, tmp_path)
    shard = dst / "train" / "shard-000002.tar"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        DataError,
        match=rf"shard .*shard-000002\.tar is {damage}.*Fix: delete it and run python "
        r"scripts/prepare_data.py SRC DST again",
    ):
        ShardSource(dst / "train")


def test_a_corrupt_shard_is_refused_when_read_and_by_verify(shards, tmp_path, capsys):
    dst = _copy(shards, tmp_path)
    shard = dst / "train" / "shard-000001.tar"
    record = np.load(dst / "train" / "index.npy")[7]  # the shard's first image
    data = bytearray(shard.read_bytes())
    data[record["offset"] + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    source = ShardSource(dst / "train")  # same size: opens
    with pytest.raises(DataError, match=r"shard-000001\.tar:n00000000/.* fails its CRC-32 check.*Fix: delete it"):
        source.read(7)
    assert verify(dst / "train") == [f"{shard}: SHA-256 differs from meta.json (corrupt)"]
    assert prepare_data.main(["--verify", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: SHA-256 differs" in out and "Fix: delete" in out


def test_an_interrupted_conversion_resumes_and_rewrites_only_what_is_missing(tree, tmp_path, monkeypatch):
    from engine.data import prepare as prepare_module

    written = []
    real_finish = prepare_module._ShardWriter.finish

    def finish_then_interrupt(self):
        real_finish(self)
        written.append(self.number)
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two shards

    monkeypatch.setattr(prepare_module._ShardWriter, "finish", finish_then_interrupt)
    options = Options(max_side=64, shard_size=7)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(tree / "train", tmp_path / "train", options, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list((tmp_path / "train").glob(".*.tmp")) and not (tmp_path / "train" / "meta.json").exists()
    monkeypatch.setattr(prepare_module._ShardWriter, "finish", real_finish)
    first = (tmp_path / "train" / "shard-000000.tar").stat().st_mtime_ns
    meta = prepare_split(tree / "train", tmp_path / "train", options, workers=1, progress=False)
    assert (tmp_path / "train" / "shard-000000.tar").stat().st_mtime_ns == first  # kept, not rewritten
    assert meta["samples"] == len(FolderSource(tree / "train")) and verify(tmp_path / "train") == []
    # a shard deleted later is written again, the same bytes
    lost = tmp_path / "train" / "shard-000003.tar"
    before = lost.read_bytes()
    lost.unlink()
    prepare_split(tree / "train", tmp_path / "train", options, workers=1, progress=False)
    assert lost.read_bytes() == before
    with pytest.raises(DataError, match="holds a conversion of other files or with other options"):
        prepare_split(tree / "train", tmp_path / "train", Options(max_side=48, shard_size=7), progress=False)


def test_an_undecodable_source_file_stops_the_conversion_unless_skipped(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    bad = src / "train" / "n00000001" / "img_3.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    assert prepare_data.main([str(src), str(tmp_path / "dst"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} cannot be decoded" in err and "--skip-bad" in err and "Traceback" not in err
    assert prepare_data.main([str(src), str(tmp_path / "dst"), "--quiet", "--skip-bad"]) == 0
    meta = json.loads((tmp_path / "dst" / "train" / "meta.json").read_text())
    assert meta["skipped"] == [str(bad)] and meta["samples"] == len(FolderSource(src / "train")) - 1


# ---- order: resume and DDP -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_a_resumed_epoch_sees_the_same_remaining_images(tree, shards, fmt):
    """With worker processes: batches 2.. of an epoch started at batch 2 equal those of the whole epoch,
    pixel for pixel (each crop is a function of seed, epoch and image)."""
    root = tree if fmt == "folder" else shards
    train, _ = build_batches(image_config(root, fmt, workers=2), 4, 4, seed=5, device="cpu")
    try:
        whole, resumed = list(train.batches(epoch=1)), list(train.batches(epoch=1, start=2))
        other_epoch = list(train.batches(epoch=2))
    finally:
        train.close()
    assert len(whole) == len(resumed) + 2 == len(FolderSource(tree / "train")) // 4
    for (x, y), (xr, yr) in zip(whole[2:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert not torch.equal(whole[0][0], other_epoch[0][0])


def _rank_batches(rank: int, roots: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from engine.data import build_batches as build

    mine = {}
    for fmt, root in roots.items():
        train, _ = build(
            image_config(Path(root), fmt, workers=0),
            2,
            2,
            seed=5,
            device="cpu",
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        mine[fmt] = list(train.batches(epoch=3))
        train.close()
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_two_ddp_ranks_see_disjoint_images_that_cover_the_epoch(tree, shards, tmp_path):
    """Two gloo processes, each its share of a global batch of 4: side by side they are the one-process
    batches, image for image; no image twice, every full batch's images once. Both formats."""
    roots = {"folder": str(tree), "shards": str(shards)}
    os.environ["TEST_PORT"] = str(29500 + os.getpid() % 1000)
    mp.spawn(_rank_batches, args=(roots, str(tmp_path / "ranks.pt")), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "ranks.pt", weights_only=True)
    for fmt, root in roots.items():
        single, _ = build_batches(image_config(Path(root), fmt), 4, 4, seed=5, device="cpu")
        expected = list(single.batches(epoch=3))
        assert len(rank0[fmt]) == len(rank1[fmt]) == len(expected)
        for (x0, y0), (x1, y1), (x, y) in zip(rank0[fmt], rank1[fmt], expected, strict=True):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        seen = [i for batch in single.rank_batches(3) for i in batch]
        assert len(seen) == len(set(seen)) == len(single) * 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_decoding_on_the_device_gives_the_batches_of_the_workers(tree, device):
    """data.decode=device: the workers send RGB JPEGs encoded and the device decodes (nvJPEG on CUDA) and
    crops them; the odd files are decoded by the workers all the same. On the CPU the same decoder runs
    in both places, so the batches are equal; nvJPEG's IDCT and float resampling differ by a few levels."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    batches = {}
    for decode in ("cpu", "device"):
        train, val = build_batches(image_config(tree, decode=decode, workers=1), 4, 4, seed=5, device=device)
        batches[decode] = list(train.batches(epoch=1)) + list(val.batches())
        train.close()
    for (x, y), (xd, yd) in zip(batches["cpu"], batches["device"], strict=True):
        assert torch.equal(y, yd)
        if device == "cpu":
            assert torch.equal(x, xd)
        else:
            assert (x - xd).abs().mean() < 0.05  # normalised units: about 3 levels of 255


# ---- through the trainer and eval.py -------------------------------------------------------------------
IMAGENET = [
    "data=imagenet",
    "data.num_classes=3",
    "data.image_size=32",
    "data.resize_size=36",
    "data.workers=2",
    "trainer.batch_size=6",
    "trainer.epochs=2",
    "trainer.image_every=1",
    *TINY,
]


@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_trains_and_evaluates_from_both_formats(tree, shards, tmp_path, fmt):
    root = tree if fmt == "folder" else shards
    r = train_here(tmp_path / "run", *IMAGENET, f"data.root={root}", f"data.format={fmt}")
    samples = len(FolderSource(tree / "train"))
    assert r["steps"] == 2 * (samples // 6) and r["history"][-1]["val"]["samples"] == 9
    # eval.py rebuilds the validation input from the checkpoint's config: the same numbers
    out = tmp_path / "eval.json"
    run("eval.py", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", f"output={out}")
    ev = json.loads(out.read_text())
    assert (ev["top1"], ev["top5"], ev["images"]) == (r["top1"], r["top5"], 9)
    assert ev["loss"] == pytest.approx(r["val_loss"], rel=1e-6)


def test_progressive_training_changes_the_crop_and_evaluates_at_its_own_size(shards, tmp_path, monkeypatch):
    from engine import trainer as trainer_module

    seen = []
    real_step = trainer_module.Trainer.train_step

    def recording_step(self, x, y):
        seen.append((self.epoch, x.shape[-1]))
        return real_step(self, x, y)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", recording_step)
    overrides = [
        *IMAGENET,
        f"data.root={shards}",
        "data.format=shards",
        "trainer.epochs=3",
        "data.image_size=64",
        "data.progressive_from=32",
        "data.progressive_epochs=[0,2]",
        "data.eval_size=48",
    ]
    r = train_here(tmp_path / "run", *overrides)
    assert sorted({(e, s) for e, s in seen}) == [(0, 32), (1, 64), (2, 64)]  # 48 rounds to 64 (multiples of 32)
    assert r["epochs"] == 3
    assert eval_geometry(DataConfig(name="imagenet", num_classes=1, image_size=64, eval_size=48)) == (55, 48)


def test_scripts_make_image_folder_writes_imagenet_like_jpegs(tmp_path):
    run(
        "scripts/make_image_folder.py",
        str(tmp_path),
        "--classes",
        "2",
        "--train-per-class",
        "5",
        "--val-per-class",
        "1",
    )
    files = sorted(tmp_path.rglob("*.JPEG"))
    assert len(files) == 12
    sizes = []
    for f in files:
        with Image.open(f) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            w, h = image.size
        sizes.append(f.stat().st_size / (w * h) * 500 * 375 / 1e3)  # kB at 500x375
    assert 40 < np.mean(sizes) < 110  # photo-like: ImageNet's JPEGs average about 70 kB at this size


def test_sigterm_to_the_run_and_its_workers_checkpoints_and_resumes_bit_identically(tree, tmp_path):
    """SIGTERM to train.py and its worker processes at once, mid-epoch, as SLURM signals a job's processes
    at preemption: the workers ignore it, the run stops at a step's end with exit 0 and a checkpoint, and
    resume=auto ends where an uninterrupted run ends, bit for bit."""
    common = [*IMAGENET, f"data.root={tree}", "trainer.batch_size=2", "trainer.log_every=1", "trainer.image_every=0"]
    train_here(tmp_path / "uninterrupted", *common)
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *common]
    steps = len(FolderSource(tree / "train")) // 2
    out, rc, elapsed = sigterm_after_output(cmd, f"epoch 1/2 step 2/{steps}", group=True)
    assert rc == 0 and elapsed < 10, f"exit {rc} after {elapsed:.1f} s:\n{out}"
    assert "stopped at epoch 1" in out and "Traceback" not in out
    assert final_checkpoint(tmp_path / "run")["progress"]["next_batch"] < steps
    train_here(tmp_path / "run", *common, "resume=auto")
    assert_same_run(tmp_path / "uninterrupted", tmp_path / "run")
