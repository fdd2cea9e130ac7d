"""Posterior collapse in a VAE, read from the posteriors of a set of inputs: the check that
:func:`minigpt.diagnostics.diagnostic_report` runs when it is given ``latent=(mu, logvar)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.vae import active_units, gaussian_kl


@dataclass
class CollapseCheck:
    """``kl_per_dim`` (D,): KL(q(z|x) || N(0, I)) of each latent dimension averaged over the inputs, in nats;
    ``active``: dimensions whose posterior mean varies over the inputs, Var_x[mu] > ``threshold``
    (Burda et al. 2016); ``collapsed``: no dimension is active, or the total KL is below ``min_kl`` nats
    (the posterior is the prior for every input: the decoder gets nothing from z)."""

    kl_per_dim: torch.Tensor
    active: int
    threshold: float
    min_kl: float

    @property
    def kl(self) -> float:
        return float(self.kl_per_dim.sum())

    @property
    def collapsed(self) -> bool:
        return self.active == 0 or self.kl < self.min_kl

    def lines(self) -> list[str]:
        D = self.kl_per_dim.numel()
        top = ", ".join(f"{v:.3g}" for v in sorted(self.kl_per_dim.tolist(), reverse=True)[:4])
        return [f"Latent: {D} dimensions, {self.active} active (Var[mu] > {self.threshold:g}), KL {self.kl:.4g} nats "
                f"(largest per dimension: {top})"]

    def flags(self) -> list[str]:
        if not self.collapsed:
            return []
        D = self.kl_per_dim.numel()
        return [f"posterior collapse: {self.active} of {D} latent dimensions active (Var[mu] > {self.threshold:g}) "
                f"and KL {self.kl:.3g} nats (collapse below {self.min_kl:g}): the decoder gets next to nothing from z"]


@torch.no_grad()
def posterior_collapse(mu: torch.Tensor, logvar: torch.Tensor, *, threshold: float = 0.01,
                       min_kl: float = 0.1) -> CollapseCheck:
    """Check the posteriors ``N(mu, exp(logvar))`` of N inputs for collapse.

    Args:
        mu, logvar: (N, D), N >= 2 inputs (a held-out set, not one batch of a few).
        threshold: variance over the inputs above which a dimension's mean counts as active.
        min_kl: total KL in nats below which the posterior counts as collapsed even if means still vary.
    """
    if not isinstance(mu, torch.Tensor) or not isinstance(logvar, torch.Tensor) or mu.shape != logvar.shape:
        raise ValueError("mu and logvar must be tensors of the same (N, D) shape")
    if not (threshold > 0 and min_kl >= 0):
        raise ValueError(f"need threshold > 0 and min_kl >= 0, got {threshold}, {min_kl}")
    kl = gaussian_kl(mu.detach().double(), logvar.detach().double(), reduction="none").mean(dim=0)
    return CollapseCheck(kl.float().cpu(), active_units(mu.detach().cpu(), threshold), threshold, min_kl)
