"""Paired comparisons over seeds, as the project reports them: two methods run on the same seeds (same
initialization and data order), their per-seed difference's mean ± std, wins out of N, and the 95%
Student-t interval of the mean difference; "within noise" when the interval holds 0."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% Student-t quantiles (0.975) by degrees of freedom; beyond 30 the normal's 1.96 is close enough
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
        12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the next tabulated df down: conservative)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 paired values")
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


@dataclass(frozen=True)
class Paired:
    mean: float
    std: float
    wins: int
    n: int
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return "within noise" if self.low <= 0 <= self.high else ("above" if self.mean > 0 else "below")

    def __str__(self) -> str:
        return f"{self.mean:+.2f} ± {self.std:.2f}, {self.wins}/{self.n}, [{self.low:+.2f}, {self.high:+.2f}] {self.verdict}"


def paired(a: dict[int, float], b: dict[int, float], scale: float = 100.0) -> Paired | None:
    """``a - b`` over the seeds both have (values per seed, reported ``* scale``: points for
    accuracies); None below 2 common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [scale * (a[s] - b[s]) for s in seeds]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return Paired(mean, sd, sum(x > 0 for x in d), len(d), mean - half, mean + half)
