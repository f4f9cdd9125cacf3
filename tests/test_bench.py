"""scripts/bench_attention.py as a user runs it: one process, every variant, ratios to no attention."""

import importlib.util
import math
import random
import re

import pytest

from helpers import ROOT, run

pytestmark = pytest.mark.any_torch  # the benchmark's output and statistics

spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _table(stdout: str) -> dict[str, list[str]]:
    """Rows by variant; cells: train s, ratio, quartiles, 95% CI, inference s, ratio, quartiles, 95% CI,
    saved MiB, saved ratio."""
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows[1:]}  # rows[0] is the header


TINY = ("--arch", "resnet18", "--image-size", "64", "--batch", "2", "--warmup", "0", "--keep-freed-memory")


def test_bench_attention_prints_every_variant_as_ratios():
    proc = run("scripts/bench_attention.py", *TINY, "--reps", "1")
    assert "keep_freed_memory=True" in proc.stdout
    table = _table(proc.stdout)
    assert set(table) == {"none", "se", "cbam (fused)", "cbam (reference)", "timm cbam"}
    assert table["none"][1] == table["none"][5] == table["none"][9] == "1.000x"  # train, inference, saved
    for col in (2, 3, 6, 7):  # quartiles and median's interval of the per-repetition ratios
        assert table["none"][col] == "1.000-1.000"
    saved = {name: float(re.fullmatch(r"([\d.]+)x", cells[9])[1]) for name, cells in table.items()}
    # The fused tail saves what the block without attention saves, plus (N, C) and (N, H*W) tensors; the
    # reference keeps its full-size intermediates (F', max masks, ...) as timm's module does.
    assert saved["cbam (fused)"] < 1.05
    assert saved["cbam (reference)"] > 1.2 and saved["timm cbam"] > 1.2


def test_bench_attention_measures_inference_alone():
    proc = run("scripts/bench_attention.py", *TINY, "--reps", "3", "--measure", "infer", "--only", "cbam (fused)")
    table = _table(proc.stdout)
    assert set(table) == {"none", "cbam (fused)"}
    assert table["cbam (fused)"][:4] == ["-"] * 4  # no training step was timed
    ratio, (lo, hi) = float(table["cbam (fused)"][5][:-1]), map(float, table["cbam (fused)"][7].split("-"))
    assert lo <= ratio <= hi


@pytest.mark.parametrize("n, ranks", [(6, (1, 6)), (11, (2, 10)), (20, (6, 15)), (50, (18, 33)), (101, (41, 61))])
def test_median_interval_is_the_textbook_order_statistics(n, ranks):
    """Ranks as tabulated for the sign-test interval of the median at 95% (e.g. Conover, Table A3)."""
    assert bench.median_ci([float(i) for i in range(1, n + 1)]) == ranks


def test_median_interval_covers_the_median_95_percent_of_the_time():
    rng = random.Random(0)
    trials, n, hits = 4000, 25, 0
    for _ in range(trials):
        sample = sorted(rng.lognormvariate(0.0, 0.3) for _ in range(n))  # skewed, like timings; median 1.0
        lo, hi = bench.median_ci(sample)
        hits += lo <= 1.0 <= hi
    exact = 1 - 2 * sum(math.comb(n, i) for i in range(8)) / 2**n  # k = 8 for n = 25: 0.9567
    assert abs(hits / trials - exact) < 0.015 and hits / trials >= 0.94
