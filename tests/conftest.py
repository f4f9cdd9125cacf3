import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
