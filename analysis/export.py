"""A trained network as a file other runtimes load: ONNX, TorchScript (``torch.jit.trace``) or an exported
program (``torch.export``), each with a dynamic batch dimension and checked against PyTorch before it is
kept. Exporters see the reference attention modules (``cbam.modules``: the fused path steps aside while
tracing, exporting or compiling), so every attention variant and backbone exports the same way.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cbam.errors import UserError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}  # format -> usual file suffix
TOLERANCE = 1e-4  # max abs difference from PyTorch's float32 logits that a file may show
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportCheckFailed(RuntimeError):
    """The written file's outputs differ from PyTorch's by more than ``TOLERANCE``."""


@dataclass
class Exported:
    path: Path
    max_abs_diff: float  # on a batch of another size than the one traced


def example_input(image_shape: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Random float32 images of ``image_shape`` (channels, height, width: what the network was trained on)."""
    generator = torch.Generator().manual_seed(batch)
    return torch.randn(batch, *image_shape, generator=generator)


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    dynamo = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 9)  # its default exporter from 2.9
    if dynamo:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter writes the graph with it)
        except ImportError:
            raise UserError("ONNX export needs onnxscript: pip install -e '.[export]'") from None
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
            external_data=False,
        )  # one self-contained file (models under 2 GB)
    else:  # the TorchScript-based exporter, which older torch uses by default
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX file needs onnxruntime: pip install -e '.[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(logits)


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # shape arithmetic recorded as constants is checked below on another batch size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(path))(images)


def _exported(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def _run_exported(path: Path, images: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(path)).module()(images)


WRITERS = {
    "onnx": (_onnx, _run_onnx),
    "torchscript": (_torchscript, _run_torchscript),
    "exported": (_exported, _run_exported),
}


def export(model: nn.Module, image_shape: tuple[int, int, int], fmt: str, out: Path) -> Exported:
    """Write ``model`` (in eval mode, float32, on the CPU) to ``out`` in format ``fmt``, traced on a batch of
    2, then load the file back and compare its logits with PyTorch's on a batch of 3. ``out`` is written
    only if the difference is at most ``TOLERANCE``; otherwise ``ExportCheckFailed`` and nothing is left behind
    (``UserError`` for an unknown format or a missing exporter package)."""
    if fmt not in WRITERS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(WRITERS)}")
    write, run = WRITERS[fmt]
    model = model.eval().float().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = staging / out.name
        with torch.no_grad():
            write(model, example_input(image_shape, 2), staged)
            images = example_input(image_shape, 3)
            expected = model(images)
            got = run(staged, images)
        diff = (got.float() - expected.float()).abs().max().item()
        if not diff <= TOLERANCE:  # NaN fails too
            raise ExportCheckFailed(
                f"the {fmt} file's logits differ from PyTorch's by {diff:.3g} (at most {TOLERANCE} "
                "allowed); nothing was written"
            )
        staged.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(out, diff)
