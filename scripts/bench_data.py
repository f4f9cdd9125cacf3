#!/usr/bin/env python
"""Images/s of the training input, per core and with worker processes, against the classic pipeline.

    python scripts/bench_data.py ROOT [--json FILE] [--workers 4] [--size 224] [--low-res 160]

ROOT is an ImageFolder tree with ``train/<class>/*.JPEG`` (``scripts/make_image_folder.py`` writes an
ImageNet-like one). In one process, on the same images, in interleaved rounds (the median of each is
reported, and the ratios of each round's figures):

- ``classic``: torchvision's ImageFolder pipeline as most training scripts build it: PIL decode,
  ``RandomResizedCrop`` + flip (v1 transforms), ``ToTensor`` + ``Normalize`` in float32, collated;
- ``folder``: what a worker process of ``train.py data=imagenet`` does per batch (the objects that
  ``engine.data.build_batches`` builds): read, decode with libjpeg-turbo, crop on uint8, collate;
- ``shards``: the same from shards that this script first prepares from ROOT in a temporary folder
  (``scripts/prepare_data.py``, longest side ``--max-side``), at ``--size`` and at ``--low-res``.

Per core: one thread, in this process. Then the whole input as ``train.py`` runs it, ``--workers``
worker processes feeding the training device (normalisation there included), for both formats, and
with ``--decode-on-device`` also with the JPEGs decoded on the device (``data.decode=device``: nvJPEG on
CUDA), which decides ``data.decode=auto``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms

from engine.data.folder import FolderSource
from engine.data.loader import ImageBatches, ImageLoader
from engine.data.normalize import Normalize
from engine.data.prepare import Options, prepare_split
from engine.data.shards import ShardSource

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def classic_batches(source: FolderSource, batches: list[list[int]], size: int) -> int:
    """Today's common ImageNet input over the same batches of images: PIL, v1 transforms, float32
    tensors, collated; returns the number of images."""
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    count = 0
    for indices in batches:
        items = []
        for i in indices:
            with open(source.paths[i], "rb") as f:
                items.append((tf(Image.open(f).convert("RGB")), int(source.labels[i])))
        default_collate(items)
        count += len(indices)
    return count


def train_batches(source, size: int, batch: int, workers: int, device: str, on_device: bool = False) -> ImageBatches:
    """The training batches that ``engine.data.build_batches`` builds for an image set, over ``source``
    (``on_device``: JPEGs decoded on the device, ``data.decode=device``)."""
    normalize = Normalize(MEAN, STD, torch.device(device))
    loader = ImageLoader({"train": source}, 0, round(size * 8 / 7), workers, normalize, on_device)
    return ImageBatches(loader, "train", batch, 0, size)


def worker_work(batches: ImageBatches, epoch: int) -> int:
    """What train.py's worker processes do for one epoch's batches (read, decode, crop, collate), done
    here in the calling thread; returns the number of images."""
    dataset, collate = batches.loader.loader.dataset, batches.loader.loader.collate_fn
    size, count = batches.size_at(epoch), 0
    for indices in batches.rank_batches(epoch):
        collate([dataset[("train", i, epoch, size)] for i in indices])
        count += len(indices)
    return count


def whole_input(batches: ImageBatches) -> float:
    """Images/s of the input with its worker processes, onto its device: one warm-up epoch (the
    workers start), then one timed epoch."""
    for _ in batches.batches(0):
        pass
    tic, count = time.perf_counter(), 0
    for x, _ in batches.batches(1):
        count += x.shape[0]
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    batches.close()
    return count / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="ImageFolder tree with train/<class>/*.JPEG")
    parser.add_argument("--size", type=int, default=224, help="training crop")
    parser.add_argument("--low-res", type=int, default=160, help="also the shards at this crop (FFCV's start)")
    parser.add_argument("--max-side", type=int, default=256, help="longest side of the prepared shards' images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--decode-on-device", action="store_true", help="the whole input also with JPEGs decoded on --device"
    )
    args = parser.parse_args(argv)

    folder = FolderSource(args.root / "train")
    n = len(folder) // args.batch * args.batch
    if n == 0:
        parser.error(f"{args.root / 'train'} holds {len(folder)} images, fewer than one batch of {args.batch}")
    mean_kb = sum(os.path.getsize(p) for p in folder.paths) / len(folder) / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        meta = prepare_split(args.root / "train", Path(tmp) / "train", Options(max_side=args.max_side), progress=False)
        prepare_s = time.perf_counter() - tic
        shards = ShardSource(Path(tmp) / "train")
        shard_kb = sum(s["bytes"] for s in meta["shards"]) / meta["samples"] / 1e3
        pipelines = {
            "folder": train_batches(folder, args.size, args.batch, 0, "cpu"),
            "shards": train_batches(shards, args.size, args.batch, 0, "cpu"),
            "shards_low_res": train_batches(shards, args.low_res, args.batch, 0, "cpu"),
        }
        torch.set_num_threads(1)
        timings: dict[str, list[float]] = {name: [] for name in ("classic", *pipelines)}
        for r in range(args.rounds):
            tic = time.perf_counter()
            done = classic_batches(folder, list(pipelines["folder"].rank_batches(r)), args.size)
            timings["classic"].append(done / (time.perf_counter() - tic))
            for name, batches in pipelines.items():
                tic = time.perf_counter()
                done = worker_work(batches, epoch=r)
                timings[name].append(done / (time.perf_counter() - tic))
        torch.set_num_threads(os.cpu_count() or 1)
        places = (False, True) if args.decode_on_device else (False,)
        whole = {
            name + ("_decoded_on_device" if on_device else ""): whole_input(
                train_batches(source, args.size, args.batch, args.workers, args.device, on_device)
            )
            for name, source in (("folder", folder), ("shards", shards))
            for on_device in places
        }

    classic = statistics.median(timings["classic"])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "images": n,
        "mean_kb": round(mean_kb, 1),
        "shard_mean_kb": round(shard_kb, 1),
        "size": args.size,
        "low_res": args.low_res,
        "max_side": args.max_side,
        "rounds": args.rounds,
        "prepare_s": round(prepare_s, 2),
    }
    for name in pipelines:
        ours = statistics.median(timings[name])
        per_round = [o / c for o, c in zip(timings[name], timings["classic"], strict=True)]
        report[name] = {
            "project_img_s_per_core": round(ours, 1),
            "classic_img_s_per_core": round(classic, 1),
            "ratio": round(ours / classic, 3),
            "ratio_per_round": [round(x, 3) for x in per_round],
        }
    report["workers"] = {
        "n": args.workers,
        "device": args.device,
        **{f"{name}_img_s": round(v, 1) for name, v in whole.items()},
    }

    print(
        f"{n} images from {args.root}/train (mean {mean_kb:.0f} kB); shards: longest side {args.max_side}, "
        f"mean {shard_kb:.1f} kB, prepared in {prepare_s:.1f} s; torch {torch.__version__}, {report['machine']}"
    )
    print(f"per core (one thread, median of {args.rounds} interleaved rounds), crop {args.size} unless noted:")
    print(f"  classic (PIL, v1 transforms, float32):  {classic:7.0f} img/s  1.00x")
    labels_ = {
        "folder": "folder (this project)",
        "shards": "shards (this project)",
        "shards_low_res": f"shards, crop {args.low_res}",
    }
    for name in pipelines:
        r = report[name]
        print(
            f"  {labels_[name] + ':':39s} {r['project_img_s_per_core']:7.0f} img/s  {r['ratio']:.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in r['ratio_per_round'])})"
        )
    print(
        f"whole input, {args.workers} worker processes onto {args.device}: "
        + ", ".join(f"{name} {v:.0f} img/s" for name, v in whole.items())
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
