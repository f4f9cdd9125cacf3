"""Batches of an image set read from files (an image folder or prepared shards).

Worker processes read each image's bytes, decode them (libjpeg-turbo) and crop them as the paper does
(``engine.data.geometry``), and send uint8 batches (N, H, W, 3) through pinned memory; the training
device receives them asynchronously and normalises them there, into channels-last float (or the
autocast dtype). With ``data.decode=device`` the workers send RGB JPEGs still encoded, with their crop
boxes, and the device decodes them (nvJPEG on CUDA) and crops them there.

The workers are started once and serve every epoch and both splits: a pass is a list of batches of
sample keys (split, index, epoch, size), so that the crops are functions of (seed, epoch, index) and a
resumed epoch sees the same images, cropped the same way.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import decode_jpegs_on, decode_rgb, rgb_jpeg_size
from .errors import DataError
from .geometry import Box, center_crop, random_resized_crop, resized_crop, train_resolution
from .normalize import Normalize
from .order import BatchPlan
from .randaugment import BatchRandAugment

Key = tuple[str, int, int, int]  # split ("train" | "val"), sample index, epoch, output size


class Source(Protocol):
    """Where encoded images come from: ``FolderSource`` or ``ShardSource``."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...
    def read(self, index: int) -> bytes: ...
    def name(self, index: int) -> str: ...


class Sample(NamedTuple):
    """One image as a worker sends it: its crop as (size, size, 3) uint8 pixels, or (decoding on the
    device) its JPEG bytes as a 1-D uint8 tensor with the training crop's box (None: the evaluation
    crop); its label; whether to flip it (left to the device, where a batch's flips take one pass; here a
    flip of HWC pixels costs a third of the resize)."""

    payload: torch.Tensor
    label: int
    flip: bool
    box: Box | None = None


class DecodedImages(Dataset):
    """A sample key -> its ``Sample``; the ``DataError`` that an unreadable image raises is returned
    instead, so that the main process raises it whole. ``on_device``: RGB JPEGs are sent encoded, to be
    decoded on the training device (``decode_on_device``); other files are decoded here all the same."""

    def __init__(self, sources: dict[str, Source], seed: int, eval_resize: int, on_device: bool = False):
        self.sources, self.seed, self.eval_resize, self.on_device = sources, seed, eval_resize, on_device

    def __getitem__(self, key: Key) -> Sample | DataError:
        split, index, epoch, size = key
        source, label = self.sources[split], int(self.sources[split].labels[index])
        try:
            data = source.read(index)
            shape = rgb_jpeg_size(data) if self.on_device else None
            image = decode_rgb(data, source.name(index)) if shape is None else None
        except DataError as exc:
            return exc
        shape = shape or tuple(image.shape[-2:])
        if split == "train":
            box, flip = random_resized_crop(*shape, random.Random(f"{self.seed}/{epoch}/{index}"))
            if image is None:
                return Sample(torch.frombuffer(bytearray(data), dtype=torch.uint8), label, flip, box)
            return Sample(resized_crop(image, box, size), label, flip)
        if image is None:
            return Sample(torch.frombuffer(bytearray(data), dtype=torch.uint8), label, False)
        return Sample(center_crop(image, self.eval_resize, size), label, False)


def collate(samples: list[Sample | DataError]) -> Sample | DataError:
    """A batch as one ``Sample`` of (N, H, W, 3) uint8 pixels, (N,) labels and (N,) flips, or, where
    some images are still encoded, of lists (payloads and boxes); the first ``DataError`` if a sample is
    one."""
    for sample in samples:
        if isinstance(sample, DataError):
            return sample
    payloads, labels, flips, boxes = zip(*samples, strict=True)
    labels, flips = torch.tensor(labels), torch.tensor(flips)
    if all(p.dim() == 3 for p in payloads):
        return Sample(torch.stack(payloads), labels, flips)
    return Sample(list(payloads), labels, flips, list(boxes))


def decode_on_device(batch: Sample, size: int, eval_resize: int, device: torch.device) -> torch.Tensor:
    """(N, size, size, 3) uint8 crops on ``device`` of a batch whose images are partly still encoded:
    those decoded there in one call (``decode_jpegs_on``), then cropped one by one as the workers crop."""
    encoded = [i for i, p in enumerate(batch.payload) if p.dim() == 1]
    images = dict(zip(encoded, decode_jpegs_on(device, [batch.payload[i] for i in encoded]), strict=True))
    crops = []
    for i, payload in enumerate(batch.payload):
        if i not in images:
            crops.append(payload.to(device, non_blocking=True))
        elif batch.box[i] is not None:
            crops.append(resized_crop(images[i], batch.box[i], size))
        else:
            crops.append(center_crop(images[i], eval_resize, size))
    return torch.stack(crops)


