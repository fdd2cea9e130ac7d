"""Diagnostics of training runs: reading loss curves.

Chapter 1 uses the overfitting detectors; later chapters add gradient statistics, loss-component
tracking and the rest of the toolkit here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
