"""The paper's reported ImageNet-1K numbers (Woo et al., ECCV 2018, Tables 1-5), as data.

Values from ``shared/PAPER.md``. ``approx=True`` marks rows whose error rates could not be confirmed
against the paper text; tables must show them as such. None means the paper's figure is not known
here (derive it from the architecture).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    table: int
    arch: str
    attention: str
    top1_err: float
    top5_err: float
    params_m: float | None = None
    gmacs: float | None = None
    approx: bool = False
    width: float = 1.0


def _table4(arch, base, se, cbam, approx=False, width=1.0):
    return [
        PaperRow(4, arch, att, *vals, approx=approx, width=width)
        for att, vals in (("none", base), ("se", se), ("cbam", cbam))
    ]


TABLE4 = [
    *_table4("resnet18", (29.60, 10.55, 11.69, 1.814), (29.41, 10.22), (29.27, 10.09), approx=True),
    *_table4("resnet34", (26.69, 8.60), (26.13, 8.35), (25.99, 8.24), approx=True),
    *_table4("resnet50", (24.56, 7.50, 25.56, 3.858), (23.14, 6.70, 28.09, 3.860), (22.66, 6.31, 28.09, 3.864)),
    *_table4("resnet101", (23.38, 6.88), (22.35, 6.19), (21.51, 5.69)),
    *_table4("wrn18_1.5", (26.85, 8.88), (26.21, 8.47), (26.10, 8.43), approx=True),
    *_table4("wrn18_2", (25.63, 8.20), (24.93, 7.65), (24.84, 7.63)),
    *_table4("resnext50_32x4d", (22.85, 6.48), (21.91, 6.04), (21.92, 5.91)),
    *_table4("resnext101_32x4d", (21.54, 5.75), (21.17, 5.66), (21.07, 5.59), approx=True),
]

TABLE5 = [
    *_table4("mobilenet_v1", (31.39, 11.51), (29.97, 10.63), (29.01, 9.99)),
    *_table4("mobilenet_v1", (34.86, 13.69), (32.50, 12.49), (31.51, 11.48), approx=True, width=0.7),
]
for _row in TABLE5:
    object.__setattr__(_row, "table", 5)

TABLE1 = [  # ResNet-50, channel attention only
    PaperRow(1, "resnet50", "se", 23.14, 6.70),
    PaperRow(1, "resnet50", "channel_max", 23.20, 6.83),
    PaperRow(1, "resnet50", "channel", 22.80, 6.52),
]

TABLE2 = [  # ResNet-50, Avg&Max channel attention + spatial attention
    PaperRow(2, "resnet50", "cbam_conv1x1_k3", 22.96, 6.64),
    PaperRow(2, "resnet50", "cbam_conv1x1_k7", 22.90, 6.47),
    PaperRow(2, "resnet50", "cbam_k3", 22.68, 6.41),
    PaperRow(2, "resnet50", "cbam", 22.66, 6.31),
]

TABLE3 = [  # ResNet-50 arrangement
    PaperRow(3, "resnet50", "cbam", 22.66, 6.31),
    PaperRow(3, "resnet50", "cbam_spatial_first", 22.78, 6.42),
    PaperRow(3, "resnet50", "cbam_parallel", 22.95, 6.59),
]

TABLES = {1: TABLE1, 2: TABLE2, 3: TABLE3, 4: TABLE4, 5: TABLE5}


def find_row(arch: str, attention: str, width: float = 1.0) -> PaperRow | None:
    """The paper's row for ``arch`` + ``attention`` (+ width for MobileNet), if it reports one."""
    for rows in TABLES.values():
        for row in rows:
            if (row.arch, row.attention, row.width) == (arch, attention, width):
                return row
    return None
