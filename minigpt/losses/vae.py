"""VAE regularisation: the Gaussian KL term, free bits, KL-weight (beta) schedules, and active units.

The posterior is a diagonal Gaussian ``N(mu, exp(logvar))`` per example; the prior is ``N(0, I)``.
Shapes: ``mu`` and ``logvar`` are (B, D) with D latent dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import check_float_pair, check_reduction


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "batchmean") -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2), per latent dimension.

    Args:
        mu, logvar: (B, D).
        reduction: ``"none"`` (B, D); ``"batchmean"`` summed over dimensions, averaged over the batch (the
            ELBO's KL term per example, in nats); ``"sum"``; ``"mean"`` over all elements.
    """
    check_float_pair(mu, logvar, names=("mu", "logvar"))
    check_reduction(reduction, ("none", "batchmean", "sum", "mean"))
    if mu.ndim != 2:
        raise ValueError(f"mu must have shape (B, D), got {tuple(mu.shape)}")
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1.0 - logvar)
    if reduction == "none":
        return kl
    if reduction == "batchmean":
        return kl.sum() / mu.shape[0]
    return kl.sum() if reduction == "sum" else kl.mean()


@dataclass
class FreeBitsKL:
    """``loss``: the free-bits KL to optimise; ``kl``: the plain KL (report this one, it is the true
    cost); ``per_group``: the batch-averaged KL of each group before clamping."""

    loss: torch.Tensor
    kl: torch.Tensor
    per_group: torch.Tensor


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, *, free_bits: float,
                 groups: list[list[int]] | None = None) -> FreeBitsKL:
    """Free bits (Kingma et al. 2016): ``sum_g max(free_bits, KL_g)``, where ``KL_g`` is the KL of latent
    group g *averaged over the minibatch* (clamping per example instead would let every example keep
    ``free_bits`` nats of KL for free, which is a different and weaker constraint).

    A group below ``free_bits`` nats gets no gradient from the KL term, so the encoder may use that many
    nats of each group without being pushed back to the prior: a remedy for posterior collapse.

    Args:
        mu, logvar: (B, D). free_bits: lambda >= 0, in nats per group.
        groups: lists of latent indices; default one group per dimension.
    """
    if not free_bits >= 0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    kl_per_dim = gaussian_kl(mu, logvar, reduction="none").mean(dim=0)  # (D,) batch-averaged
    D = kl_per_dim.shape[0]
    if groups is None:
        per_group = kl_per_dim
    else:
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(D)):
            raise ValueError(f"groups must partition the {D} latent dimensions exactly once each")
        per_group = torch.stack([kl_per_dim[g].sum() for g in groups])
    return FreeBitsKL(torch.clamp(per_group, min=free_bits).sum(), kl_per_dim.sum(), per_group.detach())


def linear_beta(step: int, warmup_steps: int, beta_max: float = 1.0) -> float:
    """KL annealing (Bowman et al. 2016): beta rises linearly from 0 to ``beta_max`` over
    ``warmup_steps``, then stays."""
    if not warmup_steps >= 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    return beta_max * min(1.0, max(0, step) / warmup_steps)


def cyclical_beta(step: int, total_steps: int, n_cycles: int = 4, ramp_fraction: float = 0.5,
                  beta_max: float = 1.0) -> float:
    """Cyclical annealing (Fu et al. 2019): ``n_cycles`` equal cycles over ``total_steps``; in each, beta
    rises linearly from 0 to ``beta_max`` over the first ``ramp_fraction`` of the cycle, then holds."""
    if total_steps < 1 or n_cycles < 1:
        raise ValueError(f"total_steps and n_cycles must be >= 1, got {total_steps}, {n_cycles}")
    if not 0 < ramp_fraction <= 1:
        raise ValueError(f"ramp_fraction must lie in (0, 1], got {ramp_fraction}")
    period = total_steps / n_cycles
    position = (min(max(step, 0), total_steps - 1) % period) / period  # in [0, 1)
    return beta_max * min(1.0, position / ramp_fraction)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Active units (Burda et al. 2016): latent dimensions whose posterior mean varies across the data,
    ``Var_x[mu(x)] > threshold``. A collapsed dimension has the same mean for every input.

    Args:
        mu: (N, D) posterior means over a data set.
    """
    if not isinstance(mu, torch.Tensor) or mu.ndim != 2 or mu.shape[0] < 2:
        raise ValueError("mu must be an (N, D) tensor with N >= 2")
    return int((mu.double().var(dim=0, unbiased=True) > threshold).sum())

