"""Image files as a trained network's inputs (the evaluation transform of the data set it was trained on),
and the names of a data set's classes, for figures that show single images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from cbam.errors import UserError

from .config import DataConfig
from .data import IMAGE_SETS, DataError, eval_geometry, image_sources
from .data.decode import decode_rgb
from .data.geometry import center_crop

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def image_files(paths: list[str | Path]) -> list[Path]:
    """The image files named, a folder standing for the images directly inside it (sorted by name)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise UserError(f"{str(path)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{str(path)!r} is neither an image file nor a folder")
    return files


def read_images(files: list[Path], data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(shown, inputs) for the data set config ``data``: images in [0, 1] at the network's input size
    (grey or RGB as ``data.in_chans``), and the same normalised by the data set's mean and std.
    ImageNet-style sets get their evaluation crop, decoded as the validation batches are (``engine.data``);
    small sets a plain resize."""
    if data.name in IMAGE_SETS:
        resize, size = eval_geometry(data)
        crops = [center_crop(decode_rgb(Path(file).read_bytes(), str(file)), resize, size) for file in files]
        shown_batch = torch.stack(crops).permute(0, 3, 1, 2).float() / 255
    else:
        shown_batch = torch.stack([_small_image(file, data) for file in files])
    inputs = transforms.Normalize(data.mean, data.std)(shown_batch)
    return shown_batch, inputs


def _small_image(file: Path, data: DataConfig) -> torch.Tensor:
    size = data.image_size
    to_tensor = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    try:
        with Image.open(file) as image:
            return to_tensor(image.convert("L" if data.in_chans == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{str(file)!r} cannot be read as an image ({exc})") from None


def class_names(data: DataConfig) -> list[str]:
    """Names of the classes by index: the data set's own where known (Fashion-MNIST, CIFAR-10, the classes
    of an image set that is still on disk: its folders or its shards'), the indices otherwise."""
    if data.name == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)
    if data.name == "cifar10":
        return list(CIFAR10_CLASSES)
    if data.name in IMAGE_SETS:
        try:
            return list(image_sources(data, ("val",))["val"].classes)
        except DataError:  # moved or deleted since training
            pass
    return [str(i) for i in range(data.num_classes)]
