"""Backbones: torchvision parity, the paper's Table 4 counts, every preset in every backbone."""

import importlib.util

import pytest
import torch
import torchvision

from analysis.paper import TABLE4
from analysis.profile import count_gmacs, count_params
from cbam import PRESETS, AttentionSpecError
from helpers import ROOT
from models import ARCHS, backbone_options, create_model

TORCHVISION_EQUIVALENT = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    # torchvision ships no 32x4d ResNeXt-101; its ResNet class builds the same network.
    "resnext101_32x4d": lambda: torchvision.models.ResNet(
        torchvision.models.resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4
    ),
}


@pytest.mark.parametrize("arch", list(TORCHVISION_EQUIVALENT))
def test_param_count_equals_torchvision(arch):
    ours = create_model(arch, attention="none", stride_in_1x1=False)
    theirs = TORCHVISION_EQUIVALENT[arch]()
    assert count_params(ours) == count_params(theirs)
    # Same tensors in the same shapes, not just the same total.
    assert sorted(p.shape for p in ours.state_dict().values()) == sorted(p.shape for p in theirs.state_dict().values())


def test_v15_forward_equals_torchvision_resnet50():
    """Loading torchvision's weights gives torchvision's outputs: same graph, not just same sizes."""
    theirs = torchvision.models.resnet50().eval()
    ours = create_model("resnet50", stride_in_1x1=False).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize(
    "row", [r for r in TABLE4 if r.params_m is not None or r.gmacs is not None], ids=lambda r: f"{r.arch}-{r.attention}"
)
def test_table4_counts_in_paper_convention(row):
    model = create_model(row.arch, 1000, row.attention, stride_in_1x1=True)
    if row.params_m is not None:
        assert abs(count_params(model) / 1e6 - row.params_m) <= 0.005
    if row.gmacs is not None:
        assert round(count_gmacs(model), 3) == row.gmacs  # the paper's column, to its last digit


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_macs_are_the_architecture_s_whatever_the_implementation(impl):
    """The paper applies Eq. (2)'s shared MLP to each pooled vector: W0 (C -> C/16) and W1 (C/16 -> C)
    twice per block, whatever algebra the implementation uses."""
    cbam = create_model("resnet50", attention={"preset": "cbam", "impl": impl}, stride_in_1x1=True)
    spatial = create_model("resnet50", attention={"preset": "spatial", "impl": impl}, stride_in_1x1=True)
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # the 16 bottlenecks' output channels
    mlp = sum(2 * 2 * c * (c // 16) for c in widths)
    assert count_gmacs(cbam) * 1e9 == pytest.approx(count_gmacs(spatial) * 1e9 + mlp, abs=0.5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_table4_se_and_cbam_rows_for_resnet18_and_50(arch):
    """Paper: ResNet-50 +SE / +CBAM 28.09M, 3.860 / 3.864 GMACs; ResNet-18 baseline 11.69M, 1.814."""
    expected = {r.attention: r for r in TABLE4 if r.arch == arch}
    for attention in ("none", "se", "cbam"):
        row = expected[attention]
        model = create_model(arch, attention=attention, stride_in_1x1=True)
        if row.params_m is not None:
            assert abs(count_params(model) / 1e6 - row.params_m) <= 0.005, attention
        if row.gmacs is not None:
            assert abs(count_gmacs(model) - row.gmacs) <= 0.001, attention


def test_v1_and_v15_differ_only_in_macs():
    v1, v15 = create_model("resnet50", stride_in_1x1=True), create_model("resnet50", stride_in_1x1=False)
    assert count_params(v1) == count_params(v15)
    assert round(count_gmacs(v1), 3) == 3.858 and round(count_gmacs(v15), 3) == 4.089


def test_attention_sits_in_every_block_with_block_output_width():
    model = create_model("resnet50", attention="cbam")
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert len(blocks) == 16
    for block in blocks:
        assert block.attn.channel_gate.mlp[0].in_features == block.bn3.num_features


def test_wrn_and_width_and_stems():
    wrn = create_model("wrn18_2")
    assert wrn.conv1.out_channels == 64 and wrn.layer4[0].conv1.out_channels == 1024
    slim = create_model("resnet18", 10, "cbam", in_chans=1, stem="cifar", width=0.25)
    assert slim.conv1.in_channels == 1 and slim.conv1.out_channels == 16 and slim.conv1.stride == (1, 1)
    assert isinstance(slim.maxpool, torch.nn.Identity)
    assert slim(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_zero_init_residual():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.detach().abs().sum().item() == 0 for b in model.layer1)
    model = create_model("resnet18", zero_init_residual=True)
    assert all(b.bn2.weight.detach().abs().sum().item() == 0 for b in model.layer1)


def test_backbone_init_leaves_attention_init_alone():
    model = create_model("resnet18", attention="cbam")
    assert model.layer1[0].attn.spatial_gate.bn.weight.item() == 0.0


def test_bad_model_options():
    with pytest.raises(ValueError, match="unknown model 'resnet51'; valid models: resnet18"):
        create_model("resnet51")
    with pytest.raises(ValueError, match="stem='tiny' is not valid"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(AttentionSpecError, match="leaves no hidden units"):
        create_model("resnet18", attention="cbam", width=0.1, stem="cifar")


@pytest.mark.parametrize("placement", ["residual", "pre", "post"])
def test_placements_run(placement):
    model = create_model("resnet50", 10, {"preset": "cbam", "placement": placement}, stem="cifar", width=0.25)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def _forward_backward(arch, preset, size, stem):
    """A quarter of the backbone's width (WRN's stages stay twice ResNet's): the blocks and where each preset
    sits in them are the full network's, at a sixteenth of the compute. test_param_count_equals_torchvision
    and the Table 4 test build the full widths."""
    width = backbone_options(arch).get("width", 1.0) / 4
    model = create_model(arch, 10, preset, stem=stem, width=width)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# Every preset in one backbone of each kind of block: basic (ResNet-18), wide basic (WRN-18 x2), bottleneck
# (ResNet-50), grouped bottleneck (ResNeXt-50), depthwise-separable (MobileNet v1); the deeper ResNets and
# ResNeXt-101 repeat those blocks. Every backbone runs with CBAM below.
BLOCK_KINDS = ("resnet18", "wrn18_2", "resnet50", "resnext50_32x4d", "mobilenet_v1")
# The paper's variants; the modules CBAM is compared with (BAM, timm's layers) are test_attention_zoo's.
PAPER_PRESETS = [name for name, spec in PRESETS.items() if spec.module == "cbam"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
@pytest.mark.parametrize("arch", BLOCK_KINDS)
def test_every_preset_in_every_kind_of_block_cifar_size(arch, preset):
    _forward_backward(arch, preset, 32, "cifar")


# At 224 px with the ImageNet stem: every backbone with CBAM and every preset in ResNet-50 (the stem and
# the map sizes do not depend on the preset).
@pytest.mark.parametrize(
    "arch, preset", [(arch, "cbam") for arch in ARCHS] + [("resnet50", p) for p in PAPER_PRESETS if p != "cbam"]
)
def test_backbones_and_presets_at_imagenet_size(arch, preset):
    _forward_backward(arch, preset, 224, "imagenet")


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_torch_jit_trace_records_the_reference(impl):
    """TorchScript tracing of a CBAM model with the default implementation: the traced module gives the
    eager model's outputs (the fused Function is skipped while tracing)."""
    model = create_model("resnet18", 10, {"preset": "cbam", "impl": impl}, width=0.25, stem="cifar").eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)  # another batch than the traced one
    torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_readme_table_is_model_tables_output():
    """The README's params/GMACs table is generated (``python scripts/model_table.py --readme``), not typed."""
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    readme = (ROOT / "README.md").read_text()
    block = readme.split(model_table.README_START)[1].split(model_table.README_END)[0]
    assert block.strip() == model_table.readme_table()
    assert "| resnet50 | cbam | 28.090 | 28.09 | 3.8644 | 3.864 |" in block
