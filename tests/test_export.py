"""Exported files load in their own runtimes (onnxruntime, torch.jit, torch.export) and match PyTorch."""

import onnxruntime
import pytest
import torch

from analysis import export as exporting
from analysis.export import ExportCheckFailed, export
from cbam import BAM, PRESETS, resolve_spec
from helpers import run, script_here, train_here
from models import create_model
from models.resnet import BasicBlock

SHAPE = (3, 32, 32)  # channels, height, width


def load_and_run(fmt: str, path, images: torch.Tensor) -> torch.Tensor:
    """The file run the way a user of each format runs it, independently of analysis.export."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(images)
    return torch.export.load(str(path)).module()(images)


def check_export(model, fmt, path, shape=SHAPE):
    result = export(model, shape, fmt, path)
    assert result.path == path and result.max_abs_diff <= 1e-4
    images = torch.randn(5, *shape)  # a batch size not traced
    with torch.no_grad():
        expected = model.eval()(images)
        got = load_and_run(fmt, path, images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no staging files left


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
def test_default_cbam_exports_to_every_format(tmp_path, fmt):
    model = create_model("resnet18", 10, "cbam", stem="cifar", width=0.25)
    assert model.layer1[0].attn.impl != "reference"  # the default implementation, not the reference by hand
    check_export(model, fmt, tmp_path / f"model{exporting.FORMATS[fmt]}")


def test_a_file_that_differs_from_pytorch_is_not_kept(tmp_path, monkeypatch):
    write, run = exporting.WRITERS["torchscript"]
    monkeypatch.setitem(exporting.WRITERS, "torchscript", (write, lambda path, images: run(path, images) + 1e-3))
    model = create_model("resnet18", 10, "cbam", stem="cifar", width=0.25)
    with pytest.raises(ExportCheckFailed, match="differ from PyTorch's by 0.001"):
        export(model, SHAPE, "torchscript", tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export_run")
    train_here(
        run_dir,
        "experiment=smoke",
        "trainer.epochs=1",
        "data.train_size=64",
        "data.val_size=32",
        "trainer.image_every=0",
    )
    return run_dir / "checkpoints" / "last.pt"


def test_export_script_writes_a_checked_file(checkpoint, tmp_path):
    """The script as a user runs it (its exit status from the process)."""
    out = tmp_path / "cbam.onnx"
    proc = run("scripts/export.py", checkpoint, "--format", "onnx", "--out", out, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resnet18 + cbam ->" in proc.stdout and "max abs difference from PyTorch" in proc.stdout
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = create_model("resnet18", 10, ckpt["config"]["attention"], stem="cifar", width=0.25)
    model.load_state_dict(ckpt["model"])
    size = ckpt["config"]["data"]["image_size"]  # the file's input shape is the run's
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model.eval()(images)
    assert (load_and_run("onnx", out, images) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing.pt", "--format", "onnx"], "does not exist"),
        (["{ckpt}", "--format", "tflite"], "invalid choice: 'tflite'"),
        (["{ckpt}", "--format", "torchscript", "--out", "{ckpt}"], "is the checkpoint itself"),
    ],
)
def test_export_script_refuses_bad_input(checkpoint, tmp_path, args, message):
    status, _, stderr = script_here("export", *[a.format(tmp=tmp_path, ckpt=checkpoint) for a in args])
    assert status == 2 and message in stderr, stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("attention", sorted(PRESETS))
def test_every_attention_variant_exports(tmp_path, attention):
    """ONNX (whose exporter runs torch.export first) checked with onnxruntime, on one residual block with
    the variant, or BAM, which sits between blocks (the whole network's export:
    test_default_cbam_exports_to_every_format)."""
    module = BAM(16, reduction=4) if attention == "bam" else BasicBlock(16, 16, attention=resolve_spec(attention))
    check_export(module.eval(), "onnx", tmp_path / "m.onnx", (16, 6, 6))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "wrn18_2", "mobilenet_v1"])  # each block type
def test_every_backbone_with_cbam_exports(tmp_path, arch):
    model = create_model(arch, 10, "cbam", width=0.25)
    folder = tmp_path / "exported"
    folder.mkdir()
    check_export(model, "exported", folder / "m.pt2", (3, 64, 64))
