import pytest
import torch
from torch.distributions import Normal, kl_divergence

from minigpt.losses import vae


def posterior(seed=0, B=16, D=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = posterior()
    want = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(vae.gaussian_kl(mu, logvar, reduction="none"), want)
    torch.testing.assert_close(vae.gaussian_kl(mu, logvar), want.sum() / 16)
    assert vae.gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2)).item() == 0.0  # the prior itself


def test_free_bits_clamps_batch_averaged_groups():
    mu, logvar = posterior(seed=1)
    per_dim = vae.gaussian_kl(mu, logvar, reduction="none").mean(0)
    lam = float(per_dim.median())
    fb = vae.free_bits_kl(mu, logvar, free_bits=lam)
    torch.testing.assert_close(fb.loss, torch.clamp(per_dim, min=lam).sum())
    torch.testing.assert_close(fb.kl, per_dim.sum())  # the unclamped KL, to report
    groups = [[0, 1, 2], [3, 4, 5]]
    fbg = vae.free_bits_kl(mu, logvar, free_bits=100.0, groups=groups)
    assert fbg.loss.item() == 200.0 and fbg.per_group.shape == (2,)
    # below the floor a group gets no gradient from the KL term
    mu_g = mu.clone().requires_grad_(True)
    vae.free_bits_kl(mu_g, logvar, free_bits=1e6).loss.backward()
    assert mu_g.grad.abs().max() == 0
    with pytest.raises(ValueError, match="partition"):
        vae.free_bits_kl(mu, logvar, free_bits=0.1, groups=[[0, 1]])


def test_beta_schedules():
    assert [vae.linear_beta(s, 10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    betas = [vae.cyclical_beta(s, total_steps=400, n_cycles=4, ramp_fraction=0.5) for s in range(400)]
    assert betas[0] == 0.0 and betas[25] == 0.5 and betas[50] == 1.0 and betas[99] == 1.0
    assert betas[100] == 0.0 and betas[399] == 1.0  # four cycles
    assert sum(b == 0.0 for b in betas) == 4


def test_active_units():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(500, 4, generator=g)
    mu[:, 1] = 0.3  # collapsed: the same mean for every input
    mu[:, 3] *= 0.05  # variance 0.0025 < 0.01
    assert vae.active_units(mu) == 2
