"""Data sets and batch iterators.

Data sets that fit in memory (CIFAR, Fashion-MNIST, synthetic) live as one uint8 tensor on the
training device and are augmented a whole batch at a time there (``TensorBatches``): no worker
processes, no per-image Python. ImageNet-style folders go through a ``DataLoader``
(``FolderBatches``). Both draw the epoch's order from a generator seeded by (seed, epoch), and the
in-memory augmentation from (seed, epoch, batch), so an epoch can be restarted at any batch and see
exactly what an uninterrupted run would have seen.
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
from torchvision import transforms

from cbam.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(UserError):
    """A data set is missing or malformed."""


def _generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (seed, epoch, batch)."""
    gen = torch.Generator()
    gen.manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0] >> 1))
    return gen


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one training epoch: a function of (seed, epoch) only."""
    return torch.randperm(num_samples, generator=_generator(seed, epoch))


def random_crop_flip(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding, and random horizontal flip, for a whole batch.

    torchvision's transforms draw one set of parameters per call, i.e. the same crop for the whole
    batch; this draws one per image and applies them with a single gather.
    """
    n, c, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
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


class _Batches:
    """The batch order shared by both iterators.

    Training: the epoch's permutation (a function of seed and epoch) cut into global batches of
    ``batch_size * world_size``, the last partial one dropped; rank r takes the r-th slice of each, so
    the ranks together see exactly what a single process would. Evaluation: the data in order, every
    image once; rank r takes every world_size-th image of each global batch (counts are summed).
    """

    def __init__(self, num_samples: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int):
        self.num_samples, self.batch_size, self.train, self.seed = num_samples, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def _global_batches(self, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        order = epoch_order(self.num_samples, self.seed, epoch) if self.train else torch.arange(self.num_samples)
        for i in range(start, len(self)):
            yield i, order[i * self.global_batch : (i + 1) * self.global_batch]

    def _rank_part(self, batch: torch.Tensor) -> slice:
        """This rank's share of a global batch (positions in it)."""
        if self.train:
            return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return slice(self.rank, None, self.world_size)


class TensorBatches(_Batches):
    """Batches of an in-memory uint8 image tensor, normalised (and augmented) on ``device``."""

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
    ):
        super().__init__(len(labels), batch_size, train, seed, rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.augment, self.crop_padding = augment and train, crop_padding
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) of ``epoch`` from batch ``start`` on."""
        for i, idx in self._global_batches(epoch, start):
            idx, part = idx.to(self.device), self._rank_part(idx)
            if self.augment:  # drawn for the whole global batch: the same crops whatever the world size
                x = random_crop_flip(self.images[idx].float(), self.crop_padding, _generator(self.seed, epoch, i))[part]
            else:
                x = self.images[idx[part]].float()
            yield (x - self.mean) / self.std, self.labels[idx[part]]


class FolderBatches(_Batches):
    """Batches of an ImageFolder through a multi-worker ``DataLoader``, in the seeded epoch order.

    The order of images is resumable at any batch; the random crops drawn in the worker processes
    are not bit-reproducible across a resume.
    """

    def __init__(self, dataset, batch_size: int, train: bool, seed: int, workers: int, device, rank=0, world_size=1):
        super().__init__(len(dataset), batch_size, train, seed, rank, world_size)
        self.dataset, self.workers, self.device = dataset, workers, torch.device(device)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index_batches = [idx[self._rank_part(idx)].tolist() for _, idx in self._global_batches(epoch, start)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=index_batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=_generator(self.seed, epoch, start),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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
        files = {s: _find_idx(folder, f"{s}-idx{3 if 'images' in s else 1}-ubyte") for s in
                 ("train-images", "train-labels", "t10k-images", "t10k-labels")}  # fmt: skip
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
    gen = _generator(1234)
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


def eval_geometry(cfg) -> list:
    """The evaluation crop of an image-folder set: resize the short side (to ``resize_size``, by default
    8/7 of the input size: 256 for 224), then centre-crop to ``image_size``."""
    resize = cfg.get("resize_size") or round(cfg["image_size"] * 8 / 7)
    return [transforms.Resize(resize), transforms.CenterCrop(cfg["image_size"])]


def _folder_transforms(cfg, train: bool):
    normalize = transforms.Normalize(cfg["mean"], cfg["std"])
    if train:  # the paper's ImageNet augmentation
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(cfg["image_size"]),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
    return transforms.Compose([*eval_geometry(cfg), transforms.ToTensor(), normalize])


def load_image_folder(cfg) -> tuple:
    root = Path(cfg["root"])
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"ImageNet-style data.root={str(root)!r} lacks {' and '.join(s + '/' for s in missing)}. Fix: point "
            "data.root at a folder holding train/<class>/*.JPEG and val/<class>/*.JPEG (one folder per class)."
        )
    sets = [torchvision.datasets.ImageFolder(root / s, _folder_transforms(cfg, s == "train")) for s in ("train", "val")]
    if sets[0].classes != sets[1].classes:
        raise DataError(f"train/ and val/ under {root} have different class folders; they must hold the same classes")
    if len(sets[0].classes) != cfg["num_classes"]:
        raise DataError(
            f"{root}/train has {len(sets[0].classes)} class folders but data.num_classes={cfg['num_classes']}. "
            f"Fix: pass data.num_classes={len(sets[0].classes)}."
        )
    return sets


# The data sets, by data.name: those held in memory as (train, val) uint8 tensors, by their reader, and
# ImageFolder trees. Adding one is an entry here and a YAML in configs/data/ (the schema's enum follows).
IN_MEMORY = {
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg["root"], cfg["download"]),
    "cifar10": lambda cfg: load_cifar("cifar10", cfg["root"], cfg["download"], cfg.get("verify", True)),
    "cifar100": lambda cfg: load_cifar("cifar100", cfg["root"], cfg["download"], cfg.get("verify", True)),
    "synthetic": lambda cfg: synthetic(
        cfg["num_classes"], cfg["in_chans"], cfg["image_size"], cfg["train_size"], cfg["val_size"]
    ),
}
IMAGE_FOLDERS = ("imagenet",)
DATASETS = (*IN_MEMORY, *IMAGE_FOLDERS)


def build_batches(cfg, batch_size: int, eval_batch_size: int, seed: int, device, rank: int = 0, world_size: int = 1):
    """(train, val) batch iterators for data config ``cfg`` (a ``DataConfig``-shaped mapping)."""
    dist = dict(device=device, rank=rank, world_size=world_size)
    if cfg["name"] in IMAGE_FOLDERS:
        train_set, val_set = load_image_folder(cfg)
        return (
            FolderBatches(train_set, batch_size, True, seed, cfg["workers"], **dist),
            FolderBatches(val_set, eval_batch_size, False, seed, cfg["workers"], **dist),
        )
    if cfg["name"] not in IN_MEMORY:
        raise DataError(f"unknown data set {cfg['name']!r}; known: {', '.join(DATASETS)}")
    train, val = IN_MEMORY[cfg["name"]](cfg)
    if train.images.shape[1] != cfg["in_chans"]:
        raise DataError(
            f"{cfg['name']} images have {train.images.shape[1]} channels but data.in_chans={cfg['in_chans']}"
        )
    norm = dict(mean=cfg["mean"], std=cfg["std"], seed=seed, **dist)
    return (
        TensorBatches(
            train.images,
            train.labels,
            batch_size,
            train=True,
            augment=cfg["augment"],
            crop_padding=cfg["crop_padding"],
            **norm,
        ),
        TensorBatches(val.images, val.labels, eval_batch_size, train=False, **norm),
    )
