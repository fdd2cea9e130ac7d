"""Small models for the scikit-learn data sets, fitted full-batch with any minigpt loss.

The regression and classification chapters compare losses, not architectures, so they fit the simplest
model that does the job, a linear one (an MLP where a chapter needs a hidden layer), by full-batch Adam
with a cosine-decayed learning rate. Every fit starts from the same initial weights (zeros for a linear
model), so the only randomness in an experiment is the data split and whatever the experiment corrupts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

LossOnOutputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Module):
    """``X @ W + b``, initialised at zero. Output (N,) for one output, (N, K) for K outputs (one per
    quantile, or class logits).

    With ``problems=B`` it holds B independent models side by side: X is (B, N, F) and the output
    (B, N) or (B, N, K). :func:`fit_full_batch` then fits all B at once, exactly as it would fit each
    alone (see there), which is how the chapters run many seeds in the time of one.
    """

    def __init__(self, n_features: int, n_outputs: int = 1, *, problems: int | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if n_features < 1 or n_outputs < 1 or (problems is not None and problems < 1):
            raise ValueError(f"n_features, n_outputs and problems must be positive, got {n_features}, "
                             f"{n_outputs}, {problems}")
        self.n_features, self.n_outputs, self.problems = n_features, n_outputs, problems
        lead = () if problems is None else (problems,)
        self.weight = nn.Parameter(torch.zeros(*lead, n_features, n_outputs, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(*lead, 1, n_outputs, dtype=dtype))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        batched = self.problems is not None
        if X.dim() != (3 if batched else 2) or X.shape[-1] != self.n_features or (batched and X.shape[0] != self.problems):
            shape = "(N, F)" if self.problems is None else f"({self.problems}, N, F)"
            raise ValueError(f"X must have shape {shape} with F = {self.n_features}, got {tuple(X.shape)}")
        out = X @ self.weight + (self.bias if self.problems is not None else self.bias[0])
        return out.squeeze(-1) if self.n_outputs == 1 else out


def fit_full_batch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: LossOnOutputs, *,
                   steps: int = 1000, lr: float = 0.05, weight_decay: float = 0.0) -> list[float]:
    """Minimise the mean of ``loss_fn(model(X), y)`` by full-batch Adam (AdamW when ``weight_decay`` > 0),
    the learning rate decaying from ``lr`` to 0 along a half cosine, which lets non-smooth losses (MAE,
    pinball) settle instead of hopping around their kink. Returns the objective before each step.

    For a model of B independent problems (``Linear(..., problems=B)``) the objective is the sum over
    problems of each problem's mean loss. Adam's update is elementwise and each weight belongs to one
    problem, so every problem follows exactly the trajectory it would follow alone.

    Args:
        model: fitted in place.
        X: (N, F) features, or (B, N, F). y: targets in the shape ``loss_fn`` takes.
        loss_fn: per-example losses, ``reduction="none"``, e.g.
            ``lambda out, t: huber_loss(out, t, delta=0.5, reduction="none")``: shape (N, ...) or (B, N, ...).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        per_example = loss_fn(model(X), y)
        if per_example.dim() == 0:
            raise ValueError("loss_fn must return per-example losses (reduction='none'), got a scalar")
        batched = getattr(model, "problems", None) is not None
        loss = per_example.flatten(1).mean(1).sum() if batched else per_example.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {float(loss)} at step {step}; lower lr ({lr})")
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history
