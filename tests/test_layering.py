"""Imports flow one way: cbam (attention) <- models (backbones) <- analysis (Grad-CAM, overlays, params and
MACs, export, the paper's tables) <- engine (training) <- entry points and scripts."""

import ast
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
