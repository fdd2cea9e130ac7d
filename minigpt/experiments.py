"""Statistics for experiments run over several seeds: means with t-intervals, paired comparisons, Pearson
correlations with Fisher-z intervals, and Markdown tables of them for glued prose."""

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
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)  # plain floats glue cleanly
    return MeanCI(mean, mean - half, mean + half, n, confidence)


@dataclass
class PairedComparison:
    """A - B measured on the same seeds: the mean difference with its interval, a paired t-test and
    how often A was lower (``a_lower``, for losses and errors: lower is better)."""

    difference: MeanCI
    p_value: float
    a_lower: int
    n: int

    def __str__(self) -> str:
        return (f"A - B = {self.difference} (paired t-test p = {self.p_value:.3g}); "
                f"A lower in {self.a_lower} of {self.n}")


def paired_comparison(a, b, confidence: float = 0.95) -> PairedComparison:
    """Compare two methods measured on the same seeds (``a[i]`` and ``b[i]`` share seed i).

    Pairing removes what the seed does to both (the data split, the initialisation), so a difference
    can be real even where the two intervals overlap.
    """
    from scipy import stats

    xs, ys = [float(v) for v in a], [float(v) for v in b]
    if len(xs) != len(ys):
        raise ValueError(f"a and b must pair up one measurement per seed, got {len(xs)} and {len(ys)}")
    diffs = [x - y for x, y in zip(xs, ys)]
    ci = mean_ci(diffs, confidence)
    p = 1.0 if all(d == diffs[0] for d in diffs) and diffs[0] == 0 else float(stats.ttest_rel(xs, ys).pvalue)
    return PairedComparison(ci, p, sum(d < 0 for d in diffs), len(diffs))


def best_and_tied(results: dict, *, higher_is_better: bool = False, tolerance: float = 1e-9):
    """The method with the best mean over seeds, and the others that a paired comparison cannot put
    measurably behind it (the 95% interval of their difference from the best reaches zero).

    ``results`` maps a name to per-seed values, all on the same seeds. Differences within ``tolerance``
    count as ties (two fits that agree to float noise). Returns ``(best, tied)``, ``tied`` in the order of
    ``results`` and without ``best``.
    """
    if not results:
        raise ValueError("results must not be empty")
    sign = -1.0 if higher_is_better else 1.0
    best = min(results, key=lambda k: sign * mean_ci(results[k]).mean)
    tied = []
    for name, values in results.items():
        if name == best:
            continue
        diff = paired_comparison(values, results[best]).difference  # name - best
        if (diff.high >= -tolerance) if higher_is_better else (diff.low <= tolerance):
            tied.append(name)
    return best, tied


def summary_table(results: dict[str, list], confidence: float = 0.95) -> list[dict]:
    """One row per method: ``{"name", "mean", "low", "high", "n"}`` from its per-seed values."""
    rows = []
    for name, values in results.items():
        ci = mean_ci(values, confidence)
        rows.append({"name": name, "mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n})
    return rows


def ci_cell(values, digits: int = 3, *, scale: float = 1.0, suffix: str = "", signed: bool = False) -> str:
    """A table cell "mean ± half-width" of per-seed ``values`` (or of a :class:`MeanCI`), each times
    ``scale`` (100 for percentages), with ``digits`` decimals and ``suffix`` after the mean:
    ``ci_cell([0.41, 0.45, 0.43], 1, scale=100, suffix="%")`` -> ``"43.0% ± 5.0"``."""
    ci = values if isinstance(values, MeanCI) else mean_ci(values)
    sign = "+" if signed else ""
    return f"{scale * ci.mean:{sign}.{digits}f}{suffix} ± {scale * ci.half_width:.{digits}f}"


def markdown_table(rows, digits: int = 4, label: str = "method") -> str:
    """A Markdown table for a glued table (``{glue:md}`` with ``:format: myst``).

    ``rows`` is either

    - a list of :func:`summary_table` rows: columns mean, 95% interval and seeds; or
    - a mapping ``{row label: {column: cell}}``, every row with the same columns in the same order. A
      cell is a string (used as it is: see :func:`ci_cell`), a :class:`MeanCI` or a list of per-seed
      values (both shown as "mean ± half-width" with ``digits`` decimals), or a number (an int as it
      is, a float with ``digits`` decimals).

    ``label`` heads the first column.
    """
    if isinstance(rows, dict):
        if not rows:
            raise ValueError("rows must not be empty")
        columns = list(next(iter(rows.values())))
        for name, cells in rows.items():
            if list(cells) != columns:
                raise ValueError(f"row {name!r} has columns {list(cells)}, expected {columns}")

        def show(cell) -> str:
            if isinstance(cell, str):
                return cell
            if isinstance(cell, (MeanCI, list, tuple)):
                return ci_cell(cell, digits)
            if isinstance(cell, int):  # counts stay whole numbers
                return str(cell)
            return f"{float(cell):.{digits}f}"

        lines = ["| " + " | ".join([label, *columns]) + " |", "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
        lines += ["| " + " | ".join([str(name), *(show(c) for c in cells.values())]) + " |"
                  for name, cells in rows.items()]
        return "\n".join(lines)
    lines = [f"| {label} | mean | 95% interval | seeds |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['mean']:.{digits}f} | [{r['low']:.{digits}f}, "
                     f"{r['high']:.{digits}f}] | {r['n']} |")
    return "\n".join(lines)


def pearson_ci(x, y, confidence: float = 0.95) -> tuple[float, float, float]:
    """Pearson correlation of paired samples with its Fisher-z interval: ``(r, low, high)``.
    The interval assumes independent pairs, roughly bivariate normal; it needs at least 4 pairs."""
    from scipy import stats

    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) != len(ys) or len(xs) < 4:
        raise ValueError(f"x and y must be paired samples of at least 4, got {len(xs)} and {len(ys)}")
    r = float(stats.pearsonr(xs, ys).statistic)
    z, half = math.atanh(r), float(stats.norm.ppf(0.5 + confidence / 2)) / math.sqrt(len(xs) - 3)
    return r, math.tanh(z - half), math.tanh(z + half)
