"""Where each image is cropped and to what size: the paper's training and evaluation crops on uint8
pixels, and the training resolution of each epoch (low-resolution and progressive training)."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

Box = tuple[int, int, int, int]  # top, left, height, width

SCALE = (0.08, 1.0)  # the paper's RandomResizedCrop: area fraction and aspect ratio ranges
RATIO = (3 / 4, 4 / 3)


def random_resized_crop(height: int, width: int, rng: random.Random, scale=SCALE, ratio=RATIO) -> tuple[Box, bool]:
    """The training crop box of an image and whether to flip it horizontally.

    torchvision's ``RandomResizedCrop.get_params`` step for step (up to 10 tries of an area fraction
    uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the centre crop that fits
    ``ratio``), then a coin; drawn from ``rng`` (one per sample, seeded by (seed, epoch, index), so that a
    resumed epoch crops every image as the uninterrupted one did). Written out because torchvision draws
    from torch's global generator, and seeding and drawing from a torch generator per image costs ten
    times the Python ``random.Random`` does here."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (rng.randint(0, height - h), rng.randint(0, width - w), h, w), rng.random() < 0.5
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), rng.random() < 0.5


def resized_crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """``box`` of a (3, H, W) uint8 image resized to (size, size), bilinear with antialiasing (as PIL
    and torchvision resize); returned as (size, size, 3), contiguous."""
    top, left, height, width = box
    crop = _batch_of_one(image)[:, :, top : top + height, left : left + width]
    if crop.device.type == "cpu":  # uint8 resampling, vectorised on the CPU alone
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].permute(1, 2, 0).contiguous()  # channels-last in, channels-last out: HWC in memory already


def center_crop(image: torch.Tensor, resize_size: int, size: int) -> torch.Tensor:
    """The paper's evaluation crop: the short side resized to ``resize_size`` (antialiased bilinear),
    then the centre (size, size); returned as (size, size, 3), contiguous."""
    out = TF.center_crop(TF.resize(_batch_of_one(image), [resize_size], antialias=True), [size, size])
    return out[0].permute(1, 2, 0).contiguous()


def _batch_of_one(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) view of a (3, H, W) image, channels-last when the image is (HWC in memory): the
    layout whose uint8 resampling torch vectorises, and whose result is HWC in memory too."""
    return image.permute(1, 2, 0)[None].permute(0, 3, 1, 2)


def train_resolution(epoch: int, final: int, start: int = 0, ramp: tuple[int, int] = (0, 0)) -> int:
    """The training crop size of ``epoch`` (0-based), FFCV's progressive resizing: ``start`` up to epoch
    ``ramp[0]``, ``final`` from epoch ``ramp[1]`` on, linearly between, rounded to a multiple of 32.
    ``start=0``: ``final`` throughout."""
    if not start:
        return final
    if epoch <= ramp[0]:
        return start
    if epoch >= ramp[1]:
        return final
    res = start + (final - start) * (epoch - ramp[0]) / (ramp[1] - ramp[0])
    return int(round(res / 32)) * 32
