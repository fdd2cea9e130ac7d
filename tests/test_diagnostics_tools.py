"""The diagnostics toolkit: gradient and weight statistics, the text report, the LR range test, loss
landscapes and the label-noise finder, each on a problem whose answer is known."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from minigpt.diagnostics import (
    GradientRecorder, LossTracker, confident_wrong, diagnostic_report, filter_normalized_direction,
    gradient_stats, group_norms, loss_landscape, lr_range_test, next_batch_loss, out_of_fold_logits,
    parameter_stats,
)
from minigpt.model import GPT
from minigpt.train import TrainConfig, train


# --- gradients, weights, report ---------------------------------------------------------------------

class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)
        self.unused = nn.Linear(2, 2)  # never called: gets no gradient

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_gradient_stats_match_the_gradients():
    torch.manual_seed(0)
    model = TwoLayer()
    model(torch.randn(5, 3)).pow(2).sum().backward()
    stats = {s.name: s for s in gradient_stats(model)}
    assert list(stats) == [n for n, _ in model.named_parameters()]
    g = model.first.weight.grad
    s = stats["first.weight"]
    assert s.norm == pytest.approx(float(g.norm())) and s.rms == pytest.approx(float(g.norm()) / math.sqrt(12))
    assert s.abs_max == pytest.approx(float(g.abs().max()))
    assert s.zero_fraction == pytest.approx(float((g == 0).float().mean()))
    assert s.ratio == pytest.approx(float(g.norm() / model.first.weight.detach().norm()))
    assert not stats["unused.weight"].has_grad and math.isnan(stats["unused.weight"].norm)
    # groups combine to the global norm that clipping sees
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    groups = group_norms(stats.values(), depth=1)
    assert set(groups) == {"first", "second"}
    assert math.sqrt(sum(v ** 2 for v in groups.values())) == pytest.approx(float(total))


def test_report_flags_what_is_wrong_and_only_that():
    torch.manual_seed(0)
    model = TwoLayer()
    model(torch.randn(5, 3)).pow(2).sum().backward()
    report = diagnostic_report(model)
    assert "unused.weight: no gradient" in report and "unused.bias: no gradient" in report
    assert "non-finite" not in report
    model.second.weight.grad[0, 0] = float("nan")
    report = diagnostic_report(model)
    assert "second.weight: 1 non-finite gradient entries" in report
    # a layer learning 1000x faster than the others is flagged, relative to the model's own median
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    assert "gradient/weight ratio" not in diagnostic_report(model, ratio_factor=100)
    model[0].weight.grad *= 1e4
    assert "0.weight: gradient/weight ratio" in diagnostic_report(model, ratio_factor=100)
    # biases and norm gains live on other scales (a gain starts at 1): only matrices are compared
    model[0].weight.grad /= 1e4
    model[0].bias.grad *= 1e4
    assert "gradient/weight ratio" not in diagnostic_report(model, ratio_factor=100)


def test_parameter_stats_match_numpy():
    torch.manual_seed(0)
    model = TwoLayer()
    stats = {s.name: s for s in parameter_stats(model, quantiles=(0.1, 0.5, 0.9))}
    w = model.first.weight.detach().double().numpy().ravel()
    s = stats["first.weight"]
    assert s.numel == 12 and s.mean == pytest.approx(w.mean()) and s.std == pytest.approx(w.std())
    assert s.quantiles[0.5] == pytest.approx(np.median(w)) and s.quantiles[0.9] == pytest.approx(np.quantile(w, 0.9))
    assert s.abs_max == pytest.approx(np.abs(w).max()) and s.nonfinite == 0
    with pytest.raises(ValueError, match="quantiles"):
        parameter_stats(model, quantiles=(1.5,))


def test_recorder_sees_the_norm_training_clips(corpus, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    rec = GradientRecorder(every=2)
    result = train(model, corpus.batch_fn(4, 16), TrainConfig(max_iters=6, eval_iters=0, progress=False),
                   grad_hook=rec)
    assert rec.steps == [2, 4, 6]
    assert len(rec.first) == len(rec.last) and rec.first[0].weight_norm != rec.last[0].weight_norm  # update 1's
    recorded = np.array(result.history.grad_norm)[[1, 3, 5]]
    np.testing.assert_allclose(rec.total, recorded, rtol=1e-5)
    blocks = rec.group_series(depth=3)
    assert "transformer.h.0" in blocks and "transformer.h.1" in blocks and len(blocks["transformer.h.0"]) == 3
    np.testing.assert_allclose(np.sqrt(sum(v ** 2 for v in blocks.values())), rec.total, rtol=1e-5)
    with pytest.raises(ValueError, match="every"):
        GradientRecorder(every=0)


def test_loss_tracker_shares_and_trends():
    tracker = LossTracker()
    for step in range(1, 101):
        tracker.update(step, recon=torch.tensor(3.0 - 0.01 * step), kl=0.5)
    summary = tracker.summary(window=50)
    assert summary["recon"].slope == pytest.approx(-0.01) and summary["kl"].slope == pytest.approx(0.0, abs=1e-12)
    assert summary["recon"].share + summary["kl"].share == pytest.approx(1.0)
    assert summary["recon"].last == pytest.approx(2.0)
    assert "recon" in diagnostic_report(losses=tracker)
    with pytest.raises(ValueError, match="same at every step"):
        tracker.update(101, recon=1.0)
    with pytest.raises(ValueError, match="step must increase"):
        tracker.update(100, recon=1.0, kl=1.0)
    with pytest.raises(ValueError, match="scalar"):
        tracker.update(102, recon=torch.ones(2), kl=1.0)
    with pytest.raises(ValueError, match="needs a model"):
        diagnostic_report()


# --- LR range test ----------------------------------------------------------------------------------

def _quadratic_problem():
    """Least squares, loss 0.5 * mean squared error: full-batch gradient descent diverges exactly when the
    learning rate exceeds 2 / (largest eigenvalue of X^T X / n)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=gen, dtype=torch.float64) * torch.tensor([1, 2, 3, 0.5, 1.0], dtype=torch.float64)
    y = X @ torch.randn(5, generator=gen, dtype=torch.float64)
    critical = 2 / float(torch.linalg.eigvalsh(X.T @ X / len(X)).max())
    model = nn.Linear(5, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model, (lambda m: 0.5 * ((m(X).squeeze(1) - y) ** 2).mean()), critical


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_lr_range_stops_only_past_the_known_divergence_point():
    model, loss, critical = _quadratic_problem()
    before = model.weight.detach().clone()
    result = lr_range_test(model, loss, start_lr=1e-4, end_lr=100.0, num_steps=200, make_optimizer=_sgd)
    assert result.stop_reason == "diverged"
    # below the critical rate gradient descent never raises this loss, so the test cannot stop there
    assert result.lrs[-1] > critical
    assert torch.equal(model.weight, before)  # weights restored exactly
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, math.log(1e6) / 199, rtol=1e-9)  # exponential schedule
    assert result.lrs[0] == pytest.approx(1e-4)


