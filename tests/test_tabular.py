"""minigpt.tabular (full-batch fits of small models) and the corruption models in minigpt.data."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import QuantileRegressor

from minigpt import losses
from minigpt.data import corrupt_targets, load_diabetes
from minigpt.report import percent
from minigpt.tabular import Linear, fit_full_batch


def _mse(p, t):
    return losses.mse_loss(p, t, reduction="none")


def test_mse_fit_reaches_least_squares():
    d = load_diabetes(dtype=torch.float64)
    model = Linear(d.n_features)
    fit_full_batch(model, d.X_train, d.y_train, _mse, steps=3000)
    A = torch.cat([d.X_train, torch.ones(len(d.X_train), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(A, d.y_train[:, None]).solution[:, 0]
    torch.testing.assert_close(model.weight[:, 0].detach(), w[:-1], rtol=0, atol=1e-8)
    torch.testing.assert_close(model.bias[0, 0].detach(), w[-1], rtol=0, atol=1e-8)


def test_pinball_fit_reaches_the_linear_programme():
    d = load_diabetes(dtype=torch.float64)
    model = Linear(d.n_features)
    # the kink makes the last digits slow: 2000 steps come within 0.03 percent of the exact optimum
    fit_full_batch(model, d.X_train, d.y_train, lambda p, t: losses.quantile_loss(p, t, quantile=0.9, reduction="none"),
                   steps=2000)
    exact = QuantileRegressor(quantile=0.9, alpha=0, solver="highs").fit(d.X_train.numpy(), d.y_train.numpy())
    exact_obj = losses.quantile_loss(torch.as_tensor(exact.predict(d.X_train.numpy())), d.y_train, quantile=0.9)
    ours = losses.quantile_loss(model(d.X_train).detach(), d.y_train, quantile=0.9)
    assert float(ours) <= float(exact_obj) * (1 + 5e-4)


def test_side_by_side_problems_fit_as_if_alone():
    splits = [load_diabetes(dtype=torch.float64, split_seed=s) for s in range(3)]
    X = torch.stack([d.X_train for d in splits])
    y = torch.stack([d.y_train for d in splits])
    huber = lambda p, t: losses.huber_loss(p, t, delta=0.5, reduction="none")  # noqa: E731
    together = Linear(10, problems=3)
    fit_full_batch(together, X, y, huber, steps=300)
    for b in range(3):
        alone = Linear(10)
        fit_full_batch(alone, X[b], y[b], huber, steps=300)
        torch.testing.assert_close(together.weight[b].detach(), alone.weight.detach(), rtol=0, atol=1e-12)
    assert together(X).shape == (3, len(splits[0].y_train))
    assert Linear(10, 3, problems=3)(X).shape == (3, len(splits[0].y_train), 3)


def test_bad_arguments():
    model = Linear(4)
    with pytest.raises(ValueError, match="X must have shape"):
        model(torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="X must have shape"):
        Linear(4, problems=2)(torch.zeros(3, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        Linear(0)
    X, y = torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction='none'"):
        fit_full_batch(model, X, y, lambda p, t: losses.mse_loss(p, t))
    with pytest.raises(ValueError, match="steps"):
        fit_full_batch(model, X, y, _mse, steps=0)
    with pytest.raises(FloatingPointError, match="lower lr"):
        fit_full_batch(model, X, y, lambda p, t: (p - t) / 0.0 * 0.0)


def test_corrupt_targets_does_what_it_says():
    y = torch.zeros(4, 200, dtype=torch.float64)
    out, mask = corrupt_targets(y, 0.1, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [20] * 4  # exactly the share, per row
    assert (out[~mask] == 0).all() and (out[mask] >= 5).all() and (out[mask] <= 15).all()
    assert not torch.equal(mask[0], mask[1])  # rows corrupted independently
    single, m1 = corrupt_targets(y[0], 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(single, y[0]) and not m1.any()
    with pytest.raises(ValueError, match="rate"):
        corrupt_targets(y, 1.5, torch.Generator())
    with pytest.raises(ValueError, match="floating"):
        corrupt_targets(torch.zeros(3, dtype=torch.long), 0.1, torch.Generator())
    with pytest.raises(ValueError, match="low"):
        corrupt_targets(y, 0.1, torch.Generator(), low=3, high=1)


def test_percent():
    assert percent(0.2) == "20%" and percent(0.0512, 1) == "5.1%" and percent(np.float64(1)) == "100%"
