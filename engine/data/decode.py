"""An image file's bytes to RGB pixels, for every kind of file real ImageNet holds."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .errors import DataError


def decode_rgb(data: bytes | bytearray, name: str) -> torch.Tensor:
    """The (3, H, W) uint8 RGB pixels of an encoded image, laid out channels-last (HWC in memory).

    libjpeg-turbo and libpng through ``torchvision.io.decode_image``, which reads the format from the
    bytes, not the file name: baseline and progressive JPEGs, greyscale and CMYK JPEGs (both become RGB
    as PIL's ``convert("RGB")`` makes them), and a PNG named ``.JPEG`` (ImageNet has one). A truncated or
    corrupt file raises ``DataError`` naming ``name``: never a partly grey picture.

    torchvision 0.29 deprecates its decoders for TorchCodec's (torch 2.11 on), which read the same files
    into the same layout; this function is the one place to switch once the oldest supported torch has them.
    """
    try:
        if not data:
            raise RuntimeError("empty file")
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name} cannot be decoded ({reason.split(', ')[-1]}; {len(data)} bytes): a truncated or corrupt image. "
            "Fix: replace it with a good copy or delete it (and prepare the shards again where it came from "
            "prepared shards)."
        ) from None


def rgb_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an RGB JPEG, read from its header alone (PIL opens lazily); None for anything
    else (greyscale or CMYK JPEGs, other formats, unreadable data), which ``decode_rgb`` handles."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.height, image.width) if image.format == "JPEG" and image.mode == "RGB" else None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_jpegs_on(device: torch.device, data: list[torch.Tensor]) -> list[torch.Tensor]:
    """RGB JPEGs (1-D uint8 tensors of their bytes) decoded on ``device``: on CUDA in one batched call
    (nvJPEG, with the hardware decoder where the GPU has one); on the CPU one by one (libjpeg-turbo; the
    batched call takes lists there from torchvision 0.20 on)."""
    if torch.device(device).type == "cpu":
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
