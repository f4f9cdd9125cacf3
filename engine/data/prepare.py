"""Convert an ImageFolder tree into prepared shards (``engine.data.shards``), resumably.

Each split's images are listed as the training input lists them (``FolderSource``) and cut into
shards of ``shard_size`` consecutive images. Worker processes decode each image, shrink it so that its
longest side is at most ``max_side`` and encode it as JPEG at ``quality``; an RGB or greyscale JPEG
that is small enough already is stored as it is. The main process writes the shards in order, each to
a temporary file renamed when complete, then its part file: an interrupted conversion keeps every
complete shard and the next run writes only the others. The split's index and ``meta.json`` come last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, encode_jpeg
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..files import write_atomic
from .decode import decode_rgb
from .errors import DataError
from .folder import FolderSource
from .shards import FORMAT_VERSION, RECORD, read_meta, sha256, shard_name

log = logging.getLogger("cbam")
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Options:
    max_side: int = 256  # longest side of a stored image (smaller images are not enlarged)
    quality: int = 90  # JPEG quality of re-encoded images
    shard_size: int = 1000  # images per shard

    def __post_init__(self):
        for name, low in (("max_side", 16), ("quality", 1), ("shard_size", 1)):
            if getattr(self, name) < low:
                raise DataError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.quality > 100:
            raise DataError(f"--quality must be <= 100, got {self.quality}")


def encode_image(data: bytes, name: str, max_side: int, quality: int) -> bytes:
    """The bytes to store for one image file: the file itself if it is an RGB or greyscale JPEG whose
    longest side is at most ``max_side``; else its RGB pixels (as ``decode_rgb`` reads them), shrunk
    so that the longest side is ``max_side`` (antialiased bilinear), as a JPEG of ``quality``.
    ``DataError`` for a file that cannot be decoded."""
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        pixels = decode_rgb(data, name)  # raises the DataError that names the file
    height, width = pixels.shape[-2:]
    if data[:3] == JPEG_MAGIC and pixels.shape[0] in (1, 3) and max(height, width) <= max_side:
        return data
    rgb = decode_rgb(data, name)
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        rgb = TF.resize(rgb, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)
    return encode_jpeg(rgb.contiguous(), quality=quality).numpy().tobytes()


def _encode_task(task: tuple[int, str, int, int]) -> tuple[int, bytes | DataError]:
    index, path, max_side, quality = task
    try:
        with open(path, "rb") as f:
            return index, encode_image(f.read(), path, max_side, quality)
    except DataError as exc:
        return index, exc
    except OSError as exc:
        return index, DataError(f"{path} cannot be read ({exc.strerror})")


def _init_worker() -> None:
    torch.set_num_threads(1)


class _ShardWriter:
    """One shard, written to a temporary file and renamed into place by ``finish`` (then its part file)."""

    def __init__(self, split: Path, number: int):
        self.split, self.number = split, number
        self.path = split / shard_name(number)
        self.tmp = split / f".{self.path.name}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.records: list[list[int]] = []

    def add(self, index: int, data: bytes, label: int) -> None:
        key = f"{index:08d}"
        for suffix, payload in ((".jpg", data), (".cls", str(label).encode())):
            info = tarfile.TarInfo(key + suffix)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            offset = self.tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT))  # where the payload starts
            self.tar.addfile(info, io.BytesIO(payload))
            if suffix == ".jpg":
                self.records.append([index, offset, len(data), label, zlib.crc32(data)])

    def finish(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        part = {
            "name": self.path.name,
            "bytes": self.path.stat().st_size,
            "sha256": sha256(self.path),
            "records": self.records,
        }
        write_atomic(self.split / "parts" / f"{self.path.stem}.json", json.dumps(part))

    def abandon(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def _fingerprint(source: FolderSource, options: Options) -> str:
    """What the shards are a function of: the source's listing (relative paths, labels) and the options."""
    digest = hashlib.sha256(json.dumps(asdict(options)).encode())
    for path, label in zip(source.paths, source.labels.tolist(), strict=True):
        digest.update(f"{os.path.relpath(path, source.root)}\t{label}\n".encode())
    return digest.hexdigest()


def _complete_shards(split: Path, count: int) -> set[int]:
    """The shards whose part file exists and whose tar file has the size it records."""
    done = set()
    for number in range(count):
        part = split / "parts" / f"{Path(shard_name(number)).stem}.json"
        shard = split / shard_name(number)
        if part.is_file() and shard.is_file() and json.loads(part.read_text())["bytes"] == shard.stat().st_size:
            done.add(number)
    return done


