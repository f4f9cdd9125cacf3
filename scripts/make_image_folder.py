#!/usr/bin/env python
"""Write an ImageNet-like folder of JPEGs for benchmarks and tests of the input pipeline.

    python scripts/make_image_folder.py DST [--classes 10] [--train-per-class 24] [--val-per-class 4]

``DST/train/<class>/*.JPEG`` and ``DST/val/<class>/*.JPEG`` as ImageNet lays them out. The pictures
are not noise, which JPEG cannot compress and which would make decoding unrealistically slow: each is
a smooth scene with the 1/f amplitude spectrum of natural photographs, a few objects with hard edges
and shading, and a little sensor noise, in the sizes ImageNet's training images have (most 500 px on
the long side, some smaller or larger, portrait and landscape). At quality 90 a 500x375 picture is
about 70 kB. Everything is a function of ``--seed``; ``--distinct N`` makes N pictures and repeats
them over the files (for speed measurements of larger sets; ``--workers`` processes make them).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) and how often ImageNet-like sets have them, roughly: most are 500 on the long side.
SIZES = [
    ((500, 375), 0.35),
    ((500, 333), 0.2),
    ((375, 500), 0.1),
    ((500, 400), 0.1),
    ((400, 300), 0.08),
    ((640, 480), 0.07),
    ((333, 500), 0.05),
    ((300, 225), 0.05),
]


def natural_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB float image in [0, 1] with a 1/f amplitude spectrum (as natural images have), colours
    correlated across channels through a random mixing of three such fields."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width)) ** 1.2
    spectrum = rng.standard_normal((3, height, fx.shape[1])) + 1j * rng.standard_normal((3, height, fx.shape[1]))
    fields = np.fft.irfft2(spectrum * falloff, s=(height, width))
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-9
    mix = rng.normal(0.0, 0.35, (3, 3)) + np.eye(3) * 0.5
    rgb = np.tensordot(mix, fields, axes=1).transpose(1, 2, 0)
    light = np.linspace(rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), height)[:, None, None]  # sky to ground
    return np.clip(0.5 + 0.18 * rgb + light + rng.uniform(-0.15, 0.15, 3), 0, 1)


def picture(rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
    """One photo-like RGB picture of ``size`` (width, height; drawn from ``SIZES`` when None)."""
    if size is None:
        (width, height), _ = SIZES[rng.choice(len(SIZES), p=[p for _, p in SIZES])]
    else:
        width, height = size
    base = Image.fromarray((natural_field(rng, height, width) * 255).astype(np.uint8))
    objects = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(objects), ImageDraw.Draw(mask)
    for _ in range(rng.integers(2, 6)):  # objects: ellipses and polygons with a flat colour, shaded below
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.08, 0.3) * min(width, height)
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        if rng.random() < 0.5:
            box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)]
            draw.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=255)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 8)))
            points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
            draw.polygon(points, fill=colour)
            draw_mask.polygon(points, fill=255)
    shade = natural_field(rng, height, width)  # texture and shading on the objects
    shaded = np.asarray(objects, dtype=np.float32) * (0.6 + 0.8 * shade)
    objects = Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8))
    scene = Image.composite(objects, base, mask)
    noisy = np.asarray(scene, dtype=np.float32) + rng.normal(0, 3.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encoded(args: tuple[int, int, int]) -> bytes:
    seed, number, quality = args
    return jpeg_bytes(picture(np.random.default_rng([seed, number])), quality)


def write_image_folder(
    dst: Path,
    classes: int = 10,
    train_per_class: int = 24,
    val_per_class: int = 4,
    seed: int = 0,
    quality: int = 90,
    distinct: int = 0,
    workers: int = 1,
) -> int:
    """Write the tree; returns the number of files written. ``distinct`` > 0: only that many pictures
    are made, and the files repeat them in turn (each file is decoded all the same: enough for speed
    measurements of large sets); ``workers``: processes that make them."""
    splits = (("train", train_per_class), ("val", val_per_class))
    files = [(split, c, i) for split, n in splits for c in range(classes) for i in range(n)]
    count = min(distinct, len(files)) if distinct else len(files)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pictures = pool.map(_encoded, [(seed, k, quality) for k in range(count)], chunksize=4)
    for k, (split, c, i) in enumerate(files):
        folder = Path(dst) / split / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"n{c:08d}_{i}.JPEG").write_bytes(pictures[k % count])
    return len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct", type=int, default=0, help="make only this many pictures, repeated (0: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that make pictures")
    args = parser.parse_args(argv)
    counts = (args.classes, args.train_per_class, args.val_per_class)
    n = write_image_folder(args.dst, *counts, args.seed, args.quality, args.distinct, args.workers)
    files = list(args.dst.rglob("*.JPEG"))
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
    print(f"wrote {n} JPEGs under {args.dst} (mean {mean_kb:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
