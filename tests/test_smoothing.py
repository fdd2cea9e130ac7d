"""Chapter 5's tools (minigpt.smoothing): the two smoothing conventions (and minigpt.losses.cross_entropy
against F.cross_entropy in both), temperature scaling, calibration summaries, Müller et al.'s picture and
side-by-side training, against closed forms, torch references and brute force. The confidence penalty and
the notes' adaptive smoothing are tested in test_losses_classification.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import losses
from minigpt.metrics import expected_calibration_error
from minigpt.small_models import MLP
from minigpt.smoothing import (calibration_summary, cluster_tightness, collect_logits, fit_side_by_side,
                               fit_temperature, label_smoothing_setup, mlp_features, smoothed_targets,
                               template_plane, train_full_batch)


def logits_and_labels(n=64, c=10, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=dtype) * scale), torch.randint(0, c, (n,), generator=g)


# ---- the two conventions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 10, 65])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_conventions_map_exactly(K, eps):
    y = torch.arange(K)
    uniform, others = smoothed_targets(y, K, eps), smoothed_targets(y, K, eps, "others")
    torch.testing.assert_close(uniform.sum(1), torch.ones(K, dtype=torch.float64))
    assert torch.allclose(torch.diagonal(uniform), torch.full((K,), 1 - eps + eps / K, dtype=torch.float64))
    assert torch.allclose(torch.diagonal(others), torch.full((K,), 1 - eps, dtype=torch.float64))
    torch.testing.assert_close(others, smoothed_targets(y, K, eps * K / (K - 1)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_others_convention_equals_torch_at_mapped_epsilon_with_ignore_and_weights(weighted, reduction):
    x, y = logits_and_labels(c=10)
    y[::5] = losses.IGNORE_INDEX
    w = torch.linspace(0.5, 3.0, 10, dtype=torch.float64) if weighted else None
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = losses.cross_entropy(a, y, weight=w, label_smoothing=0.1, smoothing_convention="others", reduction=reduction)
    ref = F.cross_entropy(b, y, weight=w, label_smoothing=0.1 * 10 / 9, reduction=reduction)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_class_weights_weight_the_smoothing_term_too():
    """PyTorch's semantics (issue #104776): -sum_c w_c q_c log p_c, minimised at p proportional to w * q."""
    w = torch.tensor([5.0, 1, 1, 1], dtype=torch.float64)
    q = smoothed_targets(torch.tensor([2]), 4, 0.2)[0]
    x = torch.log(w * q).requires_grad_(True)
    loss = losses.cross_entropy(x[None], torch.tensor([2]), weight=w, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(loss, -(w * q * torch.log_softmax(x, 0)).sum())
    loss.backward()
    assert x.grad.abs().max() < 1e-12


def test_smoothed_targets_rejects_bad_arguments():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="convention"):
        smoothed_targets(y, 3, 0.1, "notes")
    with pytest.raises(ValueError, match="n_classes"):
        smoothed_targets(y, 1, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        smoothed_targets(y, 3, 1.5)


# ---- temperature scaling, summaries ----------------------------------------------------------------------

def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(z / 2): the NLL-optimal temperature is close to 2."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 5, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial((z / 2).softmax(1), 1, generator=g).squeeze(1)
    T = fit_temperature(z, y)
    assert abs(T.item() - 2) < 0.1


def test_fit_temperature_is_the_nll_minimum_per_model():
    x, _ = logits_and_labels(n=400, c=4, scale=5.0)
    y = torch.multinomial((x / 1.5).softmax(1), 1, generator=torch.Generator().manual_seed(2)).squeeze(1)
    xs, ys = torch.stack([x, 0.3 * x]), torch.stack([y, y])
    T = fit_temperature(xs, ys)
    assert T.shape == (2,)
    for b in range(2):
        best = F.cross_entropy(xs[b] / T[b], ys[b])
        for factor in (0.98, 1.02):
            assert F.cross_entropy(xs[b] / (T[b] * factor), ys[b]) >= best
    torch.testing.assert_close(T[1], 0.3 * T[0], rtol=1e-6, atol=0)  # scaling the logits scales T


def test_fit_temperature_rejects_bad_shapes():
    x, y = logits_and_labels()
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(x, y[:-1])
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(x, y, bounds=(1.0, 0.5))


def test_calibration_summary():
    x, y = logits_and_labels(n=300, c=4)
    s = calibration_summary(x, y, temperature=2.0)
    p = (x / 2).softmax(1)
    assert s["accuracy"] == pytest.approx((x.argmax(1) == y).double().mean().item())
    assert s["nll"] == pytest.approx(F.cross_entropy(x / 2, y).item())
    assert s["ece"] == pytest.approx(expected_calibration_error(p, y))
    assert s["confidence"] == pytest.approx(p.max(1).values.mean().item())
    assert s["logit_norm"] == pytest.approx((x / 2).norm(dim=1).mean().item())


# ---- Müller et al.'s picture -----------------------------------------------------------------------------

def test_template_plane_keeps_in_plane_distances_and_drops_the_rest():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    coords = template_plane(t, t)  # the templates themselves lie in the plane
    assert torch.allclose(torch.cdist(coords, coords), torch.cdist(t, t))
    normal = torch.linalg.qr(torch.cat([(t[1:] - t[0]).T, torch.randn(6, 4, generator=g, dtype=torch.float64)], 1))[0][:, 2]
    shifted = template_plane(t + 3 * normal, t)  # moving off the plane changes nothing
    torch.testing.assert_close(shifted, coords)
    with pytest.raises(ValueError, match="templates"):
        template_plane(t, t[:2])


def test_cluster_tightness():
    features = torch.tensor([[0.0, 1], [0, -1], [10, 1], [10, -1]])
    labels = torch.tensor([0, 0, 1, 1])
    assert cluster_tightness(features, labels) == pytest.approx(1 / 100)
    assert cluster_tightness(7 * features, labels) == pytest.approx(1 / 100)  # scale-free
    with pytest.raises(ValueError, match="two classes"):
        cluster_tightness(features, torch.zeros(4, dtype=torch.long))


# ---- side-by-side training -------------------------------------------------------------------------------

def test_train_full_batch_side_by_side_equals_alone():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(2, 30, 5, generator=g), torch.randint(0, 3, (2, 30), generator=g)
    both = MLP(5, 8, 3, problems=2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    alone = MLP(5, 8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            getattr(alone, name).copy_(getattr(both, name)[1])

    def ce(o, t):
        return F.cross_entropy(o.reshape(-1, 3), t.reshape(-1), reduction="none").view(t.shape)

    result = train_full_batch(both, X, y, ce, steps=20, lr=0.01)
    train_full_batch(alone, X[1], y[1], ce, steps=20, lr=0.01)
    assert result.steps_done == 20
    torch.testing.assert_close(both(X)[1], alone(X[1]))


def test_fit_side_by_side_pairs_configurations():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(2, 40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (2, 40), generator=g)

    def ce(eps):
        return lambda o, t: losses.cross_entropy(o.transpose(1, 2), t, label_smoothing=eps, reduction="none")

    net = fit_side_by_side([ce(0.0), ce(0.0), ce(0.3)], X, y, n_classes=3, hidden=6, steps=30, lr=0.01, seed=1)
    out = net(X.repeat(3, 1, 1)).view(3, 2, 40, 3)
    torch.testing.assert_close(out[0], out[1])  # same loss, same start: the same network
    assert not torch.allclose(out[0], out[2])
    assert mlp_features(net, X.repeat(3, 1, 1)).shape == (6, 40, 6)
    with pytest.raises(ValueError, match="y must have shape"):
        fit_side_by_side([ce(0.0)], X, y[:, :5], n_classes=3, hidden=4, steps=1, lr=0.01)


def test_collect_logits_is_fixed_and_complete():
    from minigpt.data import CharCorpus, CharTokenizer
    from minigpt.model import GPT, GPTConfig

    tok = CharTokenizer("abcd")
    ids = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(0))
    corpus = CharCorpus(tok, ids, ids)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=4, n_layer=1, n_head=1, n_embd=8))
    get_batch = corpus.batch_fn(3, 8)
    a, ya = collect_logits(model, get_batch, "val", iters=2)
    b, yb = collect_logits(model, get_batch, "val", iters=2)
    assert a.shape == (48, 4) and ya.shape == (48,)
    assert torch.equal(a, b) and torch.equal(ya, yb) and model.training


def test_setups():
    small, full = label_smoothing_setup("small"), label_smoothing_setup("full")
    assert small.n_seeds >= 5 and full.n_seeds >= small.n_seeds and full.n_gpt_seeds >= small.n_gpt_seeds >= 3
    assert small.epsilons == (0.0, 0.05, 0.1, 0.2)
    with pytest.raises(ValueError, match="scale"):
        label_smoothing_setup("medium")
    assert math.isfinite(small.mlp_lr)