class _WorkerSignals:
    """The worker processes' signal handling (their ``worker_init_fn``).

    A SLURM job's SIGTERM and SIGUSR1 reach every process of the job, workers included, and a worker
    killed mid-batch would end the run with an error instead of the checkpoint that the main process
    writes when it stops: the workers ignore them. Only at the main process's exit, when Python's
    multiprocessing ends its children with SIGTERM, does SIGTERM end a worker (``exiting``, set at exit)."""

    def __init__(self):
        self.exiting = multiprocessing.get_context().Event()
        atexit.register(self.exiting.set)  # registered after multiprocessing's own exit hook: runs before it

    def __call__(self, _worker_id: int) -> None:
        torch.set_num_threads(1)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)

    def _on_sigterm(self, _signum, _frame) -> None:
        if self.exiting.is_set():
            os._exit(0)


class _Passes:
    """The DataLoader's batch sampler: the batches of keys of the pass about to start."""

    def __init__(self):
        self.pending: list[list[Key]] = []

    def __iter__(self):
        return iter(self.pending)


class ImageLoader:
    """The worker processes of a run (``workers``; 0 = decode in the main process) and the device end."""

    def __init__(
        self,
        sources: dict[str, Source],
        seed: int,
        eval_resize: int,
        workers: int,
        normalize: Normalize,
        decode_on_device: bool = False,
    ):
        self.device = normalize.mean.device
        self.normalize = normalize
        self.passes, self.workers = _Passes(), workers
        self.worker_signals = _WorkerSignals() if workers else None
        self.loader = self._make(DecodedImages(sources, seed, eval_resize, decode_on_device))

    def _make(self, dataset: DecodedImages) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=self.passes,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=self.worker_signals,
            persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator(),  # its per-pass worker seeds (unused) drawn apart from the run's RNG state
        )

    def close(self) -> None:
        """Stop the worker processes now (a later pass starts new ones); else they stop at exit."""
        if self.workers:
            dataset, self.loader = self.loader.dataset, None  # the DataLoader's iterator shuts its workers down
            self.loader = self._make(dataset)

    def run(
        self, batches: list[list[Key]], augment: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch of keys as (normalised images, labels) on the device, in order; ``augment(position,
        uint8 images)``, where given, changes each batch's pixels on the device before they are normalised."""
        self.passes.pending = batches
        for position, batch in enumerate(self.loader):
            if isinstance(batch, DataError):
                raise batch
            labels, flips = (t.to(self.device, non_blocking=True) for t in batch[1:3])
            if isinstance(batch.payload, list):  # decoding on the device
                size, resize = batches[0][0][3], self.loader.dataset.eval_resize
                images = decode_on_device(batch, size, resize, self.device)
            else:
                images = batch.payload.to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2)  # NCHW, channels-last
            images = torch.where(flips[:, None, None, None], images.flip(3), images)
            if augment is not None:
                images = augment(position, images)
            yield self.normalize(images), labels


class ImageBatches(BatchPlan):
    """The batches of one split of an ``ImageLoader``'s sources, at the size of each epoch."""

    def __init__(
        self,
        loader: ImageLoader,
        split: str,
        batch_size: int,
        seed: int,
        size: int,
        progressive: tuple[int, tuple[int, int]] = (0, (0, 0)),
        rank: int = 0,
        world_size: int = 1,
        randaugment: BatchRandAugment | None = None,
    ):
        source = loader.loader.dataset.sources[split]
        super().__init__(len(source), batch_size, split == "train", seed, rank, world_size)
        self.loader, self.split, self.size, self.progressive = loader, split, size, progressive
        self.randaugment = randaugment if self.train else None

    def size_at(self, epoch: int) -> int:
        """The crop size of ``epoch``'s batches (progressive training: it grows; evaluation: fixed)."""
        if not self.train:
            return self.size
        start, ramp = self.progressive
        return train_resolution(epoch, self.size, start, ramp)

    def close(self) -> None:
        self.loader.close()

    def batches(
        self, epoch: int = 0, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of ``epoch``'s batches ``start`` to ``stop`` (excluded; None: the end)."""
        size = self.size_at(epoch)
        keys = [[(self.split, i, epoch, size) for i in batch] for batch in self.rank_batches(epoch, start, stop)]
        if self.randaugment is None:
            return self.loader.run(keys)
        part, randaugment = self.rank_part(), self.randaugment

        def augment(position: int, images: torch.Tensor) -> torch.Tensor:
            return randaugment(images, epoch, start + position, part, self.global_batch)

        return self.loader.run(keys, augment)
