#!/usr/bin/env python
"""Where the network looks, as in the paper's Fig. 4: for each image, the input, then for each checkpoint
the Grad-CAM of its last stage (titled with the predicted class and its softmax score) and the spatial
attention maps of chosen blocks, each normalised on its own and drawn over the image with a colormap.

    python scripts/visualize.py runs/none/.../best.pt runs/cbam/.../best.pt --images photos/ --out fig4.png
    python scripts/visualize.py A.pt --images a.png b.png --blocks layer3.1 layer4.1 --labels CBAM

Images are read with the evaluation transform of the data set the checkpoint was trained on. Each row's
predictions are also printed, one line per image and checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from analysis.gradcam import grad_cam
from analysis.overlay import overlay
from cbam.errors import UserError
from engine.images import class_names, image_files, read_images
from engine.network import load_model
from engine.tblog import last_per_resolution, record_attention


def block_name(gate_name: str) -> str:
    """``layer4.1.attn.spatial_gate`` -> ``layer4.1``: the block that a spatial gate belongs to."""
    return gate_name.split(".attn.")[0]


def explain(path: Path, images: list[Path], blocks: list[str] | None, ema: bool = False) -> dict:
    """One checkpoint on the images: its label, predictions, Grad-CAM and spatial maps (block -> maps)."""
    model, config = load_model(path, ema=ema)
    shown, inputs = read_images(images, config.data)
    with torch.no_grad(), record_attention(model) as recorded:
        model(inputs)
    spatial = {block_name(name): maps[:, 0] for name, maps in recorded["spatial"]}
    if blocks is None:  # the last block of each resolution
        spatial = last_per_resolution(list(spatial.items()))
    elif spatial:
        unknown = [b for b in blocks if b not in spatial]
        if unknown:
            have = ", ".join(spatial)
            raise UserError(f"{path}: no spatial attention in block(s) {unknown}; blocks with one: {have}")
        spatial = {b: spatial[b] for b in blocks}
    cam = grad_cam(model, inputs)
    names = class_names(config.data)
    return {
        "label": f"{config.model.arch} + {config.attention.name}",
        "shown": shown,
        "cam": cam,
        "classes": [names[int(c)] for c in cam.classes],
        "spatial": spatial,
    }


def figure(images: list[Path], columns: list[dict], out: Path) -> None:
    """Rows: images; columns: the input, then per checkpoint its Grad-CAM and spatial maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = columns[0]["shown"]
    panels = [("input", None, None)]
    for col in columns:
        panels.append((f"{col['label']}\nGrad-CAM", col, "cam"))
        panels += [(f"{col['label']}\nMs {block}", col, block) for block in col["spatial"]]
    rows = len(images)
    fig, axes = plt.subplots(rows, len(panels), figsize=(1.9 * len(panels), 2.0 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, (title, col, what) in enumerate(panels):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if col is None:
                picture, caption = shown[r : r + 1].expand(-1, 3, -1, -1), images[r].name
            elif what == "cam":
                picture = overlay(col["shown"][r : r + 1], col["cam"].maps[r : r + 1])
                caption = f"{col['classes'][r]}  P={col['cam'].scores[r]:.3f}"
            else:
                picture, caption = overlay(col["shown"][r : r + 1], col["spatial"][what][r : r + 1]), ""
            ax.imshow(picture[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xlabel(caption, fontsize=8)
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(out)  # no half-written figure if saving fails


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints (.pt), one column group each")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png, .pdf or .svg)")
    parser.add_argument(
        "--blocks",
        nargs="+",
        help="blocks whose spatial maps to show, e.g. layer3.1 layer4.1 (default: the last block of each resolution)",
    )
    parser.add_argument("--labels", nargs="+", help="column labels, one per checkpoint (default: arch + attention)")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights (trainer.ema_decay > 0)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels needs one label per checkpoint ({len(args.checkpoints)}), got {len(args.labels)}")
    if args.out.suffix.lower() not in (".png", ".pdf", ".svg"):
        parser.error(f"--out {args.out}: the figure must be .png, .pdf or .svg")
    try:
        images = image_files(args.images)
        columns = [explain(path, images, args.blocks, args.ema) for path in args.checkpoints]
    except UserError as exc:  # CheckpointError, a bad image, an unknown block
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for col, label in zip(columns, args.labels or [], strict=False):
        col["label"] = label
    for i, image in enumerate(images):
        for col in columns:
            print(f"{image.name}\t{col['label']}\t{col['classes'][i]}\t{col['cam'].scores[i]:.4f}")
    figure(images, columns, args.out)
    print(f"figure -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
