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


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; plain pytest runs without it
def pytest_xdist_auto_num_workers(config):
    """``pytest -n auto``: a worker per core this process may run on, as many as memory holds (a worker
    that trains, compiles and starts train.py processes needs up to 3 GiB)."""
    cores = len(os.sched_getaffinity(0))
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cores, int(memory_gib // 3)))


@pytest.fixture
def scalar_inductor():
    """Inductor's C++ without SIMD code (``cpp.vec_isa_ok=False``), for tests whose subject is not the
    generated kernels (a run's behaviour under compilation, a gradient's routing): the same graphs and
    numbers, about a third less compile time (torch 2.4 reads the flag once per process, at its first
    compile). The fused kernels' own tests keep the vectorised code that CPU training runs."""
    from torch._inductor import config

    with config.patch({"cpp.vec_isa_ok": False}):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
