"""The trainer's per-device defaults (engine/device.py) and their config keys."""

import pytest
import torch

from cbam.errors import UserError
from engine.device import AUTO_COMPILE_MODE, amp_dtype, compile_mode, set_cudnn_benchmark
from helpers import TINY, results, train, train_here

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_amp_is_float32_on_the_cpu():
    assert amp_dtype("auto", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        amp_dtype("fp16", CPU)


def test_compile_choice():
    assert compile_mode(None, "auto", CPU) is None  # the CPU trains eagerly (fused attention) by default
    assert compile_mode(None, "auto", CUDA) == AUTO_COMPILE_MODE["cuda"] == "reduce-overhead"
    assert compile_mode(None, "auto", CUDA, distributed=True) == "default"  # no CUDA graphs under DDP until measured
    assert compile_mode(None, "auto", CPU, distributed=True) is None
    assert compile_mode(None, "default", CUDA) == "default"
    assert compile_mode(False, "auto", CUDA) is None
    assert compile_mode(True, "auto", CPU) == "default"
    assert compile_mode(True, "max-autotune", CPU) == "max-autotune"
    # another backend than inductor: its name (the modes are inductor's)
    assert compile_mode(True, "auto", CUDA, backend="aot_eager") == "aot_eager"
    assert compile_mode(None, "auto", CPU, backend="aot_eager") is None


def test_run_records_what_auto_resolved_to(tmp_path):
    train_here(tmp_path, "experiment=smoke", *TINY, "trainer.epochs=1", "trainer.image_every=0", "trainer.device=cpu")
    assert results(tmp_path)["settings"] == {
        "amp": "float32",
        "tf32": False,
        "compile": "off",
        "attention_impl": "fused",
    }


@pytest.mark.any_torch  # Hydra's check of a choice
def test_bad_compile_mode_is_refused(tmp_path):
    proc = train(tmp_path, "experiment=smoke", "trainer.compile_mode=fastest", check=False)
    assert proc.returncode != 0
    assert "fastest" in proc.stdout + proc.stderr and "reduce-overhead" in proc.stdout + proc.stderr


def test_cudnn_benchmark_mode_on_cuda_unless_deterministic():
    before = torch.backends.cudnn.benchmark
    try:
        set_cudnn_benchmark(CUDA, True)
        assert torch.backends.cudnn.benchmark
        set_cudnn_benchmark(CUDA, False)  # trainer.deterministic=true
        assert not torch.backends.cudnn.benchmark
        set_cudnn_benchmark(CPU, True)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
