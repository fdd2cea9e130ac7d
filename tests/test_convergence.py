import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt import convergence as cv
from minigpt.diagnostics import LRRangeResult, lr_range_test
from minigpt.small_models import MLP
from minigpt.train import EVAL_SEED, TrainConfig, train


def _data(problems=None, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if problems is None else (problems,)
    X = torch.randn(*lead, n, 5, generator=g, dtype=torch.float64)
    y = (X[..., 0] > 0).long() + (X[..., 1] > 0).long()  # three classes
    return X, y


def test_from_losses_matches_the_range_test():
    """A range test's own smoothed curve and stop are what from_losses computes from its batch losses."""
    model = torch.nn.Linear(1, 1, bias=False)
    x = torch.ones(8, 1)
    result = lr_range_test(model, lambda m: ((m(x) - 1) ** 2).mean(), start_lr=1e-3, end_lr=100.0, num_steps=60)
    again = LRRangeResult.from_losses(result.lrs, result.losses, diverge_factor=result.diverge_factor)
    assert again.smoothed == pytest.approx(result.smoothed) and again.stop_reason == result.stop_reason


def test_suggestion_rules_on_a_known_curve():
    lrs = list(np.logspace(-6, 1, 100))
    # flat, then falling linearly in log-rate between 1e-4 and 1e-1, then rising steeply
    x = np.log10(lrs)
    loss = np.where(x < -4, 2.0, np.where(x < -1, 2.0 - 0.5 * (x + 4), 0.5 + 3 * (x + 1)))
    r = LRRangeResult.from_losses(lrs, loss, smoothing=0.0, diverge_factor=1e9)
    assert r.min_over_ten_lr() == pytest.approx(r.min_loss_lr / 10)
    assert 1e-4 <= r.steepest_lr() <= 1e-1
    assert 1e-4 <= r.valley_lr() <= 1e-1
    s = cv.suggestions(r)
    assert list(s) == ["steepest", "minimum / 10", "valley"]
    cut = LRRangeResult.from_losses(lrs, loss, smoothing=0.0, diverge_factor=2.0)
    assert cut.stop_reason == "diverged" and cut.lrs[-1] < lrs[-1]
    with pytest.raises(ValueError, match="equally long"):
        LRRangeResult.from_losses(lrs, loss[:-1])


def test_side_by_side_problems_train_as_if_alone():
    """Two splits stacked train exactly as each alone (Adam is elementwise, the loss a sum of means)."""
    X, y = _data(problems=2)
    Xv, yv = _data(problems=2, seed=1)
    cfg = TrainConfig.adam(5, 1e-2, eval_iters=1, eval_interval=5, progress=False)
    task = cv.ClassificationTask(X, y, Xv, yv, batch_size=8)
    both = MLP(5, 4, 3, problems=2, generator=torch.Generator().manual_seed(0))
    train(both, task.get_batch, cfg, batch_loss=task.batch_loss)
    assert task.curve("train").shape == (5, 2) and task.curve("eval_val").shape == (2, 2)
    for p in range(2):
        alone = MLP(5, 4, 3)
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2"):
                getattr(alone, name).copy_(getattr(MLP(5, 4, 3, problems=2, generator=torch.Generator().manual_seed(0)), name)[p])
        single = cv.ClassificationTask(X[p], y[p], Xv[p], yv[p], batch_size=8)
        gen = torch.Generator().manual_seed(0)
        idx = [task.get_batch("train", gen)[1][p] for _ in range(5)]
        served = iter([("train", i) for i in idx])
        def get_batch(split, g):  # the stacked run's batches for this problem; evaluations see whole splits
            return next(served) if g.initial_seed() != EVAL_SEED else (split, None)

        train(alone, get_batch, cfg, batch_loss=single.batch_loss)
        assert np.allclose(single.curve("train")[:, 0], task.curve("train")[:, p], atol=1e-10)
        assert torch.allclose(alone.w1, both.w1[p], atol=1e-10)


def test_evaluation_covers_the_whole_split_and_l1_is_added():
    X, y = _data()
    model = MLP(5, 4, 3, generator=torch.Generator().manual_seed(0))
    task = cv.ClassificationTask(X, y, X[:10], y[:10], batch_size=4, l1=0.1)
    model.eval()
    loss_sum, n = task.batch_loss(model, ("train", None))
    full = F.cross_entropy(model(X), y, reduction="sum")
    assert n == 40 and loss_sum.item() == pytest.approx(full.item() + 0.1 * 40 * cv.l1_penalty(model).item(), rel=1e-9)
    assert task.records["eval_train"][0].item() == pytest.approx(full.item() / 40)
    with pytest.raises(ValueError, match="batch_size"):
        cv.ClassificationTask(X, y, X, y, batch_size=0)
    with pytest.raises(ValueError, match="loss"):
        cv.ClassificationTask(X, y, X, y, batch_size=4, loss="mse")


def test_guide_l1_raises_and_ours_sums_every_parameter():
    model = MLP(5, 4, 3)
    with pytest.raises(TypeError):
        cv.guide_l1_penalty(model)
    manual = sum(float(p.detach().abs().sum()) for p in model.parameters())
    assert cv.l1_penalty(model).item() == pytest.approx(manual)


def test_naive_bce_takes_log_of_zero_only_past_saturation():
    target = torch.tensor([0])
    moderate = torch.tensor([[3.0, -2.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(moderate, F.one_hot(target, 3).float(), reduction="sum")
    assert cv.naive_bce_loss(moderate, target, dtype=torch.float64).item() == pytest.approx(expected.item())
    assert torch.isnan(cv.naive_bce_loss(torch.tensor([[9.0, 0.0, 0.0]]), target)).all()  # float16: p == 1
    assert torch.isfinite(cv.naive_bce_loss(torch.tensor([[9.0, 0.0, 0.0]]), target, dtype=torch.float32)).all()


def _curves(train, eval_train, eval_val):
    train = np.asarray(train, dtype=float)
    ev = np.arange(len(eval_train)) * (len(train) // (len(eval_train) - 1))
    return cv.RunCurves(np.arange(1, len(train) + 1), train, ev, np.asarray(eval_train, float),
                        np.asarray(eval_val, float), math.log(10))


def test_diagnose_names_each_symptom():
    rng = np.random.default_rng(0)
    steps = 100
    t = np.arange(steps)
    smooth = 2.3 * np.exp(-t / 10) + 0.01
    e = np.linspace(0, 1, 11)
    fit = 2.3 * np.exp(-e * 10) + 0.01
    assert cv.diagnose(_curves(smooth, fit, fit + 0.1)) == "healthy"
    assert cv.diagnose(_curves(np.r_[smooth[:50], [np.nan]], fit, fit)) == "non-finite loss"
    assert cv.diagnose(_curves(smooth, np.r_[2.3, 5.0, fit[2:]], fit)) == "unstable"
    assert cv.diagnose(_curves(smooth, fit, np.full(11, 2.5))) == "no generalisation"
    assert cv.diagnose(_curves(smooth + rng.normal(0, 1, steps) ** 2, fit, fit + 0.1)) == "noisy"
    assert cv.diagnose(_curves(smooth, fit, np.r_[fit[:5], fit[5] + np.linspace(0, 1, 6)])) == "overfitting"
    slow = np.linspace(2.3, 1.5, 11)
    assert cv.diagnose(_curves(np.linspace(2.3, 1.5, steps), slow, slow)) == "too slow"
    high = 1.5 + 0.8 * np.exp(-e * 10)
    assert cv.diagnose(_curves(1.5 + 0.8 * np.exp(-t / 10), high, high)) == "underfitting"


def test_guide_rules_as_written():
    assert cv.guide_convergence_rule([1.0] * 5) == "not enough data"
    assert cv.guide_convergence_rule(np.linspace(1.0, 0.5, 10)) == "converging fast"
    assert cv.guide_convergence_rule(np.full(10, 1.0)) == "converged"
    assert cv.guide_convergence_rule(np.linspace(1.0, 0.95, 10)) == "converging slowly"
    assert cv.guide_capacity_rule(0.95, 0.6) == "overfitting"
    assert cv.guide_capacity_rule(0.6, 0.6) == "underfitting"
    assert cv.guide_capacity_rule(0.9, 0.88) == "capacity fine"
    assert cv.guide_capacity_rule(0.99, 0.8) == "needs further analysis"
    e = np.linspace(0, 1, 11)
    fit = 2.3 * np.exp(-e * 10)
    run = _curves(np.linspace(2, 0.1, 100), fit, np.r_[fit[:1], np.linspace(0.5, 1.0, 10)])
    assert cv.guide_diagnosis(run, 0.99, 0.9) == "val rising: overfitting"
    assert cv.guide_diagnosis(_curves([1.0, np.nan, 1.0], fit, fit), 0.5, 0.5) == "NaN: lr too high"


def test_setup_scales():
    small, full = cv.convergence_setup("small"), cv.convergence_setup("full")
    assert small.n_seeds >= 5 and full.n_seeds >= small.n_seeds and full.digits_run.max_iters > small.digits_run.max_iters
    assert small.gpt_seeds >= 5 and full.gpt_seeds >= small.gpt_seeds  # the chapter reports intervals over them
    with pytest.raises(ValueError, match="scale"):
        cv.convergence_setup("huge")


def test_rescaled_relu_net_is_the_same_function_and_guide_landscape_restores():
    X, y = _data()
    net = MLP(5, 4, 3, generator=torch.Generator().manual_seed(0))
    big = cv.rescale_relu_mlp(net, 4.0)
    assert torch.allclose(big(X), net(X), atol=1e-12) and big.w1.norm() > 3.9 * net.w1.norm()
    before = [p.detach().clone() for p in net.parameters()]
    losses, verdict = cv.guide_landscape(net, lambda m: F.cross_entropy(m(X), y), n=5,
                                         generator=torch.Generator().manual_seed(0))
    assert len(losses) == 5 and verdict in ("rugged", "smooth")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="c must"):
        cv.rescale_relu_mlp(net, 0.0)
