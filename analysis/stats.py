"""Whether a difference between two variants is real: the mean of the per-seed differences with a 95%
confidence interval (Student's t), for runs paired by seed."""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple


class PairedDifference(NamedTuple):
    """mean(variant - baseline) over the seeds both have, with its 95% confidence interval (NaN bounds with
    fewer than two pairs); ``significant``: the interval excludes zero."""

    pairs: int
    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def paired_difference(variant: dict, baseline: dict, confidence: float = 0.95) -> PairedDifference:
    """``variant`` and ``baseline`` map a seed to a metric (top-1 error, say). The interval is
    mean +- t(1 - alpha/2, n-1) * sd / sqrt(n) of the n per-seed differences: the paired t-interval, which
    assumes the differences are roughly normal (with 3-5 seeds nothing better is on offer; a bootstrap
    needs more)."""
    from scipy import stats

    diffs = [variant[seed] - baseline[seed] for seed in sorted(set(variant) & set(baseline))]
    if not diffs:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, math.nan, math.nan)
    half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, mean - half, mean + half)
