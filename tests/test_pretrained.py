"""Pretrained weights: torchvision's and timm's ImageNet backbones into any attention variant, this
project's checkpoints, and the CBAM authors' released checkpoint layout. No downloads: the tests build
the source state dicts themselves."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import create_model
from models import pretrained as pretrained_mod
from models.pretrained import PretrainedError


def _serve(monkeypatch, source: str, model: nn.Module):
    """Make ``source`` ("torchvision" or "timm") hand out ``model``'s weights instead of downloading."""
    state = model.state_dict()
    real = pretrained_mod._source_state_dict
    monkeypatch.setattr(pretrained_mod, "_source_state_dict", lambda arch, s: state if s == source else real(arch, s))


@pytest.mark.parametrize("attention", ["none", "se", "cbam", "cbam_spatial_first"])
def test_torchvision_backbone_into_any_attention_variant(monkeypatch, attention):
    theirs = torchvision.models.resnet50().eval()
    _serve(monkeypatch, "torchvision", theirs)
    torch.manual_seed(3)
    fresh = create_model("resnet50", attention=attention)
    torch.manual_seed(3)
    ours = create_model("resnet50", attention=attention, pretrained="torchvision").eval()
    own = ours.state_dict()
    for k, v in theirs.state_dict().items():
        assert torch.equal(own[k], v), k
    for k, v in fresh.state_dict().items():  # attention: its own initialisation
        if ".attn." in k:
            assert torch.equal(own[k], v), k
    if attention == "none":  # the same network: the same outputs
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(ours(x), theirs(x))


def test_another_class_count_reinitialises_the_classifier(monkeypatch):
    source = timm.create_model("resnet18")
    _serve(monkeypatch, "timm", source)
    torch.manual_seed(5)
    fresh_fc = create_model("resnet18", 10, "cbam").fc.weight
    torch.manual_seed(5)
    model = create_model("resnet18", 10, "cbam", pretrained="timm")
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (10, 512) and torch.equal(model.fc.weight, fresh_fc)  # initialised, not loaded


def test_backbones_without_such_weights_are_refused():
    with pytest.raises(PretrainedError, match="torchvision has no ImageNet weights for 'wrn18_2'"):
        create_model("wrn18_2", pretrained="torchvision")
    with pytest.raises(PretrainedError, match="neither torchvision, timm nor an existing checkpoint file"):
        create_model("resnet18", pretrained="/nonexistent.pt")


def test_weights_of_another_network_are_refused_naming_the_keys(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(PretrainedError, match="does not fit resnet50: shape differs: .*missing from the weights"):
        create_model("resnet50", pretrained=str(tmp_path / "r18.pt"))


# ---- the authors' module structure (Jongchan/attention-module, MODELS/cbam.py and model_resnet.py), rebuilt
# here from its description so that its state dict and its outputs are independent of this project's code.
class OfficialChannelGate(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        att = self.mlp(F.avg_pool2d(x, x.shape[2:])) + self.mlp(F.max_pool2d(x, x.shape[2:]))
        return x * torch.sigmoid(att)[:, :, None, None]


class OfficialBasicConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class OfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = OfficialBasicConv()

    def forward(self, x):
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class OfficialCBAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(c)
        self.SpatialGate = OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


def official_resnet50_cbam() -> nn.Module:
    """torchvision's ResNet-50 (the authors' layout: v1.5, same names) with ``cbam`` after each bn3."""
    net = torchvision.models.resnet50()
    for block in [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]:
        block.cbam = OfficialCBAM(block.bn3.num_features)
        block.bn3.register_forward_hook(lambda mod, inp, out, b=block: b.cbam(out))
    return net


def test_the_authors_checkpoint_layout_gives_the_authors_outputs(tmp_path):
    torch.manual_seed(0)
    official = official_resnet50_cbam()
    with torch.no_grad():  # trained-looking statistics and gates, not the initial ones
        for m in official.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    official.eval()
    state = {f"module.{k}": v for k, v in official.state_dict().items()}  # saved from DataParallel
    assert "module.layer1.0.cbam.ChannelGate.mlp.1.weight" in state
    assert "module.layer4.2.cbam.SpatialGate.spatial.bn.running_var" in state
    torch.save({"epoch": 100, "arch": "resnet", "state_dict": state, "best_prec1": 77.622}, tmp_path / "official.pth")
    ours = create_model("resnet50", attention="cbam", pretrained=str(tmp_path / "official.pth")).eval()
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_this_project_loads(tmp_path):
    from engine import checkpoint as ckpt_io

    source = create_model("resnet18", 10, "se", stem="cifar", width=0.25)
    ckpt_io.save_atomic({"model": source.state_dict(), "config": {}}, tmp_path / "last.pt")
    loaded = create_model("resnet18", 10, "se", stem="cifar", width=0.25, pretrained=str(tmp_path / "last.pt"))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.slow
def test_train_py_starts_from_pretrained_weights(tmp_path):
    """model.pretrained=PATH in train.py's config; the run's first checkpoint holds them, trained on."""
    from helpers import TINY, train_here

    first = train_here(tmp_path / "first", "experiment=smoke", *TINY, "trainer.epochs=1", "trainer.image_every=0")
    second = train_here(
        tmp_path / "second",
        "experiment=smoke",
        *TINY,
        "trainer.epochs=1",
        "trainer.image_every=0",
        f"model.pretrained={tmp_path / 'first' / 'checkpoints' / 'last.pt'}",
    )
    assert second["history"][0]["train"]["loss"] < first["history"][0]["train"]["loss"]
