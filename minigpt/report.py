"""Helpers for the chapters' prose: glued values that read well, and sentences generated from the data.

A number moves with the seed; a sentence written for one seed does not. So every comparative or
qualitative statement about a measurement is either asserted in the chapter, or generated here from the
measurement itself:

- :func:`difference_phrase`: a paired interval as "higher by X (95% interval a to b)", "lower by ...",
  or "no difference the interval can resolve (a to b)";
- :func:`percent`: a share as a percentage whose rounding never changes what it says (99.7% is not
  "100%", 0.3% is not "0%");
- :func:`count_phrase`: "none of 5 seeds", "1 of 5 seeds", "all 5 seeds";
- :func:`verdict`: a claims-audit verdict on the book's fixed scale (:data:`VERDICTS`);
- :func:`run_facts`: the line each chapter shows about the execution behind its numbers; :func:`tally`:
  a chapter's verdicts counted for the claims audit; :func:`interval_text`: "+0.012 [-0.003, +0.027]".
"""

from __future__ import annotations

import math

# The claims audit's fixed verdict scale, each defined once (book/claims.md shows these definitions).
VERDICTS = {
    "holds": "the measurement supports the claim as stated, for every base seed (asserted)",
    "holds in part": "true under some conditions or in a weaker form, which the row states",
    "does not hold": "the measurement contradicts the claim",
    "not testable here": "nothing this book can measure decides it; the row says why",
}


class _PlainText:
    """Displays as its text: no quotes (a ``str`` repr has them), and as Markdown where a page pastes
    it with the ``{glue}`` role, so it reads as prose rather than code."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.text


def glue_text(name: str, text: str) -> None:
    """Glue a sentence or phrase for ``{glue:text}`name``` without showing it in the cell's output."""
    from myst_nb import glue

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    glue(name, _PlainText(text), display=False)


def join_words(items) -> str:
    """``[40, 60, 60]`` -> ``"40, 60 and 60"``: a list as prose."""
    words = [str(i) for i in items]
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def percent(fraction: float, digits: int = 0) -> str:
    """``0.2`` -> ``"20%"``: a fraction as a percentage with ``digits`` decimals, and more where
    rounding would change what the number says: a share that is not exactly 0 or 1 never reads "0%" or
    "100%" (``percent(0.997)`` is ``"99.7%"``, ``percent(0.003)`` is ``"0.3%"``)."""
    value = 100 * float(fraction)
    if not math.isfinite(value):
        raise ValueError(f"fraction must be finite, got {fraction!r}")
    text = f"{value:.{digits}f}"
    while digits < 6 and value not in (0.0, 100.0) and float(text) in (0.0, 100.0, -0.0):
        digits += 1
        text = f"{value:.{digits}f}"
    return text + "%"


def _number(value: float, digits: int, scale: float) -> str:
    """``scale * value`` with ``digits`` decimals, or more where that would show a nonzero value as 0."""
    value = scale * value
    text = f"{value:.{digits}f}"
    while value != 0 and float(text) == 0 and digits < 12:
        digits += 1
        text = f"{value:.{digits}f}"
    return text


def difference_phrase(diff, *, digits: int = 3, scale: float = 1.0, unit: str = "", higher: str = "higher",
                      lower: str = "lower") -> str:
    """A paired difference A - B (a :class:`minigpt.experiments.MeanCI`) as words that the interval
    supports, whatever the seed:

    - interval above zero: ``"higher by 0.042 (95% interval 0.010 to 0.074)"``;
    - below zero: ``"lower by 0.042 (95% interval 0.010 to 0.074)"``: the size of the difference and
      its interval, both in the direction the words state;
    - containing zero: ``"no difference the interval can resolve (95% interval -0.010 to 0.030)"``, the
      signed interval of A - B.

    An interval end that is not zero never prints as zero (more digits are shown). ``scale`` multiplies
    every number (100 for percentage points), ``unit`` follows the magnitude (" points", " nats"),
    ``higher``/``lower`` name the direction ("better", "worse").
    """
    for name in ("mean", "low", "high", "confidence"):
        if not hasattr(diff, name):
            raise TypeError(f"diff must be a MeanCI (mean, low, high), got {type(diff).__name__}")
    level = f"{diff.confidence:.0%} interval"
    if diff.low > 0:
        return (f"{higher} by {_number(diff.mean, digits, scale)}{unit} ({level} "
                f"{_number(diff.low, digits, scale)} to {_number(diff.high, digits, scale)}{unit})")
    if diff.high < 0:
        return (f"{lower} by {_number(-diff.mean, digits, scale)}{unit} ({level} "
                f"{_number(-diff.high, digits, scale)} to {_number(-diff.low, digits, scale)}{unit})")
    return (f"no difference the interval can resolve ({level} {_number(diff.low, digits, scale)} to "
            f"{_number(diff.high, digits, scale)}{unit})")


