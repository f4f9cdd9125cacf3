"""The hand-written CPU evaluation kernel (cbam/fused/cpu_tail.cpp) against the reference modules: every
order it takes, with and without the block's BN, the shortcut, the spatial BN and the conv bias, odd
channel counts, maps smaller than the conv, output written into x, NaN; which calls it takes; and a
toolchain that cannot build it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from cbam import PRESETS, build_attention
from cbam.fused import compiler, cpu_tail, function
from cbam.fused.graphs import TailConfig
from models import create_model

pytestmark = pytest.mark.skipif(cpu_tail.library() is None, reason="needs a C++ compiler (as inductor does)")

KERNEL_VARIANTS = ["se", "channel_max", "channel", "spatial", "cbam", "cbam_parallel"]


@pytest.fixture(autouse=True)
def _several_threads():
    """The kernel splits the batch between threads: at least two, whatever OMP_NUM_THREADS says (CI sets 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Fused graphs as in a normal run (compiled mode), the graph itself forbidden, kernel calls counted."""
    monkeypatch.setattr(compiler, "KERNEL_MODE", "compiled")
    calls = []

    def no_graph(*args, **kwargs):
        raise AssertionError("the compiled graph ran where the CPU kernel should have")

    original = cpu_tail.spatial_output
    monkeypatch.setattr(function, "tail_forward", no_graph)
    monkeypatch.setattr(cpu_tail, "spatial_output", lambda *a: calls.append(a[1].shape) or original(*a))
    return calls


def _modules(name: str, channels: int, kernel_size: int, spatial_bn: bool, seed: int = 0):
    """(reference, fused) gates with equal random weights, and an eval BN with random statistics."""
    torch.manual_seed(seed)
    spec = dataclasses.replace(
        PRESETS[name], reduction=4, kernel_size=kernel_size, spatial_bn=spatial_bn, spatial_bn_zero_init=False
    )
    ref = build_attention(channels, dataclasses.replace(spec, impl="reference")).eval()
    fus = build_attention(channels, dataclasses.replace(spec, impl="fused")).eval()
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        for m in [*ref.modules(), bn]:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)  # negative gammas too: MaxPool of F comes from x's minimum
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    fus.load_state_dict(ref.state_dict())
    return ref, fus, bn


def _batch() -> int:
    return torch.get_num_threads() + 1  # at least one image per thread, split unevenly


def _assert_close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max |kernel - reference| = {err:.3g}"


@pytest.mark.parametrize("spatial_bn", [True, False], ids=["spatial_bn", "conv_bias"])
@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("name", KERNEL_VARIANTS)
def test_kernel_matches_reference(name, kernel_size, spatial_bn, kernel_calls):
    """Block tail, standalone module, and output written into x; 19 channels, a 9x6 map."""
    ref, fus, bn = _modules(name, 19, kernel_size, spatial_bn)
    shape = (_batch(), 19, 9, 6)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    sc = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, expected_alone = torch.relu(ref(bn(x)) + sc), ref(x)
        tail, alone = fus.forward_tail(x, bn, sc), fus(x)
        x_reused = x.clone()
        in_place = fus.forward_tail(x_reused, bn, sc, producer=torch.nn.Identity())
    assert kernel_calls == [shape] * 3
    _assert_close(tail, expected, "block tail")
    _assert_close(alone, expected_alone, "module without BN and shortcut")
    assert in_place.data_ptr() == x_reused.data_ptr()
    _assert_close(in_place, expected, "block tail written into x")


@pytest.mark.parametrize("height,width", [(2, 3), (1, 1), (5, 1)])
def test_maps_smaller_than_the_conv(height, width, kernel_calls):
    """A 7x7 conv on maps of a few positions is all padding but the middle."""
    ref, fus, bn = _modules("cbam", 24, 7, True)
    x = torch.randn(_batch(), 24, height, width).contiguous(memory_format=torch.channels_last)
    sc = torch.randn_like(x)
    with torch.no_grad():
        _assert_close(fus.forward_tail(x, bn, sc), torch.relu(ref(bn(x)) + sc), f"{height}x{width} map")
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("name", ["channel_max", "cbam"])
def test_nan_propagates_like_the_reference(name, kernel_calls):
    """torch.amax propagates NaN; the kernel's max loops skip it, then redo a NaN channel (channel_max_with_nan)."""
    ref, fus, bn = _modules(name, 16, 7, True)
    x = torch.randn(_batch(), 16, 8, 8)
    x[0, 3, 2, 5] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    sc = torch.randn_like(x)
    with torch.no_grad():
        expected, actual = torch.relu(ref(bn(x)) + sc), fus.forward_tail(x, bn, sc)
    assert torch.equal(actual.isnan(), expected.isnan()) and actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_whole_network_matches_reference(kernel_calls):
    """A small ResNet-18 + CBAM in evaluation: every block's tail by the kernel, logits as the reference's."""
    torch.manual_seed(0)
    ref = create_model("resnet18", 10, {"preset": "cbam", "impl": "reference"}, in_chans=1, stem="cifar", width=0.25)
    fus = create_model("resnet18", 10, "cbam", in_chans=1, stem="cifar", width=0.25)
    with torch.no_grad():
        for m in ref.modules():  # trained-looking statistics and non-zero spatial BN
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.running_var.uniform_(0.5, 1.5), m.running_mean.uniform_(-0.2, 0.2)
    fus.load_state_dict(ref.state_dict())
    ref.eval(), fus.eval()
    x = torch.randn(_batch(), 1, 28, 28).contiguous(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last), fus.to(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_close(fus(x), ref(x), "logits")
    assert len(kernel_calls) == 8  # ResNet-18: eight blocks


def test_which_calls_the_kernel_takes():
    """Evaluation of float32 channels_last maps with at least one image per thread; the rest runs the graph."""
    _, fus, bn = _modules("cbam", 16, 7, True)
    plan = fus.fused_plan(bn)
    x = torch.randn(_batch(), 16, 6, 6).contiguous(memory_format=torch.channels_last)
    sc = torch.randn_like(x)
    evaluation = plan.config(record=False)
    assert cpu_tail.applicable(evaluation, x, sc)
    assert cpu_tail.applicable(evaluation, x, None)
    assert not cpu_tail.applicable(plan.config(record=True), x, sc), "training records for backward"
    assert not cpu_tail.applicable(evaluation, x.contiguous(), sc), "NCHW"
    assert not cpu_tail.applicable(evaluation, x.double(), sc.double()), "float64"
    assert not cpu_tail.applicable(evaluation, x, sc.contiguous()), "shortcut in another layout"
    assert not cpu_tail.applicable(evaluation, x, sc.bfloat16()), "shortcut in another dtype"
    spatial_first = TailConfig(**{**dataclasses.asdict(evaluation), "order": "spatial_first"})
    assert not cpu_tail.applicable(spatial_first, x, sc), "spatial_first pools F * Ms: not in the kernel"
    bn.train()
    assert not cpu_tail.applicable(plan.config(record=False), x, sc), "batch statistics"
    if torch.get_num_threads() > 1:
        assert not cpu_tail.applicable(evaluation, x[:1], sc[:1]), "fewer images than threads"


def test_build_failure_falls_back_and_says_why(monkeypatch, tmp_path, caplog):
    """A compiler that fails: a warning once, no kernel, no file left behind; the graph path still answers."""
    monkeypatch.setattr(cpu_tail, "cpp_compiler", lambda: "/bin/false")
    monkeypatch.setenv("CBAM_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_tail.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="cbam.fused.cpu_tail"):
            assert cpu_tail.library() is None
        assert "could not be built" in caplog.text
        assert list((tmp_path / "cache").iterdir()) == []
        _, fus, bn = _modules("cbam", 16, 7, True)
        x = torch.randn(_batch(), 16, 6, 6).contiguous(memory_format=torch.channels_last)
        assert not cpu_tail.applicable(fus.fused_plan(bn).config(record=False), x, None)
    finally:
        cpu_tail.library.cache_clear()


def test_build_is_cached_by_source(monkeypatch, tmp_path):
    """Built once into the cache folder (one shared object, no temporary left), then reused."""
    monkeypatch.setenv("CBAM_KERNEL_CACHE", str(tmp_path))
    cpu_tail.library.cache_clear()
    try:
        assert cpu_tail.library() is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        mtime = built[0].stat().st_mtime_ns
        cpu_tail.library.cache_clear()
        assert cpu_tail.library() is not None
        assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == mtime
    finally:
        cpu_tail.library.cache_clear()
