"""Imports flow one way: cbam (attention) <- models (backbones) <- analysis (Grad-CAM, overlays, params and
MACs, export, the paper's tables) <- engine (training) <- entry points and scripts."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.any_torch  # imports between the project's packages

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cbam", "models", "analysis", "engine"]  # each may import only those before it


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_later_layer(layer):
    later = set(LAYERS[LAYERS.index(layer) + 1 :])
    for path in (ROOT / layer).rglob("*.py"):
        wrong = imported_packages(path) & later
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_importing_the_attention_library_loads_nothing_else_of_the_project():
    code = "import cbam, sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'models', 'analysis', 'engine'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_fused_path_is_one_package_that_only_the_modules_enter():
    """cbam.fused is entered through cbam.modules (and the per-device default the trainer reports); no
    backbone reads torch's private hook registries (cbam.fused.dispatch alone does)."""
    project = [*ROOT.glob("*.py"), *(p for d in [*LAYERS, "scripts"] for p in (ROOT / d).rglob("*.py"))]
    for path in project:
        if path.is_relative_to(ROOT / "cbam" / "fused"):
            continue
        text = path.read_text()
        if "cbam.fused" in text or "from .fused" in text:
            imported = {line.strip() for line in text.splitlines() if re.match(r"\s*from (\.|cbam\.)fused\b", line)}
            allowed = {"from .fused import FusedPlan, fused_or_none", "from cbam.fused import auto_uses_fused"}
            assert imported <= allowed, f"{path.relative_to(ROOT)}: {imported - allowed}"
    for path in (ROOT / "models").rglob("*.py"):
        assert "_forward_hooks" not in path.read_text() and "_global_forward" not in path.read_text(), path


def test_no_function_of_the_fused_path_takes_more_than_8_parameters():
    """Grouped tensors travel as named tuples (passes.Affine, passes.Gates, graphs.Saved, ...); flags are
    keyword-only."""
    for path in (ROOT / "cbam" / "fused").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                name = getattr(node, "name", "lambda")
                assert count <= 8, f"{path.name}: {name} takes {count} parameters"
                flags = [
                    arg.arg for arg, default in zip(a.args[::-1], a.defaults[::-1], strict=False) if _is_bool(default)
                ]
                assert not flags, f"{path.name}: {name}'s flags {flags} should be keyword-only"


def _is_bool(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, bool)
