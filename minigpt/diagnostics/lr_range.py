"""The learning-rate range test (Smith 2017, "Cyclical learning rates for training neural networks").

Train for a short while with a learning rate that grows exponentially from tiny to huge, one batch per
step, and watch the loss: flat while the rate is too small to matter, falling once it bites, exploding
once it is too large. The test then puts the weights back.

The source notes' version has three faults this one avoids: its last rate stops one factor short of the
end it names, it stops on the raw (noisy) batch loss, so one bad batch ends the test early, and it leaves
the model trained at the huge final rate instead of restoring it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..train import language_model_loss


@dataclass
class LRRangeResult:
    """The rates tried, the batch losses, their bias-corrected exponential moving average, and why the
    test ended (``"end_lr"``, ``"diverged"`` for a smoothed loss above ``diverge_factor`` times its best,
    or ``"non-finite"``)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop_reason: str
    diverge_factor: float

    @property
    def min_loss_lr(self) -> float:
        """The rate at the lowest smoothed loss."""
        return self.lrs[int(np.nanargmin(self.smoothed))]

    def steepest_lr(self, skip_start: int = 10) -> float:
        """The rate where the smoothed loss falls fastest per unit of log rate, searched between step
        ``skip_start`` (the moving average needs a few steps to mean anything) and the minimum."""
        s = np.asarray(self.smoothed, dtype=float)
        end = int(np.nanargmin(s)) + 1
        start = min(skip_start, max(end - 2, 0))
        if end - start < 2:
            raise ValueError(f"too few steps before the minimum to take a slope ({end - start})")
        slope = np.gradient(s[start:end], np.log(self.lrs[start:end]))
        return self.lrs[start + int(np.argmin(slope))]

    def min_over_ten_lr(self) -> float:
        """fastai's ``minimum`` suggestion: the rate at the lowest smoothed loss, divided by 10."""
        return self.min_loss_lr / 10

    def valley_lr(self) -> float:
        """fastai's ``valley`` suggestion (``fastai.callback.schedule.valley``): the longest decreasing
        subsequence of the smoothed losses, and the rate halfway along its span (``start + int(s) +
        int(s / 2)`` with ``s`` a third of the span). fastai drops the first tenth and the last five
        points of the curve first; so does this."""
        n = len(self.smoothed)
        lo, hi = n // 10, max(n - 5, n // 10 + 2)
        losses = np.asarray(self.smoothed[lo:hi], dtype=float)
        lrs = self.lrs[lo:hi]
        m = len(losses)
        if m < 2 or not np.all(np.isfinite(losses)):
            raise ValueError(f"valley needs at least 2 finite smoothed losses after trimming, got {m}")
        lds = [1] * m
        max_start = max_end = 0
        for i in range(1, m):
            for j in range(i):
                if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                    lds[i] = lds[j] + 1
                if lds[max_end] < lds[i]:
                    max_end = i
                    max_start = max_end - lds[max_end]
        sections = (max_end - max_start) / 3
        return lrs[max_start + int(sections) + int(sections / 2)]

    @classmethod
    def from_losses(cls, lrs, losses, smoothing: float = 0.98, diverge_factor: float = 4.0) -> "LRRangeResult":
        """The result :func:`lr_range_test` would have returned had it seen these batch losses at these
        rates: smoothed the same way and cut where the smoothed loss first exceeds ``diverge_factor`` times
        its best (or a loss is not finite). Reads one model's curve out of a test run on many models side
        by side, where the joint test ran to the end."""
        lrs, losses = list(map(float, lrs)), list(map(float, losses))
        if len(lrs) != len(losses) or len(lrs) < 2:
            raise ValueError(f"lrs and losses must be equally long with at least 2 entries, got {len(lrs)}, {len(losses)}")
        tracker, out, reason = _DivergenceTracker(smoothing, diverge_factor), [], "end_lr"
        for value in losses:
            smooth, stop = tracker.update(value)
            out.append(smooth)
            if stop:
                reason = stop
                break
        k = len(out)
        return cls(lrs[:k], losses[:k], out, reason, diverge_factor)