def test_lr_range_reaches_end_lr_and_smooths_without_bias():
    model = nn.Linear(1, 1)
    result = lr_range_test(model, lambda m: m.weight.sum() * 0 + 2.0, start_lr=1e-3, end_lr=1e-1, num_steps=7,
                           make_optimizer=_sgd)
    assert result.stop_reason == "end_lr" and result.lrs[-1] == pytest.approx(1e-1)  # the notes stop one factor short
    np.testing.assert_allclose(result.smoothed, 2.0)  # bias-corrected: a constant loss smooths to itself


def test_one_bad_batch_stops_the_raw_rule_not_the_smoothed_one():
    spikes = iter([1.0] * 5 + [6.0] + [1.0] * 14)
    model = nn.Linear(1, 1)
    loss = lambda m: m.weight.sum() * 0 + next(spikes)  # noqa: E731
    smoothed = lr_range_test(model, loss, num_steps=20, make_optimizer=_sgd)
    assert smoothed.stop_reason == "end_lr"
    spikes = iter([1.0] * 5 + [6.0] + [1.0] * 14)
    raw = lr_range_test(model, loss, num_steps=20, smoothing=0.0, make_optimizer=_sgd)
    assert raw.stop_reason == "diverged" and len(raw.lrs) == 6


def test_lr_range_on_minigpt_and_bad_arguments(corpus, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_range_test(model, next_batch_loss(corpus.batch_fn(4, 16)), start_lr=1e-5, end_lr=10.0, num_steps=60)
    assert result.stop_reason in ("diverged", "non-finite")
    assert min(result.smoothed) < result.smoothed[0] - 0.1  # it learned something on the way
    assert 1e-5 < result.steepest_lr(skip_start=5) < result.lrs[-1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="start_lr"):
        lr_range_test(model, lambda m: torch.tensor(1.0), start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        lr_range_test(model, lambda m: torch.tensor(1.0), num_steps=1)
    with pytest.raises(ValueError, match="smoothing"):
        lr_range_test(model, lambda m: torch.tensor(1.0), smoothing=1.0)
    with pytest.raises(ValueError, match="diverge_factor"):
        lr_range_test(model, lambda m: torch.tensor(1.0), diverge_factor=0.5)


# --- loss landscapes --------------------------------------------------------------------------------

def test_filter_normalised_directions_have_the_weights_norms():
    torch.manual_seed(0)
    model = TwoLayer()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.count_nonzero(d[name]) == 0  # biases stay put (Li et al.'s choice)
        else:
            torch.testing.assert_close(d[name].norm(dim=1), p.detach().norm(dim=1))
    d_all = filter_normalized_direction(model, torch.Generator().manual_seed(1), ignore_1d=False)
    torch.testing.assert_close(d_all["first.bias"].norm(), model.first.bias.detach().norm())


class Bowl(nn.Module):
    """L(theta) = 0.5 ||theta - c||^2 with its minimum at c."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.theta = nn.Parameter(c.clone())

    def loss(self):
        return float(0.5 * (self.theta - self.c).pow(2).sum())


def test_landscape_of_a_known_bowl():
    c = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    model = Bowl(c)
    d1 = {"theta": torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)}
    d2 = {"theta": torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)}
    alphas = np.linspace(-1, 1, 5)
    one = loss_landscape(model, lambda m: m.loss(), alphas, directions=(d1,))
    np.testing.assert_allclose(one.curve, 0.5 * alphas ** 2)  # 0.5 a^2 ||d||^2 with ||d|| = 1
    two = loss_landscape(model, lambda m: m.loss(), alphas, alphas, directions=(d1, d2))
    np.testing.assert_allclose(two.losses, 0.5 * alphas[None, :] ** 2 + 0.5 * 4 * alphas[:, None] ** 2)
    assert two.center_loss == 0.0 and torch.equal(model.theta.detach(), c)


def test_landscape_restores_weights_even_on_error(corpus, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = corpus.batch_fn(8, 16)("val", torch.Generator().manual_seed(0))
    evaluate = lambda m: float(m(x, y)[1])  # noqa: E731
    scape = loss_landscape(model, evaluate, np.linspace(-0.5, 0.5, 5), generator=torch.Generator().manual_seed(0))
    assert scape.curve[2] == pytest.approx(scape.center_loss)  # a = 0 is the model itself
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training

    calls = iter(range(100))

    def failing(m):
        if next(calls) == 2:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, failing, [0.5, 1.0, 2.0], generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="directions"):
        loss_landscape(model, evaluate, [0.0], directions=({},))
    with pytest.raises(ValueError, match="alphas"):
        loss_landscape(model, evaluate, [])


# --- label noise ------------------------------------------------------------------------------------

def test_confident_wrong_by_the_definition():
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98], [0.97, 0.03]]))
    labels = torch.tensor([1, 1, 1, 0])
    found = confident_wrong(logits, labels, threshold=0.9)
    assert found.indices.tolist() == [0]  # only example 0: wrong and more than 90% sure
    assert found.suggested.tolist() == [0] and found.confidence[0] == pytest.approx(0.95)
    assert found.given_prob[0] == pytest.approx(0.05)
    assert found.precision_recall([0, 1]) == (1.0, 0.5)


def test_per_class_thresholds_adapt_to_a_less_confident_class():
    # class 1 is never predicted above 0.7, so a fixed 0.9 can never flag an example as "really class 1"
    p = np.array([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.3, 0.7], [0.32, 0.68]])
    labels = np.array([0, 0, 1, 1, 0])  # the last one is labelled 0 but looks like class 1
    assert len(confident_wrong(np.log(p), labels, threshold=0.9)) == 0
    found = confident_wrong(np.log(p), labels, threshold="per_class")
    assert found.indices.tolist() == [4] and found.suggested.tolist() == [1]


def _one_nn(X_train, y_train, X_test, k=7):
    """Distance-weighted k-nearest-neighbour log-probabilities (sklearn's ``weights="distance"``): a training
    point is its own nearest neighbour at distance 0, so in-sample it memorises every label, flipped ones
    included."""
    d = np.sqrt(((X_test[:, None, :] - X_train[None, :, :]) ** 2).sum(-1))
    nearest = np.argsort(d, axis=1)[:, :k]
    w = 1.0 / (np.take_along_axis(d, nearest, 1) + 1e-12)
    votes = np.stack([(w * (y_train[nearest] == c)).sum(1) for c in range(2)], 1)
    return np.log(votes / votes.sum(1, keepdims=True) + 1e-12)


def test_in_sample_scores_hide_wrong_labels_out_of_fold_scores_find_them():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (100, 2)), rng.normal(3, 1, (100, 2))])
    y = np.repeat([0, 1], 100)
    flipped = rng.choice(200, 10, replace=False)
    noisy = y.copy()
    noisy[flipped] = 1 - noisy[flipped]
    in_sample = _one_nn(X, noisy, X)
    assert len(confident_wrong(in_sample, noisy)) == 0  # the notes' recipe: blind to every flip
    oof = out_of_fold_logits(_one_nn, X, noisy, n_folds=5, seed=0)
    precision, recall = confident_wrong(oof, noisy).precision_recall(flipped)
    assert recall >= 0.5 and precision > 0.8  # seeds 0-4 of this setup: recall 0.6-1.0, precision 1.0


def test_label_noise_bad_input():
    with pytest.raises(ValueError, match="logits must have shape"):
        confident_wrong(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="labels must lie in"):
        confident_wrong(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        confident_wrong(np.zeros((2, 2)), np.array([0]))
    with pytest.raises(ValueError, match="integer"):
        confident_wrong(np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="threshold"):
        confident_wrong(np.zeros((2, 2)), np.array([0, 1]), threshold=1.5)
    with pytest.raises(ValueError, match="finite"):
        confident_wrong(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="n_folds"):
        out_of_fold_logits(_one_nn, np.zeros((3, 2)), np.zeros(3, dtype=int), n_folds=5)
    with pytest.raises(ValueError, match="same number"):
        out_of_fold_logits(_one_nn, np.zeros((3, 2)), np.zeros(4, dtype=int))


# --- the report on training runs with a fault injected (chapter 4) ----------------------------------

def _run_report(corpus, tiny_config, lr=1e-3, fault=None, steps=30):
    from minigpt.gradient_flow import detach_output, nan_in_embedding

    torch.manual_seed(0)
    model = GPT(tiny_config)
    if fault == "detach":
        detach_output(model.transformer.h[0])
    elif fault == "nan":
        nan_in_embedding(model.transformer.wte)
    elif fault == "frozen":
        model.transformer.wte.weight.requires_grad_(False)
    rec = GradientRecorder()
    config = TrainConfig(max_iters=steps, learning_rate=lr, min_lr=lr / 10, warmup_iters=5, grad_clip=None,
                         eval_iters=0, on_nonfinite="stop", progress=False)
    result = train(model, corpus.batch_fn(8, 16), config, grad_hook=rec)
    return diagnostic_report(gradients=rec.last, reference=rec.first, history=result)


def test_report_flags_each_injected_fault_and_not_a_healthy_run(corpus, tiny_config):
    assert _run_report(corpus, tiny_config).endswith("Flags: none")
    detached = _run_report(corpus, tiny_config, fault="detach")
    assert "transformer.h.0.attn.c_attn.weight: no gradient" in detached and "transformer.wpe.weight: no gradient" in detached
    assert "transformer.h.1.attn.c_attn.weight: no gradient" not in detached
    nan = _run_report(corpus, tiny_config, fault="nan")
    assert "non-finite gradient entries" in nan and "training stopped on a non-finite" in nan
    frozen = _run_report(corpus, tiny_config, fault="frozen")
    assert "transformer.wte.weight: no gradient" in frozen  # tied to the head: one tensor, frozen
    fast = _run_report(corpus, tiny_config, lr=1e-1)
    assert "times its" not in fast and "x its" in fast and "steps too large" in fast
    with pytest.raises(ValueError, match="growth_factor"):
        diagnostic_report(gradients=[], growth_factor=1.0)
    with pytest.raises(ValueError, match="reference"):
        diagnostic_report(parameters=[], reference=[])


def test_report_reads_a_training_history(corpus, tiny_config):
    from minigpt.train import History

    rising = History(step=[1, 2, 3], loss=[2.0, 2.5, 3.0], lr=[1e-3] * 3, grad_norm=[1.0, 2.0, 3.0], seconds=[0.1] * 3)
    report = diagnostic_report(history=rising)
    assert "training loss rose from 2 to 3" in report and "Training: 3 updates" in report
    falling = History(step=[1, 2], loss=[3.0, 2.0], lr=[1e-3] * 2, grad_norm=[1.0, 1.0], seconds=[0.1] * 2)
    assert diagnostic_report(history=falling).endswith("Flags: none")
