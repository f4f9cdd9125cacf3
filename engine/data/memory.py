"""Data sets held in memory (CIFAR, Fashion-MNIST, synthetic) and their batches.

Such a set lives as one uint8 tensor on the training device and is augmented there a whole batch at
a time (``TensorBatches``): no worker processes, no per-image Python. The augmentation of each batch
is drawn from (seed, epoch, batch), so a resumed epoch sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .errors import DataError
from .normalize import Normalize
from .order import BatchPlan, generator
from .randaugment import BatchRandAugment

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def random_crop_flip(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding, and random horizontal flip, for a whole batch.

    torchvision's transforms draw one set of parameters per call, i.e. the same crop for the whole
    batch; this draws one per image and applies them with a single gather.
    """
    n, c, h, w = x.shape
    # drawn on the CPU (the same on every device), copied without a stream synchronisation
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device, non_blocking=True)
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device, non_blocking=True)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device, non_blocking=True)
        padded = F.pad(x, (padding,) * 4)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows,
            cols,
        ]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class TensorBatches(BatchPlan):
    """Batches of an in-memory uint8 image tensor, augmented and normalised on ``device``, in ``dtype``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: list[float],
        std: list[float],
        train: bool,
        seed: int = 0,
        augment: bool = False,
        crop_padding: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        randaugment: str = "",
    ):
        super().__init__(len(labels), batch_size, train, seed, rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.augment, self.crop_padding = augment and train, crop_padding
        self.normalize = Normalize(mean, std, self.device, dtype)
        size = images.shape[-1]
        self.randaugment = BatchRandAugment(randaugment, mean, size, seed) if randaugment and train else None

    def batches(
        self, epoch: int = 0, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of ``epoch``'s batches ``start`` to ``stop`` (excluded; None: the end)."""
        part = self.rank_part()
        for i, idx in self.global_batches(epoch, start, stop):
            idx = idx.to(self.device, non_blocking=True)  # pageable: staged by the driver, no stream sync
            if self.augment:  # drawn for the whole global batch: the same crops whatever the world size
                x = random_crop_flip(self.images[idx], self.crop_padding, generator(self.seed, epoch, i))[part]
            else:
                x = self.images[idx[part]]
            if self.randaugment:
                x = self.randaugment(x, epoch, i, part, len(idx))
            yield self.normalize(x), self.labels[idx[part]]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not), e.g. Debian's Fashion-MNIST copy.

    torchvision's ``FashionMNIST`` only reads its own ``raw/`` folder of decompressed files and
    downloads otherwise, so the Debian files are parsed here: a big-endian header, then uint8 data.
    """
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(root: str, download: bool) -> tuple[Split, Split]:
    """Fashion-MNIST from ``root`` (IDX files), Debian's copy, or torchvision's download, in that order."""
    for folder in (Path(root), Path(root) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST):
        files = {
            s: _find_idx(folder, f"{s}-idx{3 if 'images' in s else 1}-ubyte")
            for s in ("train-images", "train-labels", "t10k-images", "t10k-labels")
        }
        if all(files.values()):
            arrays = {s: torch.from_numpy(_read_idx(p).copy()) for s, p in files.items()}
            return (
                Split(arrays["train-images"][:, None], arrays["train-labels"].long()),
                Split(arrays["t10k-images"][:, None], arrays["t10k-labels"].long()),
            )
    if download:
        try:
            splits = [torchvision.datasets.FashionMNIST(root, train=t, download=True) for t in (True, False)]
        except Exception as exc:  # no network, mostly
            raise DataError(_missing_message("Fashion-MNIST", root, exc)) from None
        return tuple(Split(s.data[:, None].contiguous(), s.targets.long()) for s in splits)
    raise DataError(_missing_message("Fashion-MNIST", root))


def _existence_checked(cls):
    """torchvision's reader of the pickled batches with the MD5 sums dropped (files must exist): the
    sums are checked before (``_verify_cifar``) unless data.verify=false, for files made by hand."""

    def no_md5(entries):
        return [[name, None] for name, _ in entries]

    attrs = {
        "train_list": no_md5(cls.train_list),
        "test_list": no_md5(cls.test_list),
        "meta": {**cls.meta, "md5": None},
    }
    return type(cls.__name__, (cls,), attrs)


_TORCHVISION_CIFAR = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
_CIFAR = {name: _existence_checked(cls) for name, cls in _TORCHVISION_CIFAR.items()}


def _verify_cifar(name: str, root: str) -> None:
    """The archive and each batch that is present against torchvision's MD5 sums
    (``torchvision.datasets.utils.check_integrity``): a corrupt or incomplete download is refused."""
    from torchvision.datasets.utils import check_integrity

    cls = _TORCHVISION_CIFAR[name]
    folder = Path(root) / cls.base_folder
    files = [(Path(root) / cls.filename, cls.tgz_md5)]
    files += [
        (folder / f, md5) for f, md5 in (*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"]))
    ]
    for path, md5 in files:
        if path.is_file() and not check_integrity(str(path), md5):
            raise DataError(
                f"{path} fails its MD5 check ({name}'s published checksum): a corrupt or incomplete download. "
                f"Fix: delete {folder if path.parent == folder else path} and download again (data.download=true "
                "where a network is reachable), or pass data.verify=false for files you made yourself."
            )


def load_cifar(name: str, root: str, download: bool, verify: bool = True) -> tuple[Split, Split]:
    """CIFAR-10/100 in torchvision's on-disk format (``root/cifar-10-batches-py`` etc.); with ``verify``
    the files are checked against torchvision's MD5 sums first."""
    cls = _CIFAR[name]
    if verify:
        _verify_cifar(name, root)
    try:
        sets = [cls(root, train=t, download=False) for t in (True, False)]
    except RuntimeError:
        if not download:
            raise DataError(_missing_message(name, root, where=f"{root}/{cls.base_folder}/")) from None
        try:
            sets = [cls(root, train=t, download=True) for t in (True, False)]
        except Exception as exc:
            raise DataError(_missing_message(name, root, exc, where=f"{root}/{cls.base_folder}/")) from None
    return tuple(
        Split(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.long))
        for s in sets
    )


