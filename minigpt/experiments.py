"""Statistics for experiments run over several seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class MeanCI:
    """Mean of ``n`` values with a two-sided Student-t confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.half_width:.4f} ({self.confidence:.0%} CI, n={self.n})"


def mean_ci(values, confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t interval of independent measurements (e.g. one per seed)."""
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        raise ValueError(f"values must hold at least 2 measurements for an interval, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("values must all be finite")
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n, confidence)
