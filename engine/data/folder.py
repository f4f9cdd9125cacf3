"""The images of an ImageFolder split (``root/<class>/<image>``), read as encoded bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import DataError


class FolderSource:
    """An ImageFolder split listed as torchvision's ``ImageFolder`` lists it (classes and files sorted by
    name, class index = position of its folder), each image read as the bytes of its file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.classes, class_to_idx = find_classes(self.root)
            samples = make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"cannot list the images of {self.root} ({exc}). Fix: point data.root at a folder whose train/ and "
                f"val/ hold one folder per class, each with image files ({', '.join(IMG_EXTENSIONS)})"
            ) from None
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        try:
            with open(self.paths[index], "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"{self.paths[index]} cannot be read ({exc.strerror}). Fix: check the file") from None

    def name(self, index: int) -> str:
        return self.paths[index]
