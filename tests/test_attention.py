"""CBAM gates against a direct, independent transcription of the paper's equations (2) and (3)."""

import pytest
import torch
import torch.nn.functional as F

from cbam import CBAM, PRESETS, AttentionSpecError, ChannelGate, SpatialGate, build_attention
from cbam.modules import AttentionModule


# ---- independent implementation: explicit formulas, no code shared with cbam/ -------------------
def mlp(v, gate):
    w1, b1 = gate.mlp[0].weight, gate.mlp[0].bias
    w2, b2 = gate.mlp[2].weight, gate.mlp[2].bias
    return torch.relu(v @ w1.T + b1) @ w2.T + b2


def ref_channel(x, gate, pool):
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    avg, mx = flat.sum(-1) / (h * w), flat.max(-1).values
    logits = {"avg": mlp(avg, gate), "max": mlp(mx, gate), "avgmax": mlp(avg, gate) + mlp(mx, gate)}[pool]
    return 1 / (1 + torch.exp(-logits))[:, :, None, None]  # Eq. (2)


def ref_spatial(x, gate):
    if gate.project is not None:
        desc = torch.einsum("nchw,c->nhw", x, gate.project.weight[0, :, 0, 0])[:, None]
    else:
        desc = torch.stack([x.max(1).values, x.sum(1) / x.shape[1]], 1)
    y = F.conv2d(desc, gate.conv.weight, gate.conv.bias, padding=gate.conv.kernel_size[0] // 2)
    if gate.bn is not None:  # training-mode BN by hand: biased batch variance
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + gate.bn.eps) * gate.bn.weight + gate.bn.bias
    return 1 / (1 + torch.exp(-y))  # Eq. (3)


def ref_cbam(x, m: CBAM, pool):
    if m.order == "channel_first":
        f1 = ref_channel(x, m.channel_gate, pool) * x
        return ref_spatial(f1, m.spatial_gate) * f1  # Eq. (1)
    if m.order == "spatial_first":
        f1 = ref_spatial(x, m.spatial_gate) * x
        return ref_channel(f1, m.channel_gate, pool) * f1
    mc, ms = ref_channel(x, m.channel_gate, pool), ref_spatial(x, m.spatial_gate)
    return x * mc * ms if m.parallel_combine == "mul" else x * (mc + ms) / 2


def randomize(module):
    """Random values everywhere, including the zero-initialised spatial BN gamma."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


# ---- forward against the equations ---------------------------------------------------------------
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_channel_gate_matches_eq2(pool):
    gate = randomize(ChannelGate(32, reduction=4, pool=pool))
    x = torch.randn(3, 32, 5, 6)
    torch.testing.assert_close(gate(x), ref_channel(x, gate, pool) * x)


@pytest.mark.parametrize("descriptor", ["pool", "conv1x1"])
@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("bn", [True, False])
def test_spatial_gate_matches_eq3(descriptor, kernel_size, bn):
    gate = randomize(SpatialGate(16, kernel_size, descriptor, bn=bn))
    x = torch.randn(4, 16, 9, 8)
    torch.testing.assert_close(gate(x), ref_spatial(x, gate) * x)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("cbam")])
@pytest.mark.parametrize("combine", ["mul", "add"])
def test_cbam_matches_eq1(preset, combine):
    m = build_attention(64, {"preset": preset, "parallel_combine": combine})
    randomize(m)
    x = torch.randn(2, 64, 7, 7)
    torch.testing.assert_close(m(x), ref_cbam(x, m, "avgmax"))


def test_parallel_combines_differ():
    x = torch.randn(2, 32, 6, 6)
    mul = randomize(build_attention(32, "cbam_parallel"))
    add = build_attention(32, {"preset": "cbam_parallel", "parallel_combine": "add"})
    add.load_state_dict(mul.state_dict())
    assert not torch.allclose(mul(x), add(x))


def test_spatial_bn_zero_init_starts_at_half():
    """The reference code's gamma = 0: the spatial map is a flat 0.5 at init."""
    gate = SpatialGate(8)
    assert torch.allclose(gate.attention(torch.randn(2, 8, 5, 5)), torch.full((2, 1, 5, 5), 0.5))
    gate = SpatialGate(8, bn_zero_init=False)
    assert not torch.allclose(gate.attention(torch.randn(2, 8, 5, 5)), torch.full((2, 1, 5, 5), 0.5))


