"""Image files as a trained network's inputs (the evaluation transform of the data set it was trained on),
and the names of a data set's classes, for figures that show single images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from cbam.errors import UserError

from .data import IMAGE_FOLDERS, eval_geometry

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


def read_images(files: list[Path], data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(shown, inputs) for the data set config ``data``: images in [0, 1] at the network's input size
    (grey or RGB as ``data.in_chans``), and the same normalised by the data set's mean and std.
    ImageNet-style sets get the evaluation crop (resize, centre crop); small sets a plain resize."""
    size = data["image_size"]
    if data["name"] in IMAGE_FOLDERS:
        geometry = eval_geometry(data)
    else:
        geometry = [transforms.Resize((size, size))]
    to_tensor = transforms.Compose([*geometry, transforms.ToTensor()])
    mode = "L" if data["in_chans"] == 1 else "RGB"
    shown = []
    for file in files:
        try:
            with Image.open(file) as image:
                shown.append(to_tensor(image.convert(mode)))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{str(file)!r} cannot be read as an image ({exc})") from None
    shown_batch = torch.stack(shown)
    inputs = transforms.Normalize(data["mean"], data["std"])(shown_batch)
    return shown_batch, inputs


def class_names(data: dict) -> list[str]:
    """Names of the classes by index: the data set's own where known (Fashion-MNIST, CIFAR-10, the class
    folders of an image-folder set that is still on disk), the indices otherwise."""
    if data["name"] == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)
    if data["name"] == "cifar10":
        return list(CIFAR10_CLASSES)
    val = Path(str(data.get("root"))) / "val"
    if data["name"] in IMAGE_FOLDERS and val.is_dir():
        folders = sorted(p.name for p in val.iterdir() if p.is_dir())
        if len(folders) == data["num_classes"]:
            return folders
    return [str(i) for i in range(data["num_classes"])]
