"""Compilation never hurts a run: unknown inductor options are left out, a compiler that fails falls
back to the reference with one warning, the reference stays correct under torch.compile, and a run
with the whole model compiled (the CUDA default) says that it compiles and trains as eager mode does."""

import logging
import re

import pytest
import torch

from cbam.fused import compiler, graphs
from helpers import TINY, train_here
from models import create_model

SMOKE = ["experiment=smoke", *TINY, "trainer.epochs=1", "trainer.image_every=0"]


def test_unknown_inductor_options_are_left_out(monkeypatch):
    """An option that this torch's inductor lacks (they come and go between releases) is not passed."""
    monkeypatch.setitem(compiler._ONE_PASS, "an_option_no_inductor_has", 1)
    options = compiler.inductor_options()
    assert "an_option_no_inductor_has" not in options
    from torch._inductor import config

    assert options and all(hasattr(config, k) for k in options)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    """The smoke run with the reference attention and no compilation (in this process): the numbers that a
    run whose compiler fails must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    return train_here(run_dir, *SMOKE, "attention.impl=reference", "trainer.compile=false")


@pytest.fixture
def broken_compiler(monkeypatch):
    """torch.compile raises, as a broken toolchain makes it; the fused graphs start uncompiled and their
    failures are forgotten afterwards (they are module state)."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiler, "KERNEL_MODE", "compiled")
    monkeypatch.setattr(compiler, "_failed_devices", set())
    for graph in (graphs.tail_forward, graphs.tail_backward):
        for name, fresh in (("compiled", None), ("failed", False), ("_shapes", set())):
            monkeypatch.setattr(graph, name, fresh)


@pytest.mark.parametrize("compile_overrides", [[], ["trainer.compile=true"]], ids=["fused graphs", "whole model"])
def test_failing_compiler_falls_back_to_the_reference(
    tmp_path, compile_overrides, reference_run, broken_compiler, caplog
):
    """torch.compile raises: training completes with one warning and the reference's numbers."""
    with caplog.at_level(logging.INFO, logger="cbam"):
        ours = train_here(tmp_path, *SMOKE, *compile_overrides)
    what = "torch.compile of the model failed" if compile_overrides else "fused CBAM: its tail_forward graph could not"
    assert caplog.text.count(what) == 1, caplog.text
    assert "simulated compiler failure" in caplog.text
    assert ours["history"] == reference_run["history"]
    assert ours["settings"]["compile"] == "off" and ours["settings"]["attention_impl"] == "reference"


@pytest.mark.slow
def test_whole_model_compilation_is_announced_and_trains_as_eager_mode(
    tmp_path, reference_run, caplog, scalar_inductor
):
    """trainer.compile=true with the reference modules inside (the default on CUDA): the first step's
    compilation is logged with its time, and training gives eager mode's numbers (in this process: the
    compiler, not the process, is the subject)."""
    with caplog.at_level(logging.INFO, logger="cbam"):
        compiled = train_here(tmp_path, *SMOKE, "attention.impl=reference", "trainer.compile=true")
    assert "torch.compile (mode default): compiling the model in the first training step" in caplog.text
    assert re.search(r"torch.compile: the first step, compilation included, took \d+\.\d s", caplog.text)
    assert compiled["settings"]["compile"] == "default" and compiled["settings"]["attention_impl"] == "reference"
    assert compiled["steps"] == reference_run["steps"] == 8
    for ours, theirs in zip(compiled["history"], reference_run["history"], strict=True):
        for split in ("train", "val"):
            assert ours[split]["loss"] == pytest.approx(theirs[split]["loss"], rel=1e-3), (split, ours, theirs)


def _grads(model, x, y, compiled: bool, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy((torch.compile(model) if compiled else model)(x), y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["spatial", "cbam"])
def test_gradients_under_torch_compile(preset, scalar_inductor):
    """Inductor found amax's ties by comparing an input it recomputed at a higher precision than the
    saved max: with bf16 autocast no position matched and every gradient was NaN ("spatial" on the CPU,
    CBAM on CUDA). Compiled, the max's gradient is routed by index: finite in bf16, and in float32
    (no ties in random data) the eager reference's gradients. Inductor's scalar C++ (``scalar_inductor``)
    shows the NaN as its SIMD code does."""
    torch.manual_seed(0)
    net = create_model("resnet18", 10, {"preset": preset, "impl": "reference"}, in_chans=1, stem="cifar", width=0.25)
    # the stem and the first stage (two attention blocks): the gates' code at a fraction of the compile time
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    model = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, head)
    model = model.to(memory_format=torch.channels_last).eval()  # running BN statistics: each pass sees one model
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    assert all(torch.isfinite(g).all() for g in _grads(model, x, y, compiled=True, dtype=torch.bfloat16))
    for compiled, eager in zip(_grads(model, x, y, True), _grads(model, x, y, False), strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)