def count_phrase(k: int, n: int, noun: str = "seeds") -> str:
    """``"none of the 5 seeds"``, ``"1 of the 5 seeds"``, ``"all 5 seeds"``."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return f"none of the {n} {noun}"
    if k == n:
        return f"all {n} {noun}" if n > 1 else f"the one {noun.rstrip('s')}"
    return f"{k} of the {n} {noun}"


def verdict(scale_word: str, reason: str) -> str:
    """A claims-audit verdict: one of :data:`VERDICTS`, then what the measurement says."""
    if scale_word not in VERDICTS:
        raise ValueError(f"scale_word must be one of {list(VERDICTS)}, got {scale_word!r}")
    return f"{scale_word}: {reason}" if reason else scale_word


def seeds_text(seeds) -> str:
    """``[0, 1, 2]`` -> ``"0, 1 and 2"``; a run of more than four consecutive seeds -> ``"0 to 29 (30)"``."""
    seeds = list(seeds)
    if len(seeds) > 4 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]} to {seeds[-1]} ({len(seeds)})"
    return join_words(seeds)


def run_facts(scale: str, seeds, device, started: float) -> str:
    """What a chapter's numbers come from: scale, base seeds, torch version, device and threads, and the
    minutes its code took, counted from ``started`` (a ``time.perf_counter()`` taken in the first cell).
    Glue it from the last cell, so the time covers the whole page."""
    import time

    import torch

    from .config import base_seed

    minutes = (time.perf_counter() - started) / 60
    return (f"Numbers on this page: scale {scale}, base seed {base_seed()}, seeds {seeds_text(seeds)}; "
            f"torch {torch.__version__} on {device} with {torch.get_num_threads()} "
            f"thread{'s' if torch.get_num_threads() != 1 else ''}; the page's code ran in {minutes:.1f} minutes.")


def tally(verdicts) -> str:
    """Count verdicts by their scale word: ``["holds: ...", "holds", "does not hold: ..."]`` ->
    ``"2 hold, 1 does not hold"`` (in the scale's order; scale words with no verdict are left out)."""
    counts = dict.fromkeys(VERDICTS, 0)
    for text in verdicts:
        word = next((w for w in sorted(VERDICTS, key=len, reverse=True) if str(text).startswith(w)), None)
        if word is None:
            raise ValueError(f"verdict {text!r} does not start with one of {list(VERDICTS)}")
        counts[word] += 1
    plural = {"holds": "hold", "holds in part": "hold in part", "does not hold": "do not hold"}
    parts = [f"{n} {plural.get(w, w) if n != 1 else w}" for w, n in counts.items() if n]
    return ", ".join(parts) if parts else "no verdicts"


def interval_text(values, digits: int = 3, *, scale: float = 1.0, mean: bool = True) -> str:
    """A signed mean with its interval for prose: ``"+0.012 [-0.003, +0.027]"``; with ``mean=False``
    the interval alone: ``"-0.003 to +0.027"``. ``values``: per-seed values, a ``MeanCI``, or a
    ``PairedComparison`` (its difference is used); ``scale`` multiplies every number."""
    from .experiments import MeanCI, mean_ci

    ci = getattr(values, "difference", values)
    ci = ci if isinstance(ci, MeanCI) else mean_ci(ci)
    low, high = scale * ci.low, scale * ci.high
    if not mean:
        return f"{signed(low, digits)} to {signed(high, digits)}"
    return f"{signed(scale * ci.mean, digits)} [{signed(low, digits)}, {signed(high, digits)}]"


def signed(value: float, digits: int = 2) -> str:
    """``+0.11``, ``-0.004``: a signed number with ``digits`` decimals, or more where that would print a
    nonzero value as ``+0.00`` or ``-0.00``."""
    return ("+" if value >= 0 else "-") + _number(abs(value), digits, 1.0)