class _DivergenceTracker:
    """The range test's stopping rule, shared by :func:`lr_range_test` and :meth:`LRRangeResult.from_losses`:
    fastai's bias-corrected moving average of the batch losses, stopping once it exceeds ``diverge_factor``
    times its lowest value so far or a loss is not finite."""

    def __init__(self, smoothing: float, diverge_factor: float):
        self.smoothing, self.diverge_factor = smoothing, diverge_factor
        self.avg, self.best, self.count = 0.0, math.inf, 0

    def update(self, value: float) -> tuple[float, str | None]:
        """Feed one batch loss; return its smoothed value (nan if the loss is not finite) and the reason
        to stop (``"non-finite"``, ``"diverged"``) or None."""
        if not math.isfinite(value):
            return math.nan, "non-finite"
        self.count += 1
        self.avg = self.smoothing * self.avg + (1 - self.smoothing) * value
        smooth = self.avg / (1 - self.smoothing ** self.count)
        self.best = min(self.best, smooth)
        return smooth, ("diverged" if smooth > self.diverge_factor * self.best else None)


def next_batch_loss(get_batch, seed: int = 0, batch_loss=None) -> Callable[[nn.Module], torch.Tensor]:
    """A loss for :func:`lr_range_test` from the same pieces :func:`minigpt.train.train` takes: each call
    draws the next training batch from its own generator (seeded by ``seed``) and returns
    ``loss_sum / n_items`` of ``batch_loss(model, batch)`` (default: the language-model loss)."""
    gen = torch.Generator().manual_seed(seed)
    batch_loss = batch_loss or language_model_loss()

    def loss_of_next_batch(model: nn.Module) -> torch.Tensor:
        loss_sum, n_items = batch_loss(model, get_batch("train", gen))
        return loss_sum / n_items

    return loss_of_next_batch


def lr_range_test(model: nn.Module, batch_loss: Callable[[nn.Module], torch.Tensor], *, start_lr: float = 1e-7,
                  end_lr: float = 10.0, num_steps: int = 100, smoothing: float = 0.98, diverge_factor: float = 4.0,
                  make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None,
                  grad_clip: float | None = None, restore: bool = True) -> LRRangeResult:
    """Run the learning-rate range test and return what it saw.

    Step ``i`` (0-based) of ``num_steps`` uses ``lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))``,
    so the first step uses ``start_lr`` and the last ``end_lr``. The smoothed loss is fastai's
    bias-corrected moving average ``a_i = smoothing * a_{i-1} + (1 - smoothing) * loss_i``,
    ``smoothed_i = a_i / (1 - smoothing ** (i + 1))``; the test stops once it exceeds ``diverge_factor``
    times its lowest value so far (fastai uses 4, pytorch-lr-finder 5) or a loss is not finite.

    Args:
        model: trained in place during the test; its weights (and train/eval mode) are put back after
            unless ``restore=False``.
        batch_loss: ``batch_loss(model) -> scalar loss`` on the next training batch (see
            :func:`next_batch_loss`).
        make_optimizer: ``make_optimizer(model, lr) -> optimizer``; default Adam (AdamW without decay).
        grad_clip: clip the global gradient norm to this before each step, as the real run would.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}")
    saved = copy.deepcopy(model.state_dict()) if restore else None
    was_training = model.training
    if make_optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=start_lr, weight_decay=0.0)
    else:
        optimizer = make_optimizer(model, start_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    ratio = end_lr / start_lr
    lrs, losses, smoothed = [], [], []
    tracker, stop_reason = _DivergenceTracker(smoothing, diverge_factor), "end_lr"
    model.train()
    try:
        for i in range(num_steps):
            lr = start_lr * ratio ** (i / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError("batch_loss must return a scalar tensor")
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            smooth, stop = tracker.update(value)
            smoothed.append(smooth)
            if stop:
                stop_reason = stop
                break
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            model.load_state_dict(saved)
        model.train(was_training)
    return LRRangeResult(lrs, losses, smoothed, stop_reason, diverge_factor)
