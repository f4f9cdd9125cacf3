"""scripts/bench_attention.py as a user runs it: one process, every variant, ratios to no attention."""

import re

from helpers import run


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows[1:]}  # rows[0] is the header


def test_bench_attention_prints_every_variant_as_ratios():
    proc = run(
        "scripts/bench_attention.py",
        *("--arch", "resnet18", "--image-size", "64", "--batch", "2", "--reps", "1", "--warmup", "0"),
        "--keep-freed-memory",
    )
    assert "keep_freed_memory=True" in proc.stdout
    table = _table(proc.stdout)
    assert set(table) == {"none", "se", "cbam (fused)", "cbam (reference)", "timm cbam"}
    assert table["none"][1] == table["none"][4] == table["none"][7] == "1.000x"  # train, inference, saved
    assert table["none"][2] == table["none"][5] == "1.000-1.000"  # quartiles of the per-repetition ratios
    saved = {name: float(re.fullmatch(r"([\d.]+)x", cells[7])[1]) for name, cells in table.items()}
    # The fused tail saves what the block without attention saves, plus (N, C) and (N, H*W) tensors; the
    # reference keeps its full-size intermediates (F', max masks, ...) as timm's module does.
    assert saved["cbam (fused)"] < 1.05
    assert saved["cbam (reference)"] > 1.2 and saved["timm cbam"] > 1.2
