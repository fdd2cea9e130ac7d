"""Small models for the scikit-learn and synthetic data sets, and full-batch fits of many side by side.

- :class:`Linear` and :class:`MLP` (one hidden layer), each optionally B independent models at once
  (``problems=B``), and :class:`SegmentationNet`, a small fully convolutional network for the blob task.
- :func:`fit_full_batch`: full-batch Adam with a cosine-decayed learning rate on all B problems at once,
  each following exactly the trajectory it would alone. This is how the regression and classification
  chapters run 30 splits in the time of one. It is deliberately not :func:`minigpt.train.train`: it has
  no batches to draw, no evaluation and no clipping, and its problems must stay independent.

Minibatch training of these models (a segmentation net, a contrastive encoder) goes through
:func:`minigpt.train.train` with a ``batch_loss``, as everything else does.

The chapters compare losses, not architectures, so they fit the simplest model that does the job. Every
fit starts from the same initial weights (zeros for a linear model), so the only randomness in an
experiment is the data split and whatever the experiment corrupts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .train import decay_groups

LossOnOutputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_features(X: torch.Tensor, n_features: int, problems: int | None) -> None:
    """X must be (N, F), or (B, N, F) for B side-by-side problems."""
    batched = problems is not None
    if X.dim() != (3 if batched else 2) or X.shape[-1] != n_features or (batched and X.shape[0] != problems):
        shape = f"({problems}, N, F)" if batched else "(N, F)"
        raise ValueError(f"X must have shape {shape} with F = {n_features}, got {tuple(X.shape)}")


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

    def no_weight_decay(self) -> set[str]:
        """The bias is (1, K) or (B, 1, K): a vector per problem, never decayed."""
        return {"bias"}

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        _check_features(X, self.n_features, self.problems)
        out = X @ self.weight + (self.bias if self.problems is not None else self.bias[0])
        return out.squeeze(-1) if self.n_outputs == 1 else out


class MLP(nn.Module):
    """One hidden ReLU layer: ``relu(X @ W1 + b1) @ W2 + b2``, initialised as ``nn.Linear`` is (uniform in
    ``+-1/sqrt(fan_in)``) from ``generator``, so a seed fixes the initial weights. Shapes as in
    :class:`Linear`, including ``problems=B`` for B independent networks side by side (each drawn
    from the generator in turn)."""

    def __init__(self, n_features: int, hidden: int, n_outputs: int = 1, *, problems: int | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        if min(n_features, hidden, n_outputs) < 1 or (problems is not None and problems < 1):
            raise ValueError(f"n_features, hidden, n_outputs and problems must be positive, got {n_features}, "
                             f"{hidden}, {n_outputs}, {problems}")
        self.n_features, self.n_outputs, self.problems = n_features, n_outputs, problems
        lead = () if problems is None else (problems,)

        def uniform(*shape, fan_in):
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter((torch.rand(*lead, *shape, generator=generator, dtype=dtype) * 2 - 1) * bound)

        self.w1, self.b1 = uniform(n_features, hidden, fan_in=n_features), uniform(1, hidden, fan_in=n_features)
        self.w2, self.b2 = uniform(hidden, n_outputs, fan_in=hidden), uniform(1, n_outputs, fan_in=hidden)

    def no_weight_decay(self) -> set[str]:
        """The biases are (1, H) or (B, 1, H): vectors per network, never decayed."""
        return {"b1", "b2"}

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        _check_features(X, self.n_features, self.problems)
        batched = self.problems is not None
        b1, b2 = (self.b1, self.b2) if batched else (self.b1[0], self.b2[0])
        out = torch.relu(X @ self.w1 + b1) @ self.w2 + b2
        return out.squeeze(-1) if self.n_outputs == 1 else out


def fit_full_batch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: LossOnOutputs, *,
                   steps: int = 1000, lr: float = 0.05, weight_decay: float = 0.0,
                   callback: Callable[[int, nn.Module], None] | None = None, callback_every: int = 1) -> list[float]:
    """Minimise the mean of ``loss_fn(model(X), y)`` by full-batch Adam (AdamW when ``weight_decay`` > 0,
    decaying weights but not biases, as :func:`minigpt.train.decay_groups` does), the learning rate decaying from ``lr`` to 0 along a half cosine, which lets non-smooth losses (MAE,
    pinball) settle instead of hopping around their kink. Returns the objective before each step.

    For a model of B independent problems (``Linear(..., problems=B)``) the objective is the sum over
    problems of each problem's mean loss. Adam's update is elementwise and each weight belongs to one
    problem, so every problem follows exactly the trajectory it would follow alone.

    Args:
        model: fitted in place.
        X: (N, F) features, or (B, N, F). y: targets in the shape ``loss_fn`` takes.
        loss_fn: per-example losses, ``reduction="none"``, e.g.
            ``lambda out, t: huber_loss(out, t, delta=0.5, reduction="none")``: shape (N, ...) or (B, N, ...).
        callback: called as ``callback(step, model)`` before the update of every ``callback_every``-th step
            and once after the last (``step == steps``), to record how training goes.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    history = []
    for step in range(steps):
        if callback is not None and step % callback_every == 0:
            callback(step, model)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        per_example = loss_fn(model(X), y)
        if per_example.dim() == 0:
            raise ValueError("loss_fn must return per-example losses (reduction='none'), got a scalar")
        batched = getattr(model, "problems", None) is not None
        loss = per_example.flatten(1).mean(1).sum() if batched else per_example.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {float(loss.detach())} at step {step}; lower lr ({lr})")
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    if callback is not None:
        callback(steps, model)
    return history


class SegmentationNet(nn.Module):
    """A small fully convolutional network for (N, 1, H, W) images: two 3x3 convolutions with ReLU (the
    second dilated, for a 7x7 receptive field) and a 1x1 convolution to one logit per pixel. ``seed``
    fixes the initial weights without disturbing the global random state."""

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # nn.Conv2d draws its initial weights from the global generator
        self.layers = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(channels, 1, 1),
        )
        torch.random.set_rng_state(gen_state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (N, 1, H, W), got {tuple(images.shape)}")
        return self.layers(images)
