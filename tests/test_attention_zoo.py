"""The modules CBAM is compared with: BAM (built here from its paper) and timm's attention layers, each
selectable as ``attention=<name>`` inside this project's backbones."""

import pytest
import timm.layers
import torch
from timm.layers.cbam import CbamModule, LightCbamModule
from torch.nn import functional as nnf

from analysis.profile import count_params
from cbam import BAM, PRESETS, AttentionSpecError, resolve_spec
from cbam.spec import TIMM_LAYERS
from helpers import compose, load_script, results, train_here
from models import create_model

ZOO = sorted(name for name, spec in PRESETS.items() if spec.module != "cbam")


def test_the_zoo_holds_bam_and_every_fitting_timm_layer():
    assert ZOO == sorted(["bam", "eca", "ecam", "ceca", "ese", "gc", "gca", "lcbam", "timm_se", "timm_cbam"])
    assert {PRESETS[name].module for name in ZOO} == {"bam", *(f"timm_{layer}" for layer in TIMM_LAYERS)}


@pytest.mark.parametrize(
    ("name", "timm_class"),
    [
        ("eca", timm.layers.EcaModule),
        ("ceca", timm.layers.CecaModule),
        ("ese", timm.layers.EffectiveSEModule),
        ("gc", timm.layers.GlobalContext),
        ("lcbam", LightCbamModule),
        ("timm_cbam", CbamModule),
    ],
)
def test_timm_layers_sit_in_every_block_at_the_residual_placement(name, timm_class):
    """timm's own module (not a copy), one per block, gating the residual branch before the addition."""
    model = create_model("resnet50", 10, name, width=0.25)
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    assert all(type(block.attn) is timm_class and block.placement == "residual" for block in blocks)
    block = model.layer2[1].eval()
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))))
        assert torch.allclose(block(x), torch.relu(block.attn(branch) + x), atol=1e-6)


def test_bam_matches_its_paper_equations():
    """F' = F + F * sigmoid(Mc(F) + Ms(F)), Eq. 1-4, computed here with functional ops from BAM's weights."""
    torch.manual_seed(1)
    bam = BAM(64).eval()
    for bn in [m for m in bam.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(3, 64, 9, 9)

    def bn(t, m):
        return nnf.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    fc1, bn1, _, fc2 = bam.channel_gate.mlp
    mc = nnf.linear(nnf.relu(bn(nnf.linear(x.mean((2, 3)), fc1.weight, fc1.bias), bn1)), fc2.weight, fc2.bias)
    convs = bam.spatial_gate.convs
    s = nnf.relu(bn(nnf.conv2d(x, convs[0].weight, convs[0].bias), convs[1]))  # 1x1, C -> C/16
    assert s.shape[1] == 4
    for conv, norm in ((convs[3], convs[4]), (convs[6], convs[7])):  # 3x3, dilation 4, padding 4
        s = nnf.relu(bn(nnf.conv2d(s, conv.weight, conv.bias, padding=4, dilation=4), norm))
    ms = nnf.conv2d(s, convs[9].weight, convs[9].bias)  # 1x1, C/16 -> 1
    expected = x + x * torch.sigmoid(mc[:, :, None, None] + ms)
    with torch.no_grad():
        assert torch.allclose(bam(x), expected, atol=1e-5)


def test_bam_parameter_count_matches_its_paper_for_resnet50_on_imagenet():
    """BAM's paper (Table 4, ImageNet): ResNet-50 25.56M parameters, with BAM 25.92M; three modules at the
    ends of stages 1-3 (256, 512, 1024 channels), none in the blocks."""
    plain, with_bam = create_model("resnet50", 1000, "none"), create_model("resnet50", 1000, "bam")
    assert round(count_params(plain) / 1e6, 2) == 25.56 and round(count_params(with_bam) / 1e6, 2) == 25.92
    assert [type(m).__name__ for m in (with_bam.bam1, with_bam.bam2, with_bam.bam3)] == ["BAM"] * 3
    assert all(type(block.attn).__name__ == "Identity" for block in with_bam.layer4)

    def by_hand(c: int, r: int = 16) -> int:
        channel = c * (c // r) + c // r + 2 * (c // r) + (c // r) * c + c  # fc, BN1d, fc
        spatial = c * (c // r) + c // r + 2 * (c // r)  # 1x1 reduce + BN
        spatial += 2 * (9 * (c // r) ** 2 + c // r + 2 * (c // r))  # two dilated 3x3 + BN
        return channel + spatial + c // r + 1  # final 1x1 to one map

    assert count_params(with_bam) - count_params(plain) == sum(by_hand(c) for c in (256, 512, 1024))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attention=eca", "attention.channel=true"], "channel=True configure"),
        (["attention=bam", "attention.placement=post"], "BAM sits at the end of each stage"),
        (["attention=gc", "attention.impl=fused"], "attention.impl=fused supports CBAM's gates"),
        (["attention=gc", "attention.kernel_size=3"], "gc is timm's layer with timm's defaults"),
    ],
)
def test_fields_that_do_not_apply_to_a_module_are_refused(overrides, message):
    with pytest.raises(AttentionSpecError, match=message):
        compose(*overrides).attention.spec()


def test_bam_in_a_mobilenet_is_refused():
    with pytest.raises(ValueError, match="BAM .* sits between a ResNet's stages"):
        create_model("mobilenet_v1", 10, "bam")
    assert resolve_spec({"preset": "bam", "reduction": 8}).reduction == 8  # BAM's one field


@pytest.mark.parametrize("attention", ZOO)
def test_every_zoo_module_trains_in_the_smoke_experiment(tmp_path, attention):
    """Two steps and an evaluation, attention-map images on (they are CBAM's gates and skip the others)."""
    out = train_here(
        tmp_path,
        "experiment=smoke",
        f"attention={attention}",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    )
    assert out["steps"] == 2 and out["settings"]["attention_impl"] == "reference"
    assert results(tmp_path)["history"][0]["val"]["samples"] == 64
    assert torch.isfinite(torch.tensor(out["history"][0]["train"]["loss"]))


def test_model_table_counts_the_zoo(capsys):
    model_table = load_script("model_table")
    model_table.main(["resnet50", "bam", "eca", "none"])
    rows = [line.split("|")[1:5] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[1].strip() for row in rows] == ["bam", "eca", "none"] and float(rows[0][2]) == 25.915
    (eca, eca_gmacs), (none, none_gmacs) = (
        model_table.measure("resnet50", "eca"),
        model_table.measure("resnet50", "none"),
    )
    # ECA's 1-D conv has k weights, k odd nearest (log2(C) + 1) / 2: 5 for 256-1024 channels, 7 for 2048
    assert round((eca - none) * 1e6) == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7 and eca_gmacs > none_gmacs


def test_the_attention_zoo_sweep_composes_every_job():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from engine.config import register_configs
    from helpers import ROOT

    register_configs()  # the schemas the YAML files name, as train.py registers them
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        sweep = hydra_compose("train", overrides=["experiment=attention_zoo"], return_hydra_config=True)
    names = sweep.hydra.sweeper.params.attention.split(",")
    assert {"none", "se", "cbam", *ZOO} - {"timm_se"} == set(names)
    for name in names:
        config = compose("experiment=attention_zoo", f"attention={name}")
        assert config.model.arch == "resnet50" and config.data.name == "imagenet" and config.trainer.epochs == 90
        assert config.attention.spec() == PRESETS[name]
