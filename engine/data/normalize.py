"""uint8 images to the network's input, on the training device."""

from __future__ import annotations

import torch


class Normalize:
    """``(x - mean) / std`` of uint8 images (0-255; mean and std given for [0, 1] as torchvision's),
    computed in float32 on the device that holds them, then cast to ``dtype`` (the autocast dtype, so
    that the first layer reads the input it would have cast to anyway). Memory format is kept."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, dtype: torch.dtype = torch.float32):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).to(self.dtype)
