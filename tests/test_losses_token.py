"""The lean token-level losses against F.cross_entropy and the focal-loss formula, in value and gradient
(float32 and float64), through gradcheck, and at the extremes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import losses

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-6)}
DTYPES = [torch.float64, torch.float32]


def data(dtype=torch.float64, N=40, C=9, scale=2.0, seed=0, ignore=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[list(ignore)] = -100
    w = torch.rand(C, generator=g, dtype=torch.float64).to(dtype) + 0.2
    return x, y, w


def value_grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [2.0, 1e4])
def test_cross_entropy_matches_torch(dtype, weighted, eps, reduction, scale):
    x, y, w = data(dtype, scale=scale)
    kw = dict(weight=w if weighted else None, label_smoothing=eps, reduction=reduction)
    got, got_g = value_grad(losses.cross_entropy, x, y, **kw)
    want, want_g = value_grad(F.cross_entropy, x, y, **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_g, want_g, **TOL[dtype])
    assert torch.isfinite(got_g).all()


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 0.85), C=st.integers(2, 12), seed=st.integers(0, 1000))
def test_smoothing_conventions_map_onto_each_other(eps, C, seed):
    x, y, _ = data(C=C, seed=seed, ignore=())
    others = losses.cross_entropy(x, y, label_smoothing=eps, smoothing_convention="others")
    # by definition: 1 - eps on the true class, eps / (C - 1) on each other class
    q = torch.full_like(x, eps / (C - 1)).scatter(1, y[:, None], 1 - eps)
    torch.testing.assert_close(others, -(q * torch.log_softmax(x, 1)).sum(1).mean())
    if eps * C / (C - 1) <= 1:  # where PyTorch's convention can express it
        torch.testing.assert_close(others, F.cross_entropy(x, y, label_smoothing=eps * C / (C - 1)))


def focal_formula(x, y, gamma, alpha=None):
    keep = y != -100
    ys = y[keep]
    logp = torch.log_softmax(x[keep], 1).gather(1, ys[:, None])[:, 0]
    a = torch.ones_like(logp) if alpha is None else alpha[ys]
    return (-a * (1 - logp.exp()) ** gamma * logp).sum() / a.sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_focal_matches_formula(dtype, gamma, weighted):
    x, y, w = data(dtype, seed=2)
    alpha = w if weighted else None
    got, got_g = value_grad(losses.softmax_focal_loss, x, y, gamma=gamma, alpha=alpha)
    want, want_g = value_grad(focal_formula, x, y, gamma, alpha)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_g, want_g, **TOL[dtype])


def test_focal_with_gamma_zero_is_cross_entropy():
    x, y, w = data(seed=3)
    torch.testing.assert_close(losses.softmax_focal_loss(x, y, gamma=0.0), F.cross_entropy(x, y))
    torch.testing.assert_close(losses.softmax_focal_loss(x, y, gamma=0.0, alpha=w), F.cross_entropy(x, y, weight=w))
    # focusing only ever lowers a token's loss
    per_token = losses.softmax_focal_loss(x, y, gamma=2.0, reduction="none")
    assert (per_token <= F.cross_entropy(x, y, reduction="none") + 1e-12).all()


@pytest.mark.parametrize("fn, kw", [
    (losses.softmax_focal_loss, dict(gamma=2.0)), (losses.softmax_focal_loss, dict(gamma=0.5)),
    (losses.cross_entropy, dict(label_smoothing=0.2)),
])
def test_gradcheck(fn, kw):
    x, y, w = data(N=8, C=5, seed=4, ignore=(2,))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, y, reduction="none", **kw), (x,))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_extremes_no_nan(gamma):
    # confidently right (p_y -> 1: the gamma < 1 term is 0 * inf in a naive backward) and confidently wrong
    x = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4]])
    y = torch.tensor([0, 0])
    value, grad = value_grad(losses.softmax_focal_loss, x, y, gamma=gamma, reduction="none")
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert value[0] == 0 and value[1] > 1e3


def test_naive_focal_equals_fused():
    x, y, _ = data(seed=5, ignore=())
    torch.testing.assert_close(losses.naive_softmax_focal_loss(x, y, gamma=2.0),
                               losses.softmax_focal_loss(x, y, gamma=2.0))


def test_bad_inputs_name_the_argument():
    x, y, w = data()
    with pytest.raises(ValueError, match="target is all ignore_index"):
        losses.cross_entropy(x, torch.full_like(y, -100))
    with pytest.raises(ValueError, match="target holds class indices outside"):
        losses.softmax_focal_loss(x, torch.full_like(y, 9))
    with pytest.raises(ValueError, match="weight must be a tensor of shape"):
        losses.cross_entropy(x, y, weight=w[:3])
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        losses.cross_entropy(x, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="smoothing_convention"):
        losses.cross_entropy(x, y, smoothing_convention="pytorch")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        losses.softmax_focal_loss(x, y, gamma=-0.5)
    with pytest.raises(ValueError, match="input must be a floating"):
        losses.cross_entropy(x.view(4, 10, 9), y)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), C=st.integers(2, 30), scale=st.floats(0.1, 50.0), weighted=st.booleans())
def test_focal_with_gamma_zero_is_cross_entropy_property(seed, C, scale, weighted):
    x, y, w = data(C=C, scale=scale, seed=seed)
    alpha = w if weighted else None
    torch.testing.assert_close(losses.softmax_focal_loss(x, y, gamma=0.0, alpha=alpha),
                               F.cross_entropy(x, y, weight=alpha))