def synthetic(num_classes: int, in_chans: int, image_size: int, train_size: int, val_size: int) -> tuple[Split, Split]:
    """A deterministic, learnable toy set: one smooth random prototype per class plus noise."""
    gen = generator(1234)
    prototypes = F.interpolate(
        torch.randn(num_classes, in_chans, 4, 4, generator=gen), size=image_size, mode="bilinear"
    )

    def make(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        x = prototypes[labels] + 0.8 * torch.randn(n, in_chans, image_size, image_size, generator=gen)
        return Split(((x * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8), labels)

    return make(train_size), make(val_size)


def _missing_message(name: str, root: str, exc: Exception | None = None, where: str | None = None) -> str:
    msg = f"{name} not found under data.root={root!r}"
    if where:
        msg += f" (expected {where})"
    if exc is not None:
        msg += f", and downloading it failed ({type(exc).__name__}: {exc})"
    hint = {
        "Fashion-MNIST": "on Debian, apt-get install dataset-fashion-mnist; or put the four *-ubyte.gz files there",
    }.get(name, "put the files there, or run where a network is reachable with data.download=true")
    return f"{msg}. Fix: {hint}, or pass data.root=/path/to/{name.lower()}."


# The data sets held in memory, by data.name: their readers of (train, val) uint8 tensors.
IN_MEMORY = {
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg.root, cfg.download),
    "cifar10": lambda cfg: load_cifar("cifar10", cfg.root, cfg.download, cfg.verify),
    "cifar100": lambda cfg: load_cifar("cifar100", cfg.root, cfg.download, cfg.verify),
    "synthetic": lambda cfg: synthetic(cfg.num_classes, cfg.in_chans, cfg.image_size, cfg.train_size, cfg.val_size),
}
