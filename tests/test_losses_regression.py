"""Regression losses against trusted references (torch.nn.functional, scikit-learn), in value and
gradient, float32 and float64, on random inputs and at the extremes (../shared/REFERENCES.md)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import mean_pinball_loss

from minigpt import losses

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}
DTYPES = [torch.float64, torch.float32]


def pair(dtype, scale=1.0, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x, y


def value_and_grad(fn, x, y, **kw):
    x = x.clone().requires_grad_(True)
    out = fn(x, y, **kw)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


REFERENCES = [
    (losses.mse_loss, F.mse_loss, {}),
    (losses.mae_loss, F.l1_loss, {}),
    (losses.huber_loss, F.huber_loss, {"delta": 1.0}),
    (losses.huber_loss, F.huber_loss, {"delta": 0.3}),
    (losses.huber_loss, F.huber_loss, {"delta": 7.0}),
    (losses.smooth_l1_loss, F.smooth_l1_loss, {"beta": 1.0}),
    (losses.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.25}),
    (losses.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ours, ref, kw", REFERENCES)
def test_matches_torch(ours, ref, kw, reduction, scale, dtype):
    x, y = pair(dtype, scale)
    got, got_grad = value_and_grad(ours, x, y, reduction=reduction, **kw)
    want, want_grad = value_and_grad(ref, x, y, reduction=reduction, **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_quantile_matches_sklearn(q):
    x, y = pair(torch.float64, shape=(200,))
    got = losses.quantile_loss(x, y, quantile=q)
    want = mean_pinball_loss(y.numpy(), x.numpy(), alpha=q)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert losses.quantile_loss(x, y, quantile=0.5).item() == pytest.approx(0.5 * F.l1_loss(x, y).item())


def test_quantile_minimiser_is_the_quantile():
    """The constant that minimises the pinball loss over a sample is that sample's q-quantile."""
    y = torch.randn(2001, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    for q in (0.1, 0.5, 0.9):
        risk = torch.stack([losses.quantile_loss(c.expand_as(y), y, quantile=q) for c in grid])
        best = grid[risk.argmin()].item()
        assert best == pytest.approx(torch.quantile(y, q).item(), abs=2e-3)


def test_multi_quantile_is_the_mean_of_single_quantiles():
    qs = [0.1, 0.5, 0.9]
    x = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    got = losses.multi_quantile_loss(x, y, qs)
    want = sum(losses.quantile_loss(x[:, i], y, quantile=q) for i, q in enumerate(qs)) / 3
    torch.testing.assert_close(got, want)
    assert losses.multi_quantile_loss(x, y, qs, reduction="none").shape == (50, 3)


def test_log_cosh_stable_form():
    r = torch.linspace(-20, 20, 401, dtype=torch.float64)
    zero = torch.zeros_like(r)
    torch.testing.assert_close(losses.log_cosh_loss(r, zero, reduction="none"), torch.log(torch.cosh(r)))
    # where the naive form overflows, the stable one is |r| - log 2 and its gradient is tanh(r) = +-1
    for dtype, big in ((torch.float32, 1e4), (torch.float64, 1e4), (torch.float32, 1e30)):
        r = torch.tensor([-big, big], dtype=dtype)
        assert torch.isinf(torch.log(torch.cosh(r))).all()  # the naive form fails here
        value, grad = value_and_grad(losses.log_cosh_loss, r, torch.zeros_like(r), reduction="none")
        torch.testing.assert_close(value, r.abs() - math.log(2), **TOL[dtype])
        torch.testing.assert_close(grad, torch.tanh(r))


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_cosh_gradient_is_tanh(dtype):
    x, y = pair(dtype, scale=3.0)
    _, grad = value_and_grad(losses.log_cosh_loss, x, y, reduction="none")
    torch.testing.assert_close(grad, torch.tanh(x - y), **TOL[dtype])


@pytest.mark.parametrize("fn, kw", [
    (losses.log_cosh_loss, {}), (losses.quantile_loss, {"quantile": 0.3}),
    (losses.huber_loss, {"delta": 0.7}), (losses.smooth_l1_loss, {"beta": 0.7}),
])
def test_gradcheck(fn, kw):
    x, y = pair(torch.float64, shape=(6,))
    x = (x + 0.05).requires_grad_(True)  # keep away from the kinks, where gradcheck is undefined
    assert torch.autograd.gradcheck(lambda a: fn(a, y, reduction="sum", **kw), (x,))


@pytest.mark.parametrize("fn, kw", [
    (losses.mae_loss, {}), (losses.huber_loss, {"delta": 1.0}), (losses.smooth_l1_loss, {"beta": 1.0}),
    (losses.log_cosh_loss, {}), (losses.quantile_loss, {"quantile": 0.9}),
])
@pytest.mark.parametrize("big", [1e4, 1e30])
def test_robust_losses_finite_at_extremes(fn, kw, big):
    x = torch.tensor([-big, 0.0, big], dtype=torch.float32)
    value, grad = value_and_grad(fn, x, torch.zeros_like(x), reduction="none", **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


@settings(max_examples=60, deadline=None)
@given(delta=st.floats(0.01, 100.0), scale=st.floats(0.01, 1000.0), seed=st.integers(0, 10_000))
def test_huber_is_delta_times_smooth_l1(delta, scale, seed):
    x, y = pair(torch.float64, scale, seed=seed)
    torch.testing.assert_close(losses.huber_loss(x, y, delta=delta),
                               delta * losses.smooth_l1_loss(x, y, beta=delta), rtol=1e-10, atol=1e-12)


def test_bad_inputs_name_the_argument():
    x = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="target must have the shape of input"):
        losses.mse_loss(x, torch.zeros(4))  # torch would broadcast this to 4 x 4
    with pytest.raises(ValueError, match="input must be a floating-point"):
        losses.mae_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        losses.mse_loss(torch.zeros(3), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="delta must be > 0"):
        losses.huber_loss(torch.zeros(3), torch.zeros(3), delta=0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        losses.smooth_l1_loss(torch.zeros(3), torch.zeros(3), beta=-1.0)
    for q in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="quantile must lie strictly between 0 and 1"):
            losses.quantile_loss(torch.zeros(3), torch.zeros(3), quantile=q)
    with pytest.raises(ValueError, match="reduction"):
        losses.log_cosh_loss(torch.zeros(3), torch.zeros(3), reduction="avg")
    with pytest.raises(ValueError, match="last dimension of len"):
        losses.multi_quantile_loss(torch.zeros(5, 2), torch.zeros(5), [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="target must have shape"):
        losses.multi_quantile_loss(torch.zeros(5, 3), torch.zeros(4), [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="quantiles must lie strictly"):
        losses.multi_quantile_loss(torch.zeros(5, 2), torch.zeros(5), [0.1, 1.5])
