#!/usr/bin/env python
"""Params and GMACs of any model x attention, counted like the paper (224x224, 1000 classes).

    python scripts/model_table.py                          # Table 4 (and 5) beside the paper
    python scripts/model_table.py resnet50 cbam se         # one model, some attention presets
    python scripts/model_table.py resnet50 cbam --v1.5     # torchvision's stride placement
    python scripts/model_table.py --readme                 # rewrite the README's table (ResNet-18/50)

With no arguments it uses ResNet v1 stride placement (stride in the first 1x1 of a downsampling
bottleneck), which is what the paper's FLOP column matches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.paper import TABLE4, TABLE5
from analysis.profile import count_gmacs, count_params
from cbam import PRESETS
from models import ARCHS, create_model


def measure(arch: str, attention: str, width: float = 1.0, v1: bool = True, image_size: int = 224):
    """(params in millions, GMACs) of one model at ``image_size``, 1000 classes."""
    kwargs = {"width": width} if arch == "mobilenet_v1" else {"stride_in_1x1": v1}
    model = create_model(arch, 1000, attention, **kwargs)
    return count_params(model) / 1e6, count_gmacs(model, (3, image_size, image_size))


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _diff(ours: float, paper: float | None, digits: int) -> str:
    return "" if paper is None else f"{ours - paper:+.{digits}f}"


def paper_table() -> str:
    lines = [
        "| table | network | attention | params (M) | paper | diff | GMACs | paper | diff | paper top-1 / top-5 err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in TABLE4 + TABLE5:
        params, gmacs = measure(row.arch, row.attention, row.width)
        name = row.arch if row.width == 1.0 else f"{row.arch} (alpha={row.width})"
        errs = f"{row.top1_err:.2f} / {row.top5_err:.2f}" + (" (approx.)" if row.approx else "")
        lines.append(
            f"| {row.table} | {name} | {row.attention} | {params:.3f} | {_fmt(row.params_m, 2)} | "
            f"{_diff(params, row.params_m, 3)} | {gmacs:.4f} | {_fmt(row.gmacs, 3)} | "
            f"{_diff(gmacs, row.gmacs, 4)} | {errs} |"
        )
    return "\n".join(lines)


README = Path(__file__).resolve().parents[1] / "README.md"
README_START, README_END = "<!-- table: python scripts/model_table.py --readme -->", "<!-- end of table -->"


def readme_table() -> str:
    """The README's table: ResNet-18 and ResNet-50 without attention, with SE and with CBAM."""
    lines = ["| network | attention | params (M) | paper | GMACs | paper |", "|---|---|---|---|---|---|"]
    for row in TABLE4:
        if row.arch in ("resnet18", "resnet50") and row.attention in ("none", "se", "cbam"):
            params, gmacs = measure(row.arch, row.attention)
            lines.append(
                f"| {row.arch} | {row.attention} | {params:.3f} | {_fmt(row.params_m, 2)} | {gmacs:.4f} | "
                f"{_fmt(row.gmacs, 3)} |"
            )
    return "\n".join(lines)


def rewrite_readme(readme: Path = README) -> None:
    """Replace the table between the README's markers with ``readme_table()``."""
    text = readme.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not (start and end):
        raise SystemExit(f"{readme} lacks the markers {README_START!r} ... {README_END!r}")
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{start}\n{readme_table()}\n{end}{tail}")
    tmp.replace(readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", nargs="?", choices=ARCHS, help="model name (omit for the paper table)")
    parser.add_argument("attention", nargs="*", help=f"presets (default: all): {', '.join(PRESETS)}")
    parser.add_argument("--v1.5", dest="v1", action="store_false", help="stride in the 3x3 conv (torchvision)")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (MobileNet alpha)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table of ResNet-18/50")
    args = parser.parse_args(argv)
    if args.readme:
        rewrite_readme()
        print(f"{README}: table rewritten")
        return 0
    if args.arch is None:
        print(paper_table())
        return 0
    unknown = [a for a in args.attention if a not in PRESETS]
    if unknown:
        parser.error(f"unknown attention preset(s) {unknown}; valid: {', '.join(PRESETS)}")
    print("| network | attention | params (M) | GMACs |\n|---|---|---|---|")
    for attention in args.attention or list(PRESETS):
        params, gmacs = measure(args.arch, attention, args.width, args.v1, args.image_size)
        print(f"| {args.arch} | {attention} | {params:.3f} | {gmacs:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
