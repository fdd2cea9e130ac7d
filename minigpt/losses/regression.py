"""Regression losses, with ``torch.nn.functional``'s calling convention.

Each takes ``input`` (predictions) and ``target`` of the same shape, any number of dimensions, and
``reduction`` in ``{"mean", "sum", "none"}``. Unlike torch's own, they refuse mismatched shapes instead
of broadcasting them. Residuals are ``r = input - target`` (for the quantile loss, ``target - input``,
as in the literature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import check_float_pair, check_floating, check_reduction, reduce


def mse_loss(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error, ``(input - target)^2``.

    The negative log-likelihood of a Gaussian with unit variance, up to a factor 1/2 and a constant.
    Its gradient ``2 r`` grows with the residual, so a few large residuals dominate it.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    return reduce((input - target) ** 2, reduction)


def mae_loss(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute error, ``|input - target|``: the Laplace negative log-likelihood up to scale and
    constant. Its gradient is ``sign(r)``: every residual pulls equally hard, however large."""
    check_float_pair(input, target)
    check_reduction(reduction)
    return reduce((input - target).abs(), reduction)


def huber_loss(input: torch.Tensor, target: torch.Tensor, *, delta: float = 1.0,
               reduction: str = "mean") -> torch.Tensor:
    """Huber loss (Huber 1964): quadratic for small residuals, linear for large ones.

    .. math::
        \\ell(r) = \\tfrac12 r^2 \\text{ if } |r| \\le \\delta, \\quad \\delta(|r| - \\tfrac12\\delta) \\text{ otherwise}

    Args:
        input, target: tensors of the same shape.
        delta: where the quadratic becomes linear (> 0); the gradient is capped at ``delta``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Equal to ``delta * smooth_l1_loss(input, target, beta=delta)`` and to ``F.huber_loss``.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    abs_r = (input - target).abs()
    quadratic = torch.clamp(abs_r, max=delta)  # the part of |r| inside the quadratic zone
    loss = 0.5 * quadratic ** 2 + delta * (abs_r - quadratic)
    return reduce(loss, reduction)


def smooth_l1_loss(input: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0,
                   reduction: str = "mean") -> torch.Tensor:
    """Smooth L1 (Girshick 2015): ``0.5 r^2 / beta`` if ``|r| < beta``, else ``|r| - 0.5 beta``.

    Args:
        beta: width of the quadratic zone (>= 0); ``beta = 0`` is the L1 loss. The gradient is capped
            at 1, whatever beta.

    Huber's loss divided by ``beta``: ``huber_loss(delta=b) == b * smooth_l1_loss(beta=b)``; the two
    agree only at 1. Equal to ``F.smooth_l1_loss``.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    abs_r = (input - target).abs()
    if beta == 0:
        return reduce(abs_r, reduction)
    quadratic = torch.clamp(abs_r, max=beta)
    loss = 0.5 * quadratic ** 2 / beta + (abs_r - quadratic)
    return reduce(loss, reduction)


def log_cosh_loss(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Log-cosh loss, ``log(cosh(r))``, computed stably as ``|r| + softplus(-2|r|) - log 2``.

    About ``r^2 / 2`` for small residuals and ``|r| - log 2`` for large ones; its gradient is
    ``tanh(r)``, bounded by 1. The naive ``torch.log(torch.cosh(r))`` overflows to inf once ``cosh``
    does (|r| > about 89 in float32, 710 in float64); this form never does.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    abs_r = (input - target).abs()
    loss = abs_r + F.softplus(-2.0 * abs_r) - math.log(2.0)
    return reduce(loss, reduction)


def _check_quantile(q: float, name: str = "quantile") -> None:
    if not 0.0 < q < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {q}")


def quantile_loss(input: torch.Tensor, target: torch.Tensor, *, quantile: float,
                  reduction: str = "mean") -> torch.Tensor:
    """Pinball (quantile) loss (Koenker and Bassett 1978), with residual ``r = target - input``:

    .. math::
        \\ell_q(r) = \\max(q\\, r,\\ (q - 1)\\, r)

    Minimised when ``input`` is the ``quantile``-th quantile of the target's distribution: under-
    predictions cost ``q`` per unit, over-predictions ``1 - q``.

    Args:
        quantile: q in (0, 1); 0.5 gives half the absolute error.

    Matches ``sklearn.metrics.mean_pinball_loss(target, input, alpha=quantile)``.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_quantile(quantile)
    r = target - input
    return reduce(torch.maximum(quantile * r, (quantile - 1.0) * r), reduction)


def multi_quantile_loss(input: torch.Tensor, target: torch.Tensor, quantiles, *,
                        reduction: str = "mean") -> torch.Tensor:
    """Pinball loss of several quantile predictions at once.

    Args:
        input: (..., Q) predictions, one per quantile.
        target: (...) targets, shared by the Q predictions.
        quantiles: Q values in (0, 1), in the order of ``input``'s last dimension.
        reduction: ``"mean"`` over all elements and quantiles, ``"sum"``, or ``"none"`` for (..., Q).

    Nothing forces the Q predictions to stay ordered: predictions of different quantiles can cross,
    which the book counts rather than hides.
    """
    check_reduction(reduction)
    check_floating(input, "input")
    check_floating(target, "target")
    # checked in float64, not in input's dtype: float16 rounds 0.9999 to 1 (an integer dtype would round
    # 0.1 to 0, the old error blaming the quantiles for the input's dtype)
    q = torch.as_tensor(quantiles, dtype=torch.float64)
    if q.ndim != 1 or len(q) == 0:
        raise ValueError(f"quantiles must be a non-empty 1-D sequence, got shape {tuple(q.shape)}")
    for value in q.tolist():
        _check_quantile(value, "quantiles")
    if input.ndim == 0 or input.shape[-1] != len(q):
        raise ValueError(f"input must have a last dimension of len(quantiles) = {len(q)}, got {tuple(input.shape)}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input without its last "
                         f"dimension), got {tuple(target.shape)}")
    r = target.unsqueeze(-1) - input  # (..., Q)
    q = q.to(device=input.device, dtype=input.dtype)
    return reduce(torch.maximum(q * r, (q - 1.0) * r), reduction)
