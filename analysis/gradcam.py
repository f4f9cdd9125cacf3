"""Grad-CAM (Selvaraju et al., ICCV 2017), the paper's tool for showing what attention changes (Fig. 4):
the class-discriminative localisation map of a layer, computed with hooks on the real model.

For class c and the layer's output A (K channels), alpha_k = mean over positions of dy_c / dA_k and the map
is ReLU(sum_k alpha_k A_k), where y_c is the class's logit (the score before the softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GradCam:
    """Per image: the map at the layer's resolution (N, h, w), not normalised; the class it explains and
    that class's softmax score."""

    maps: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor


def last_stage(model: nn.Module) -> nn.Module:
    """The layer whose output Grad-CAM explains: the last convolutional stage before global pooling
    (``layer4`` of a ResNet, ``features`` of MobileNet v1), as in the paper's Fig. 4."""
    for name in ("layer4", "features"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(f"{type(model).__name__} has no last stage named layer4 or features; pass the layer to explain")


def grad_cam(
    model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None, classes: torch.Tensor | None = None
) -> GradCam:
    """Grad-CAM of ``layer`` (default: ``last_stage(model)``) for ``classes`` (default: each image's
    predicted class). The model runs in eval mode; no parameter's ``.grad`` is touched."""
    layer = layer if layer is not None else last_stage(model)
    saved: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(images).float()
            (activation,) = saved
            if classes is None:
                classes = logits.argmax(dim=1)
            target = logits.gather(1, classes.view(-1, 1)).sum()  # each image's score depends on its own A only
            (grads,) = torch.autograd.grad(target, activation)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # alpha_k
    maps = torch.relu((weights * activation.detach().float()).sum(dim=1))
    scores = logits.detach().softmax(dim=1).gather(1, classes.view(-1, 1)).squeeze(1)
    return GradCam(maps=maps, classes=classes, scores=scores)
