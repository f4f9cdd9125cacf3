#!/usr/bin/env python
"""A checkpoint as a file to ship: ONNX, TorchScript or a torch.export program, batch size dynamic.

    python scripts/export.py runs/cbam/.../checkpoints/best.pt --format onnx --out cbam.onnx
    python scripts/export.py best.pt --format exported            # -> best.pt2 beside the checkpoint

The file is loaded back (ONNX with onnxruntime) and its float32 logits compared with PyTorch's on random
inputs of another batch size; it is written only if they differ by at most 1e-4 (exit status 1 otherwise,
2 for a bad checkpoint or a missing package). Input ``images`` (N, C, H, W), normalised as in training;
output ``logits`` (N, classes). ONNX needs the ``export`` extra (``pip install -e '.[export]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.export import FORMATS, TOLERANCE, ExportCheckFailed, export
from cbam.errors import UserError
from engine.network import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by train.py (.pt)")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="the file's format")
    parser.add_argument(
        "--out",
        type=Path,
        help="the file to write (default: the checkpoint's name with "
        f"{', '.join(f'{s} ({f})' for f, s in FORMATS.items())})",
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights (trainer.ema_decay > 0)")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_suffix(FORMATS[args.format])
    if out.resolve() == args.checkpoint.resolve():
        parser.error(f"--out {out} is the checkpoint itself; choose another file")
    try:
        model, config = load_model(args.checkpoint, ema=args.ema)
        d = config.data
        result = export(model, (d.in_chans, d.image_size, d.image_size), args.format, out)
    except UserError as exc:  # CheckpointError, a missing exporter package
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportCheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    arch, attention = config.model.arch, config.attention.name
    print(
        f"{arch} + {attention} -> {result.path} ({args.format}, {result.path.stat().st_size / 2**20:.1f} MiB); "
        f"max abs difference from PyTorch {result.max_abs_diff:.2g} (at most {TOLERANCE})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