def prepare_split(
    src: str | Path,
    dst: str | Path,
    options: Options = Options(),
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Convert the ImageFolder split ``src`` into the prepared split ``dst``; returns its meta.json.

    Resumes an interrupted conversion of the same source with the same options (and rewrites a shard
    deleted since); refuses a ``dst`` that holds another conversion. ``workers``: processes that encode
    (0: one per CPU core). A file that cannot be decoded stops the conversion with a ``DataError`` that
    names it, unless ``skip_bad``: then it is left out and listed in meta.json."""
    source, split = FolderSource(src), Path(dst)
    if not len(source):
        raise DataError(f"{src} holds no images")
    fingerprint = _fingerprint(source, options)
    (split / "parts").mkdir(parents=True, exist_ok=True)
    plan_path = split / "parts" / "plan.json"
    earlier = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if earlier is not None and earlier["fingerprint"] != fingerprint:
        raise DataError(
            f"{dst} holds a conversion of other files or with other options ({earlier['options']}). "
            f"Fix: choose another DST, or delete {dst}"
        )
    write_atomic(plan_path, json.dumps({"fingerprint": fingerprint, "options": asdict(options), "source": str(src)}))
    for stale in split.glob(".shard-*.tmp"):
        stale.unlink()
    count = -(-len(source) // options.shard_size)
    todo = sorted(set(range(count)) - _complete_shards(split, count))
    if todo:
        (split / "meta.json").unlink(missing_ok=True)  # no longer complete until the index is written again
        _write_shards(source, split, todo, options, workers or os.cpu_count() or 1, skip_bad, progress)
    elif (split / "meta.json").is_file():
        return read_meta(split)
    return _write_index(source, split, count, options, fingerprint)


def _samples(source: FolderSource, todo: list[int], size: int) -> list[int]:
    return [i for number in todo for i in range(number * size, min((number + 1) * size, len(source)))]


def _write_shards(
    source: FolderSource, split: Path, todo: list[int], options: Options, workers: int, skip_bad: bool, progress: bool
) -> None:
    samples = _samples(source, todo, options.shard_size)
    tasks = ((i, source.paths[i], options.max_side, options.quality) for i in samples)
    bar = tqdm(
        total=len(samples),
        unit="img",
        desc=f"{split.name}: {len(todo)} shard(s)",
        disable=not progress,
        mininterval=1 if sys.stderr.isatty() else 30,
        file=sys.stderr,
    )
    bad = []
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        results: Iterator = pool.imap(_encode_task, tasks, chunksize=8)
        for number in todo:
            writer = _ShardWriter(split, number)
            try:
                for index in range(number * options.shard_size, min((number + 1) * options.shard_size, len(source))):
                    got, data = next(results)
                    assert got == index
                    if isinstance(data, DataError):
                        if not skip_bad:
                            raise DataError(f"{data} Or pass --skip-bad to leave such files out.")
                        bad.append(source.paths[index])
                    else:
                        writer.add(index, data, int(source.labels[index]))
                    bar.update(1)
                writer.finish()
            except BaseException:
                writer.abandon()
                raise
    bar.close()
    if bad:
        log.warning("left out %d file(s) that cannot be decoded: %s", len(bad), ", ".join(bad[:10]))
        _record_skipped(split, bad)


def _record_skipped(split: Path, bad: list[str]) -> None:
    path = split / "parts" / "skipped.json"
    earlier = json.loads(path.read_text()) if path.is_file() else []
    write_atomic(path, json.dumps(sorted(set(earlier) | set(bad))))


def _write_index(source: FolderSource, split: Path, count: int, options: Options, fingerprint: str) -> dict:
    parts = [json.loads((split / "parts" / f"{Path(shard_name(n)).stem}.json").read_text()) for n in range(count)]
    records = np.array([(n, *r[1:]) for n, part in enumerate(parts) for r in part["records"]], dtype=RECORD)
    indices = [r[0] for part in parts for r in part["records"]]
    with open(split / ".index.npy.tmp", "wb") as f:
        np.save(f, records)
    os.replace(split / ".index.npy.tmp", split / "index.npy")
    names = "".join(os.path.relpath(source.paths[i], source.root) + "\n" for i in indices)
    write_atomic(split / "names.txt", names)
    skipped = split / "parts" / "skipped.json"
    meta = {
        "format": FORMAT_VERSION,
        "samples": len(records),
        "classes": source.classes,
        "options": asdict(options),
        "source": str(source.root),
        "fingerprint": fingerprint,
        "skipped": json.loads(skipped.read_text()) if skipped.is_file() else [],
        "shards": [{k: part[k] for k in ("name", "bytes", "sha256")} for part in parts],
    }
    write_atomic(split / "meta.json", json.dumps(meta, indent=1))
    return meta


def prepare(
    src: str | Path,
    dst: str | Path,
    options: Options = Options(),
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
) -> dict:
    """Both splits of an ImageNet-style tree (``src/train``, ``src/val``) into ``dst/train``, ``dst/val``."""
    src, dst = Path(src), Path(dst)
    missing = [s for s in ("train", "val") if not (src / s).is_dir()]
    if missing:
        raise DataError(
            f"{src} lacks {' and '.join(m + '/' for m in missing)}. Fix: pass the folder that holds "
            "train/<class>/*.JPEG and val/<class>/*.JPEG"
        )
    metas = {}
    for name in ("train", "val"):
        metas[name] = prepare_split(src / name, dst / name, options, workers, skip_bad, progress)
        total = sum(s["bytes"] for s in metas[name]["shards"])
        log_fn(
            f"{dst / name}: {metas[name]['samples']} images in {len(metas[name]['shards'])} shard(s), "
            f"{total / 1e6:.1f} MB ({total / max(metas[name]['samples'], 1) / 1e3:.1f} kB per image)"
        )
    if metas["train"]["classes"] != metas["val"]["classes"]:
        raise DataError(f"{src}/train and {src}/val have different class folders; they must hold the same classes")
    return metas
