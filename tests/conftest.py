import os
import sys
from pathlib import Path

# Fused CBAM kernels run op by op in tests (same code and numbers, no compilation per shape); the
# compiled kernels have their own tests in test_fused.py. Set before cbam is imported.
os.environ.setdefault("CBAM_FUSED_KERNELS", "eager")

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
