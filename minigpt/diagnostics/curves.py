"""Reading loss curves: overfitting, steps to a target, trend and volatility.

A curve is two equally long sequences, the steps and the losses measured at them. Everything here works
on plain lists or arrays, so it reads ``History`` fields, logged numbers or a synthetic curve alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def val_slope_rule(val_losses, window: int = 10) -> bool:
    """The rule of thumb from the source notes, kept to be tested: "overfitting" when a least-squares
    line through the last ``window`` validation losses slopes upward.

    It looks at validation alone, so it cannot tell overfitting (training still improving while
    validation worsens) from a plateau that wobbles upward, a learning rate that is too high, or a
    change in the data.
    """
    val = np.asarray(val_losses, dtype=float)
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if len(val) < window:
        return False
    slope = np.polyfit(np.arange(window), val[-window:], 1)[0]
    return bool(slope > 0)


@dataclass
class OverfittingReport:
    """What :func:`detect_overfitting` saw. Losses in nats per token (or the loss's own unit)."""

    overfitting: bool
    best_step: int  # evaluation step with the lowest validation loss
    best_val: float
    val_rise: float  # last validation loss minus the best one (>= 0)
    train_drop: float  # training loss at the best step minus the last one (> 0: still learning)

    def __str__(self) -> str:
        verdict = "overfitting" if self.overfitting else "no overfitting"
        return (f"{verdict}: validation best {self.best_val:.4f} at step {self.best_step}, "
                f"risen {self.val_rise:.4f} since while training fell {self.train_drop:.4f}")


def detect_overfitting(eval_steps, train_losses, val_losses, min_rise: float = 0.05) -> OverfittingReport:
    """Overfitting as its definition says: since the step where validation loss was lowest, validation has
    risen by more than ``min_rise`` *while the training loss kept falling*.

    Args:
        eval_steps, train_losses, val_losses: one entry per evaluation (as in ``History``), losses measured
            on fixed evaluation batches so that consecutive values differ because the model changed.
        min_rise: how far validation must climb above its best to count; set it above the evaluation
            noise (the wobble of validation loss on a plateau).
    """
    steps, train, val = (np.asarray(a, dtype=float) for a in (eval_steps, train_losses, val_losses))
    if not (len(steps) == len(train) == len(val)) or len(val) == 0:
        raise ValueError(f"eval_steps, train_losses and val_losses must be equally long and non-empty, got "
                         f"{len(steps)}, {len(train)}, {len(val)}")
    if min_rise < 0:
        raise ValueError(f"min_rise must be >= 0, got {min_rise}")
    best = int(np.argmin(val))
    val_rise = float(val[-1] - val[best])
    train_drop = float(train[best] - train[-1])
    return OverfittingReport(val_rise > min_rise and train_drop > 0, int(steps[best]), float(val[best]),
                             val_rise, train_drop)


def _curve(steps, losses) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if steps.ndim != 1 or steps.shape != losses.shape or len(steps) == 0:
        raise ValueError(f"steps and losses must be 1-D, equally long and non-empty, got shapes "
                         f"{steps.shape} and {losses.shape}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    return steps, losses


def running_mean(values, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): entry i averages
    ``values[max(0, i - window + 1) : i + 1]``, so it never looks ahead."""
    if window < 1:
        raise ValueError(f"window must be a positive int, got {window}")
    v = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(len(v))
    lo = np.maximum(0, idx - window + 1)
    return (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)


def steps_to_target(steps, losses, target: float, window: int = 1) -> int | None:
    """First step at which the trailing mean of the last ``window`` losses is at or below ``target``;
    ``None`` if the curve never gets there. A window above 1 keeps one lucky batch from counting as
    arrival on a noisy per-update curve."""
    steps, losses = _curve(steps, losses)
    hit = np.nonzero(running_mean(losses, window) <= target)[0]
    return int(steps[hit[0]]) if len(hit) else None


@dataclass
class ConvergenceSummary:
    """What :func:`convergence_summary` found, in the curve's own units (loss per step for the slope)."""

    verdict: str  # "diverged", "improving", "rising" or "flat"
    final: float  # mean loss over the tail window
    best: float  # lowest finite loss
    best_step: int
    steps_to_target: int | None  # None: no target given, or never reached
    slope: float  # least-squares slope over the tail window
    slope_ci: tuple[float, float]  # its 95% t-interval
    volatility: float  # std of the tail's residuals around that line, relative to the tail mean
    tail_steps: tuple[int, int]  # first and last step of the tail window
    nonfinite_step: int | None  # first step with a NaN or infinite loss

    def __str__(self) -> str:
        lo, hi = self.slope_ci
        text = (f"{self.verdict}: tail mean {self.final:.4f} over steps {self.tail_steps[0]}-{self.tail_steps[1]}, "
                f"slope {self.slope:.3g}/step (95% CI {lo:.3g} to {hi:.3g}), volatility {self.volatility:.3g}; "
                f"best {self.best:.4f} at step {self.best_step}")
        if self.steps_to_target is not None:
            text += f"; target reached at step {self.steps_to_target}"
        if self.nonfinite_step is not None:
            text += f"; first non-finite loss at step {self.nonfinite_step}"
        return text


def convergence_summary(steps, losses, *, window: int | None = None, target: float | None = None,
                        target_window: int = 1, confidence: float = 0.95) -> ConvergenceSummary:
    """Summarise a loss curve: where it is, where it is heading and how much it wobbles.

    The verdict reads the trend of the last ``window`` points (default: the last fifth, at least 5):
    ``"improving"`` when the whole confidence interval of the least-squares slope lies below zero,
    ``"rising"`` when it lies above, ``"flat"`` otherwise; ``"diverged"`` whenever a loss is NaN or
    infinite (the tail is then the finite part before it).

    Consecutive losses of a training run are correlated, so the interval is narrower than an interval
    from independent points would honestly be: read a narrow "improving" on a short tail with care.

    Args:
        steps, losses: the curve, steps strictly increasing.
        window: number of tail points for slope and volatility.
        target: if given, :func:`steps_to_target` with ``target_window``.
    """
    steps, losses = _curve(steps, losses)
    bad = np.nonzero(~np.isfinite(losses))[0]
    nonfinite_step = int(steps[bad[0]]) if len(bad) else None
    end = bad[0] if len(bad) else len(losses)
    if end < 3:
        raise ValueError(f"need at least 3 finite losses before any non-finite one, got {end}")
    s, l = steps[:end], losses[:end]
    w = window if window is not None else max(5, end // 5)
    if w < 3:
        raise ValueError(f"window must be at least 3, got {w}")
    w = min(w, end)
    ts, tl = s[-w:], l[-w:]
    fit = stats.linregress(ts, tl)
    t = stats.t.ppf(0.5 + confidence / 2, w - 2)
    slope_ci = (float(fit.slope - t * fit.stderr), float(fit.slope + t * fit.stderr))
    resid = tl - (fit.intercept + fit.slope * ts)
    mean = float(tl.mean())
    volatility = float(resid.std(ddof=2) / abs(mean)) if mean != 0 else math.inf
    if nonfinite_step is not None:
        verdict = "diverged"
    elif slope_ci[1] < 0:
        verdict = "improving"
    elif slope_ci[0] > 0:
        verdict = "rising"
    else:
        verdict = "flat"
    best = int(np.argmin(l))
    reached = steps_to_target(s, l, target, target_window) if target is not None else None
    return ConvergenceSummary(verdict, mean, float(l[best]), int(s[best]), reached, float(fit.slope), slope_ci,
                              volatility, (int(ts[0]), int(ts[-1])), nonfinite_step)
