"""Data sets and their batches, by ``data.name``.

Two kinds of input, one batch interface (``batches(epoch, start)`` yields normalised images and labels
on the training device; ``len()`` is the batch count; the order is ``BatchPlan``'s):

- sets held in memory (``IN_MEMORY``: CIFAR, Fashion-MNIST, synthetic) live on the device as uint8
  and are augmented there a batch at a time (``engine.data.memory``);
- image sets (``IMAGE_SETS``: ImageNet-style) are read from an image folder (``data.format=folder``)
  or from prepared shards (``data.format=shards``, ``scripts/prepare_data.py``), decoded and cropped in
  persistent worker processes (``engine.data.loader``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DataError
from .folder import FolderSource
from .loader import ImageBatches, ImageLoader, Source
from .memory import IN_MEMORY, TensorBatches, load_cifar, load_fashion_mnist, random_crop_flip, synthetic
from .normalize import Normalize
from .order import BatchPlan, epoch_order, generator
from .randaugment import BatchRandAugment
from .shards import ShardSource

__all__ = [
    "BatchPlan",
    "DataError",
    "IMAGE_SETS",
    "IN_MEMORY",
    "DATASETS",
    "FORMATS",
    "build_batches",
    "epoch_order",
    "eval_geometry",
    "generator",
    "image_sources",
    "load_cifar",
    "load_fashion_mnist",
    "random_crop_flip",
    "synthetic",
    "TensorBatches",
]

IMAGE_SETS = ("imagenet",)  # read from files: data.format picks an image folder or prepared shards
DATASETS = (*IN_MEMORY, *IMAGE_SETS)  # the schema's choices of data.name (engine/config.py)
FORMATS = {"folder": FolderSource, "shards": ShardSource}
DECODE_CHOICES = ("auto", "cpu", "device")
# data.decode=auto: the device types where decoding there (nvJPEG) measured faster than the CPU workers
# (scripts/bench_data.py --decode-device; docs/performance.md). None yet: the CPU workers everywhere.
AUTO_DECODE_ON_DEVICE: frozenset[str] = frozenset()


def decodes_on_device(cfg, device: torch.device) -> bool:
    """Whether ``data.decode`` puts JPEG decoding on ``device`` rather than in the CPU workers."""
    choice = cfg.decode
    return choice == "device" or (choice == "auto" and device.type in AUTO_DECODE_ON_DEVICE)


def eval_geometry(cfg) -> tuple[int, int]:
    """(resize, size) of an image set's evaluation crop: the short side resized to ``data.resize_size``
    (0: 8/7 of the size, 256 for 224), then the centre ``data.eval_size`` square (0: ``data.image_size``)."""
    size = cfg.eval_size or cfg.image_size
    return cfg.resize_size or round(size * 8 / 7), size


def image_sources(cfg, splits=("train", "val")) -> dict[str, Source]:
    """The splits of an image set (``data.root``/train, /val) in ``data.format``, checked to agree with
    each other and with ``data.num_classes``."""
    root, fmt = Path(cfg.root), cfg.format
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        what = "prepared shards (scripts/prepare_data.py)" if fmt == "shards" else "train/<class>/*.JPEG and val/..."
        raise DataError(
            f"data.root={str(root)!r} lacks {' and '.join(s + '/' for s in missing)} (data.format={fmt}). Fix: point "
            f"data.root at a folder holding {what}."
        )
    sources = {split: FORMATS[fmt](root / split) for split in splits}
    first, *others = sources.values()
    if any(s.classes != first.classes for s in others):
        raise DataError(f"train/ and val/ under {root} have different classes; they must hold the same classes")
    if len(first.classes) != cfg.num_classes:
        raise DataError(
            f"{root} has {len(first.classes)} classes but data.num_classes={cfg.num_classes}. "
            f"Fix: pass data.num_classes={len(first.classes)}."
        )
    return sources


def build_batches(
    cfg,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    train: bool = True,
):
    """(train, val) batches of data config ``cfg`` (an ``engine.config.DataConfig``) on ``device``, images
    in ``dtype``; with ``train=False`` the training split is not opened and comes back as None."""
    device = torch.device(device)
    dist = dict(rank=rank, world_size=world_size)
    if cfg.name in IMAGE_SETS:
        resize, eval_size = eval_geometry(cfg)
        splits = ("train", "val") if train else ("val",)
        normalize = Normalize(cfg.mean, cfg.std, device, dtype)
        on_device = decodes_on_device(cfg, device)
        loader = ImageLoader(image_sources(cfg, splits), seed, resize, cfg.workers, normalize, on_device)
        progressive = (cfg.progressive_from, tuple(cfg.progressive_epochs))
        val = ImageBatches(loader, "val", eval_batch_size, seed, eval_size, **dist)
        if not train:
            return None, val
        randaugment = BatchRandAugment(cfg.randaugment, cfg.mean, cfg.image_size, seed) if cfg.randaugment else None
        train_batches = ImageBatches(
            loader, "train", batch_size, seed, cfg.image_size, progressive, **dist, randaugment=randaugment
        )
        return train_batches, val
    if cfg.name not in IN_MEMORY:
        raise DataError(f"unknown data set {cfg.name!r}; known: {', '.join(DATASETS)}")
    train_split, val_split = IN_MEMORY[cfg.name](cfg)
    if train_split.images.shape[1] != cfg.in_chans:
        raise DataError(
            f"{cfg.name} images have {train_split.images.shape[1]} channels but data.in_chans={cfg.in_chans}"
        )
    common = dict(mean=cfg.mean, std=cfg.std, seed=seed, device=device, dtype=dtype, **dist)
    val = TensorBatches(val_split.images, val_split.labels, eval_batch_size, train=False, **common)
    if not train:
        return None, val
    augmented = dict(augment=cfg.augment, crop_padding=cfg.crop_padding, randaugment=cfg.randaugment)
    return TensorBatches(train_split.images, train_split.labels, batch_size, train=True, **augmented, **common), val
