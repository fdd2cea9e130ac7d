import math

import pytest
import torch

from minigpt import multitask as mt


def test_fixed_weights():
    assert mt.FixedWeights([1.0, 0.2])([torch.tensor(2.0), torch.tensor(5.0)]).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="losses must hold 2"):
        mt.FixedWeights([1.0, 0.2])([torch.tensor(1.0)])


@pytest.mark.parametrize("form, task, optimum", [
    ("common", "regression", lambda L: math.log(L)),
    ("exact", "regression", lambda L: math.log(L)),
    ("exact", "classification", lambda L: math.log(2 * L)),
])
def test_uncertainty_optimum(form, task, optimum):
    L = 0.3
    uw = mt.UncertaintyWeighting([task], form=form)
    with torch.no_grad():
        uw.log_vars.fill_(optimum(L))
    total = uw([torch.tensor(L)])
    (grad,) = torch.autograd.grad(total, uw.log_vars)
    assert abs(grad.item()) < 1e-6  # d total / d s = 0 at the stated optimum


def test_common_form_is_twice_the_regression_form_and_goes_negative():
    L = torch.tensor(0.2)  # below 1/e
    common, exact = mt.UncertaintyWeighting(["regression"], "common"), mt.UncertaintyWeighting(["regression"], "exact")
    with torch.no_grad():
        for m in (common, exact):
            m.log_vars.fill_(math.log(0.2))
    assert common([L]).item() == pytest.approx(2 * exact([L]).item())
    assert common([L]).item() == pytest.approx(1 + math.log(0.2)) and common([L]).item() < 0
    assert common.weights().item() == pytest.approx(1 / 0.2)  # weight 1/L


def test_dwa():
    dwa = mt.DynamicWeightAverage(2, temperature=2.0)
    assert dwa.weights().tolist() == [1.0, 1.0]
    dwa.update([1.0, 1.0])
    dwa.update([0.5, 0.9])  # task 0 improved faster: it gets the smaller weight
    r = torch.tensor([0.5, 0.9])
    torch.testing.assert_close(dwa.weights(), (2 * torch.softmax(r / 2, 0)).float())
    assert dwa.weights()[0] < dwa.weights()[1]


def test_pcgrad_removes_conflict():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos < 0: conflicting
    assert mt.gradient_cosine(g1, g2) < 0
    out = mt.pcgrad([g1, g2], generator=torch.Generator().manual_seed(0))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # [0.5, 0.5]
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # [0, 1]
    torch.testing.assert_close(out, p1 + p2)
    assert p1 @ g2 >= -1e-7 and p2 @ g1 >= -1e-7
    a, b = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 1.0])  # agreeing gradients are left alone
    torch.testing.assert_close(mt.pcgrad([a, b]), a + b)


def test_gradnorm_equalises_gradient_norms():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4, bias=False)
    heads = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    x = torch.randn(64, 4)
    y1, y2 = torch.randn(64, 1), 10 * torch.randn(64, 1)  # task 2's loss and gradient are far larger
    gn = mt.GradNorm(2, alpha=0.0, lr=0.05)

    def norms():
        h = shared(x)
        losses = [((heads[0](h) - y1) ** 2).mean(), ((heads[1](h) - y2) ** 2).mean()]
        return [torch.autograd.grad(gn.w[i].detach() * losses[i], shared.weight, retain_graph=True)[0].norm().item()
                for i in range(2)], losses

    (n1, n2), _ = norms()
    start = n2 / n1
    for _ in range(150):
        _, losses = norms()
        gn(losses, shared.weight)
    (n1, n2), _ = norms()
    assert abs(math.log(n2 / n1)) < 0.2 * abs(math.log(start))  # the norms have moved together
    assert gn.weights().sum().item() == pytest.approx(2.0) and (gn.weights() > 0).all()


def test_seed_schemes_by_hand():
    d = mt.DifficultyAdaptiveWeights(temperature=1.0)
    d([torch.tensor(1.0), torch.tensor(3.0)])
    torch.testing.assert_close(d.weights(), torch.softmax(torch.tensor([1.0, 3.0]), 0))
    # units matter: the same tasks with task 2's loss in other units get other weights
    d([torch.tensor(1.0), torch.tensor(0.03)])
    assert d.weights()[1] < d.weights()[0]

    perf = mt.PerformanceBasedWeights(2, window=10)
    for t in range(10):
        perf.update([1.0 - 0.05 * t, 1.0])  # task 0 learning, task 1 stuck
    assert perf.weights()[1] / perf.weights()[0] > 1e4
    assert perf.weights().sum().item() == pytest.approx(2.0)

    inv = mt.InverseStdWeights(2, window=10)
    assert inv.weights().tolist() == [0.5, 0.5]
    values = [[float(t % 2), 1.0] for t in range(10)]  # task 0 alternates 0/1: std 0.5
    for v in values:
        inv.update(v)
    want = torch.tensor([1 / 1.5, 1.0])
    torch.testing.assert_close(inv.weights(), want / want.sum())

    torch.testing.assert_close(mt.gradient_balance_weights([1.0, 3.0]), torch.tensor([1.5, 0.5]))


def test_random_loss_weighting():
    rlw = mt.RandomLossWeighting(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no weights drawn"):
        rlw.weights()
    L = torch.tensor([1.0, 2.0, 4.0])
    total = rlw(L)
    w = rlw.weights()
    z = torch.randn(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.softmax(z, 0))  # softmax of a standard normal draw
    assert total.item() == pytest.approx((w * L).sum().item()) and w.sum().item() == pytest.approx(1.0)
    rlw(L)
    assert not torch.equal(rlw.weights(), w)  # redrawn every call
    draws = torch.stack([(rlw(L), rlw.weights())[1] for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3), atol=0.01, rtol=0)  # equal on average
    with pytest.raises(ValueError, match="losses must hold 3"):
        rlw([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="n_tasks"):
        mt.RandomLossWeighting(0)
