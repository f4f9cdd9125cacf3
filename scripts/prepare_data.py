#!/usr/bin/env python
"""Convert an ImageNet-style image folder into prepared shards for ``data.format=shards``.

    python scripts/prepare_data.py SRC DST [--max-side 256] [--quality 90] [--shard-size 1000] [--workers N]
    python scripts/prepare_data.py --verify DST

SRC holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``; DST gets ``train/`` and ``val/``, each a
set of tar shards with an index (``engine/data/shards.py`` describes the layout). Images whose longest
side exceeds ``--max-side`` are shrunk to it and stored as JPEGs of ``--quality``, as are files that are
not RGB or greyscale JPEGs (CMYK JPEGs, PNGs); the others are stored as they are. Train with
``data.format=shards data.root=DST``.

An interrupted conversion keeps every finished shard: run the same command again to finish it. Run it
again also after deleting a shard that a training run reported missing or corrupt. A file that cannot be
decoded stops the conversion with its path, unless ``--skip-bad`` leaves such files out. ``--verify``
checks every shard of DST against the SHA-256 recorded when it was written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.data.errors import DataError
from engine.data.prepare import Options, prepare
from engine.data.shards import verify


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, nargs="?", help="image folder with train/ and val/")
    parser.add_argument("dst", type=Path, help="where the shards go")
    parser.add_argument("--max-side", type=int, default=Options.max_side, help="longest side of a stored image")
    parser.add_argument("--quality", type=int, default=Options.quality, help="JPEG quality of re-encoded images")
    parser.add_argument("--shard-size", type=int, default=Options.shard_size, help="images per shard")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (0: one per CPU core)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out files that cannot be decoded")
    parser.add_argument("--verify", action="store_true", help="check DST's shards against their checksums")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.verify:
            problems = [p for split in ("train", "val") for p in verify(args.dst / split)]
            for problem in problems:
                print(problem)
            print(f"{args.dst}: {f'{len(problems)} problem(s)' if problems else 'every shard intact'}")
            if problems:
                print(f"Fix: delete the shards named and run python scripts/prepare_data.py SRC {args.dst} again")
            return 1 if problems else 0
        if args.src is None:
            parser.error("SRC is required (or pass --verify DST)")
        options = Options(args.max_side, args.quality, args.shard_size)
        prepare(args.src, args.dst, options, args.workers, args.skip_bad, progress=not args.quiet)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the finished shards are kept: run the same command again to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
