"""Named recipes against the sources they reproduce."""

import dataclasses

import numpy as np
import pytest
import torch

from engine.data import eval_geometry
from engine.data.geometry import train_resolution
from engine.network import build_model
from engine.optim import build_optimizer, build_scheduler
from helpers import compose


def ffcv_lr(epoch: float, lr: float, epochs: int, peak: int = 2) -> float:
    """ffcv-imagenet's train_imagenet.py, get_cyclic_lr, interpolated within epochs as its train loop does."""
    return float(np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0])


def ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """ffcv-imagenet's get_resolution."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("epochs, ramp", [(16, (11, 13)), (88, (65, 76))])
def test_imagenet_fast_is_ffcvs_resnet50_recipe(epochs, ramp):
    config = compose(f"experiment=imagenet_fast/{epochs}_epochs", "attention=cbam", "data.root=/data")
    d, t, o = config.data, config.trainer, config.optim
    assert config.model.arch == "resnet50" and config.attention.name == "cbam"
    assert (t.epochs, t.batch_size, t.label_smoothing, t.eval_flip) == (epochs, 8 * 512, 0.1, True)
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov) == ("sgd", 1.7, 0.9, 1e-4, False)
    assert d.format == "shards"
    for epoch in range(epochs):
        size = train_resolution(epoch, d.image_size, d.progressive_from, tuple(d.progressive_epochs))
        assert size == ffcv_resolution(epoch, 160, 192, ramp[1], ramp[0])
    assert eval_geometry(d) == (293, 256) and abs(224 / 256 - 256 / 293) < 0.002  # FFCV: 224/256 crop, at 256

    model = build_model(config, pretrained=False)
    optimizer = build_optimizer(model, o)
    steps = 10  # per epoch
    scheduler = build_scheduler(optimizer, config.sched, epochs, steps)
    for step in [0, 1, 5, 19, 20, 21, 100, epochs * steps // 2, epochs * steps - 1]:
        scheduler.step_update(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(ffcv_lr(step / steps, 1.7, epochs), rel=1e-6, abs=1e-9)

    # no weight decay on BatchNorm (FFCV: parameters named "bn"); here none on any norm layer or bias
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    # BlurPool where FFCV's apply_blurpool puts it: strided convs of 16 or more input channels
    blurred = [n for n, m in model.named_modules() if type(m).__name__ == "BlurConv2d"]
    expected = [
        n
        for n, m in build_model(
            dataclasses.replace(config, model=dataclasses.replace(config.model, blurpool=False)), pretrained=False
        ).named_modules()
        if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= 16
    ]
    assert blurred == expected and len(blurred) == 6


def test_blurpool_blurs_before_the_conv_and_keeps_the_weights_names():
    from models import create_model
    from models.blurpool import BlurConv2d

    plain, blurred = (create_model("resnet18", 10, "cbam", blurpool=b) for b in (False, True))
    assert plain.state_dict().keys() == blurred.state_dict().keys()
    blurred.load_state_dict(plain.state_dict())
    conv = blurred.layer2[0].conv1
    assert isinstance(conv, BlurConv2d)
    x = torch.randn(2, conv.in_channels, 9, 9)
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    blur = torch.nn.functional.conv2d(x, kernel.expand(conv.in_channels, 1, 3, 3), padding=1, groups=conv.in_channels)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(blur, conv.weight, stride=2, padding=1))
