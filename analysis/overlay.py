"""Heat maps drawn over their images: each map normalised to [0, 1] on its own (or all on one fixed
scale), upsampled to the image, coloured with a matplotlib colormap and blended with the image (grey
inputs are shown as grey RGB); a colour bar beside a grid of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """(N, h, w) maps, each scaled to [0, 1] by its own minimum and maximum (a flat map becomes 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1).view(-1, 1, 1), flat.amax(dim=1).view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def colorize(maps01: torch.Tensor, cmap: str = "jet") -> torch.Tensor:
    """(N, h, w) values in [0, 1] -> (N, 3, h, w) RGB in [0, 1] through a matplotlib colormap (a NaN, from a
    diverged model, as 0)."""
    from matplotlib import colormaps

    table = torch.tensor(colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    index = (maps01.nan_to_num(0.0).clamp(0, 1) * 255).round().long().cpu()
    return table[index].permute(0, 3, 1, 2)


def overlay(
    images01: torch.Tensor,
    maps: torch.Tensor,
    alpha: float = 0.5,
    cmap: str = "jet",
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] (C = 1 or 3) and (N, h, w) maps -> (N, 3, H, W) blends in [0, 1]:
    each map normalised on its own (or, with ``value_range``, all on that one scale), bilinearly upsampled to
    H x W, coloured, blended with weight ``alpha``."""
    images01 = images01.detach().float().cpu()
    up = F.interpolate(
        maps.detach().float().cpu()[:, None], size=images01.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    if value_range is None:
        scaled = normalise(up)
    else:
        lo, hi = value_range
        scaled = (up - lo) / (hi - lo)
    heat = colorize(scaled, cmap)
    rgb = images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01
    return (1 - alpha) * rgb + alpha * heat


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Normalised network inputs back to [0, 1] for display, each image by its own range."""
    flat = images.detach().float().flatten(1)
    lo, hi = flat.amin(dim=1).view(-1, 1, 1, 1), flat.amax(dim=1).view(-1, 1, 1, 1)
    return ((images.detach().float() - lo) / (hi - lo).clamp_min(1e-12)).cpu()


def with_colour_bar(grid: torch.Tensor, cmap: str = "jet", width: int = 6, gap: int = 2) -> torch.Tensor:
    """A (3, H, W) image with the colormap's bar at its right edge: the low end at the bottom, the high end at
    the top, over the image's full height."""
    height = grid.shape[-2]
    bar = colorize(torch.linspace(1, 0, height).view(1, height, 1).expand(1, height, width), cmap)[0]
    return torch.cat([grid, torch.ones(3, height, gap), bar], dim=-1)
