"""Loss landscapes along filter-normalised random directions (Li et al. 2018, "Visualizing the loss
landscape of neural nets").

A plot of ``L(theta + a d)`` against ``a`` says little unless ``d`` is scaled to the weights it moves: the
same step is huge for a layer of small weights and negligible for a layer of large ones, and networks
that compute the same function at different weight scales would look different. Li et al. rescale the
random direction filter by filter (here: row by row of every weight matrix, i.e. per output unit, and
per token row of an embedding) to the norm of the weights it perturbs, and leave biases and norm gains
unperturbed. Then ``a = 1`` means "a step as large as the weights themselves" in every unit.

The source notes instead add Gaussian noise of a fixed 0.01 to every weight and call the landscape
rugged when the spread of the losses exceeds 10% of their mean; the scale of that noise means something
different in every layer and every model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

Direction = dict[str, torch.Tensor]


@torch.no_grad()
def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None,
                                ignore_1d: bool = True) -> Direction:
    """A Gaussian random direction in parameter space, one tensor per named parameter, with every filter
    (slice along dimension 0 of a tensor with 2 or more dimensions) rescaled to the norm of the
    corresponding filter of the weights. 1-D parameters (biases, LayerNorm) get a zero direction when
    ``ignore_1d``, else are rescaled as a whole."""
    direction = {}
    for name, p in model.named_parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device=p.device)
        w = p.detach().double()
        if p.dim() <= 1:
            if ignore_1d:
                d.zero_()
            else:
                d *= w.norm() / d.norm().clamp_min(1e-12)
        else:
            d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            scale = w_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = (d_rows * scale).reshape(p.shape)
        direction[name] = d.to(p.dtype)
    return direction


@contextmanager
def _restored(model: nn.Module):
    """Keep an exact copy of the weights and put it back, however the block ends."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def _check_direction(model: nn.Module, direction: Direction, label: str) -> None:
    for name, p in model.named_parameters():
        if name not in direction:
            raise ValueError(f"{label} has no entry for parameter {name!r}")
        if direction[name].shape != p.shape:
            raise ValueError(f"{label}[{name!r}] must have shape {tuple(p.shape)}, got {tuple(direction[name].shape)}")


@dataclass
class Landscape:
    """Losses on a grid: ``losses[j, i]`` at ``alphas[i]`` along the first direction and ``betas[j]`` along
    the second (a 1-D landscape has ``betas == [0]`` and one row)."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    center_loss: float  # the loss at the unperturbed weights

    @property
    def curve(self) -> np.ndarray:
        """The 1-D landscape (the single row)."""
        if len(self.betas) != 1:
            raise ValueError("curve is defined for a 1-D landscape only; use losses")
        return self.losses[0]


@torch.no_grad()
def loss_landscape(model: nn.Module, evaluate_loss: Callable[[nn.Module], float], alphas, betas=None, *,
                   directions: tuple[Direction, ...] | None = None, generator: torch.Generator | None = None,
                   ignore_1d: bool = True) -> Landscape:
    """Evaluate ``evaluate_loss(model)`` at ``theta + a d1`` (1-D, ``betas=None``) or
    ``theta + a d1 + b d2`` (2-D) for every ``a`` in ``alphas`` and ``b`` in ``betas``.

    Args:
        evaluate_loss: the loss on fixed data, as a float (for example ``minigpt.train.evaluate`` on fixed
            batches). It is called with the model in eval mode.
        directions: one (1-D) or two (2-D) directions; default fresh filter-normalised directions drawn
            from ``generator``.
    The weights are restored exactly afterwards, even if ``evaluate_loss`` raises.
    """
    alphas = np.asarray(alphas, dtype=float)
    betas_arr = np.zeros(1) if betas is None else np.asarray(betas, dtype=float)
    if alphas.ndim != 1 or betas_arr.ndim != 1 or len(alphas) == 0 or len(betas_arr) == 0:
        raise ValueError("alphas (and betas) must be non-empty 1-D sequences of step sizes")
    n_dirs = 1 if betas is None else 2
    if directions is None:
        directions = tuple(filter_normalized_direction(model, generator, ignore_1d) for _ in range(n_dirs))
    if len(directions) != n_dirs:
        raise ValueError(f"directions must hold {n_dirs} direction(s) for a {n_dirs}-D landscape, got {len(directions)}")
    for k, d in enumerate(directions):
        _check_direction(model, d, f"directions[{k}]")
    was_training = model.training
    model.eval()
    losses = np.empty((len(betas_arr), len(alphas)))
    params = dict(model.named_parameters())
    try:
        with _restored(model) as theta:
            center = float(evaluate_loss(model))
            for j, b in enumerate(betas_arr):
                for i, a in enumerate(alphas):
                    for name, p in params.items():
                        step = a * directions[0][name]
                        if n_dirs == 2:
                            step = step + b * directions[1][name]
                        p.copy_(theta[name] + step)
                    losses[j, i] = float(evaluate_loss(model))
    finally:
        model.train(was_training)
    return Landscape(alphas, betas_arr, losses, center)
