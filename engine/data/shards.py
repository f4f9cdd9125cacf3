"""Prepared shards: a split of an image set as a few large tar files and an index of where each image
is, for clusters (thousands of files instead of millions) and for speed (images stored pre-resized).

``scripts/prepare_data.py`` writes them (``engine.data.prepare``) and ``data.format=shards`` reads them.
A prepared split (``DST/train``, ``DST/val``) holds:

- ``shard-000000.tar``, ...: plain tar files in WebDataset's layout, ``<key>.jpg`` (the JPEG) and
  ``<key>.cls`` (the class index as text) per sample, readable by ``tar`` and by the webdataset package;
- ``parts/shard-000000.json``, ...: each shard's records (the offset, size, label and CRC-32 of each
  image in it) with the shard's size and SHA-256, written when the shard is complete;
- ``index.npy`` (all records, in the source's order) and ``names.txt`` (each sample's source path), then
  ``meta.json`` last: its presence says that the split is complete.

Images are read by offset, so the sample order, resume at any batch and the split between ranks are
exactly those of the image folder. A missing or truncated shard is refused when the split is opened
(sizes against ``meta.json``), a corrupt image when it is read (its CRC-32), each naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT_VERSION = 1
RECORD = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<i4"), ("crc32", "<u4")])
REPAIR = "python scripts/prepare_data.py SRC DST again (with the same options): it rewrites what is missing"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_meta(split: Path) -> dict:
    """A complete prepared split's ``meta.json``; ``DataError`` if the split is not one."""
    path = Path(split) / "meta.json"
    if not path.is_file():
        partial = (Path(split) / "parts").is_dir()
        raise DataError(
            f"{split} is not a prepared split (no meta.json): "
            + ("its conversion did not finish. " if partial else "")
            + f"Fix: run {REPAIR}, or point data.root at the folder that prepare_data.py wrote (it holds train/ "
            "and val/ with meta.json)."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(
            f"{path}: shard format {meta.get('format')!r}, this version reads {FORMAT_VERSION}. "
            "Fix: prepare the data again with this version's scripts/prepare_data.py"
        )
    return meta


class ShardSource:
    """The images of a prepared split, read as encoded bytes by offset (``os.pread``: no shared file
    position, so the worker processes that inherit the open files read them independently)."""

    def __init__(self, split: str | Path):
        self.split = Path(split)
        self._files: dict[int, int] = {}  # shard number -> this process's open file
        self._names: list[str] | None = None
        meta = read_meta(self.split)
        self.classes: list[str] = meta["classes"]
        self.shards = [self.split / s["name"] for s in meta["shards"]]
        for path, shard in zip(self.shards, meta["shards"], strict=True):
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                state = "missing" if size is None else f"truncated or altered ({size} of {shard['bytes']} bytes)"
                raise DataError(f"shard {path} is {state}. Fix: delete it and run {REPAIR}.")
        self.index = np.load(self.split / "index.npy")
        if len(self.index) != meta["samples"]:
            raise DataError(
                f"{self.split / 'index.npy'} holds {len(self.index)} records, meta.json {meta['samples']}. "
                f"Fix: delete both and run {REPAIR}."
            )
        self.labels = self.index["label"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # open files stay with the process that opened them
        return {**self.__dict__, "_files": {}}

    def read(self, index: int) -> bytes:
        record = self.index[index]
        shard = int(record["shard"])
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], int(record["size"]), int(record["offset"]))
        if len(data) != record["size"] or zlib.crc32(data) != record["crc32"]:
            raise DataError(
                f"{self.name(index)} fails its CRC-32 check: shard {self.shards[shard]} is corrupt. "
                f"Fix: delete it and run {REPAIR}."
            )
        return data

    def name(self, index: int) -> str:
        if self._names is None:
            self._names = (self.split / "names.txt").read_text().splitlines()
        return f"{self.shards[int(self.index[index]['shard'])]}:{self._names[index]}"

    def __del__(self):
        for fd in self._files.values():
            os.close(fd)


def verify(split: str | Path) -> list[str]:
    """Each shard of a prepared split against the SHA-256 in ``meta.json``: the problems found (none: [])."""
    split = Path(split)
    problems = []
    for shard in read_meta(split)["shards"]:
        path = split / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256(path) != shard["sha256"]:
            problems.append(f"{path}: SHA-256 differs from meta.json (corrupt)")
    return problems