def test_none_is_identity_and_presets_pick_the_right_modules():
    assert isinstance(build_attention(8, "none"), torch.nn.Identity)
    assert isinstance(build_attention(32, "se"), ChannelGate) and build_attention(32, "se").pool == "avg"
    assert isinstance(build_attention(32, "spatial"), SpatialGate)
    m = build_attention(32, "cbam")
    assert isinstance(m, CBAM) and m.order == "channel_first" and m.spatial_gate.conv.kernel_size == (7, 7)
    assert build_attention(32, "cbam_conv1x1_k3").spatial_gate.project is not None


# ---- gradients -----------------------------------------------------------------------------------
def _gates():
    torch.manual_seed(0)  # fixed weights: gradcheck's tolerances then hold for the same gates every run
    yield "channel_avg", ChannelGate(8, 2, "avg")
    yield "channel_max", ChannelGate(8, 2, "max")
    yield "channel_avgmax", ChannelGate(8, 2, "avgmax")
    yield "spatial_pool", SpatialGate(8, 3, bn_zero_init=False)
    yield "spatial_conv1x1", SpatialGate(8, 3, "conv1x1", bn_zero_init=False)
    for order in ["channel_first", "spatial_first", "parallel"]:
        yield f"cbam_{order}", CBAM(8, 2, kernel_size=3, order=order, spatial_bn_zero_init=False)


@pytest.mark.parametrize("name,gate", list(_gates()), ids=[n for n, _ in _gates()])
def test_gradcheck_double(name, gate):
    gate = gate.double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.double, requires_grad=True)
    params = tuple(gate.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(
            gate, {n: p for (n, _), p in zip(gate.named_parameters(), ps, strict=True)}, (x,)
        )

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().requires_grad_() for p in params]))


# ---- bad specs are refused at construction -------------------------------------------------------
def test_unknown_preset_lists_valid_ones():
    with pytest.raises(AttentionSpecError, match="unknown attention preset 'cbamm'.*cbam_spatial_first"):
        build_attention(64, "cbamm")


def test_reduction_leaving_no_hidden_units():
    with pytest.raises(AttentionSpecError, match="leaves no hidden units.*8 channels"):
        build_attention(8, {"preset": "cbam", "reduction": 16})
    with pytest.raises(AttentionSpecError, match="reduction must be an integer >= 1"):
        build_attention(8, {"preset": "se", "reduction": 0})


@pytest.mark.parametrize("k", [0, 4, 6, -3])
def test_even_or_nonpositive_kernel(k):
    with pytest.raises(AttentionSpecError, match="kernel_size must be a positive odd integer"):
        build_attention(64, {"preset": "cbam", "kernel_size": k})


def test_unknown_pooling_and_fields():
    with pytest.raises(AttentionSpecError, match="pool='median' is not valid; allowed: avg, max, avgmax"):
        build_attention(64, {"preset": "cbam", "pool": "median"})
    with pytest.raises(AttentionSpecError, match="pool='median'"):
        ChannelGate(64, pool="median")
    with pytest.raises(AttentionSpecError, match="unknown attention field"):
        build_attention(64, {"preset": "cbam", "kernal_size": 3})


def test_attention_modules_are_marked():
    """This project's gates are AttentionModules (backbones leave their init to them); timm's layers and
    BAM (between stages, so nothing in a block) are not."""
    for name, spec in PRESETS.items():
        m = build_attention(64, name)
        assert isinstance(m, AttentionModule) == (spec.module == "cbam" and name != "none")
