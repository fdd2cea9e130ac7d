"""Classification losses against trusted references (torch, scikit-learn, the torchvision focal formula
of ../shared/REFERENCES.md), in value and gradient, and at the extremes."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import hinge_loss as sk_hinge

from minigpt import losses

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-6)}
DTYPES = [torch.float64, torch.float32]


def grad_of(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def logits_and_targets(dtype, scale=3.0, shape=(40, 3), soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.rand(shape, generator=g, dtype=torch.float64) if soft else (torch.rand(shape, generator=g) < 0.3).double()
    return x, t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("pos_weight", [None, 3.0, "per_class"])
@pytest.mark.parametrize("soft", [False, True])
def test_bce_matches_torch(dtype, scale, pos_weight, soft):
    x, t = logits_and_targets(dtype, scale, soft=soft)
    pw = torch.tensor([1.0, 2.0, 9.0], dtype=dtype) if pos_weight == "per_class" else pos_weight
    ref_pw = torch.as_tensor(pw, dtype=dtype) if pw is not None else None
    got, got_g = grad_of(losses.bce_with_logits, x, t, pos_weight=pw, reduction="none")
    want, want_g = grad_of(F.binary_cross_entropy_with_logits, x, t, pos_weight=ref_pw, reduction="none")
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_g, want_g, **TOL[dtype])
    assert torch.isfinite(got).all() and torch.isfinite(got_g).all()


def test_sigmoid_then_bce_fails_where_logits_do_not():
    x, t = torch.tensor([30.0, -30.0]), torch.tensor([0.0, 1.0])  # confidently wrong, both ways
    naive, naive_grad = grad_of(lambda a: F.binary_cross_entropy(torch.sigmoid(a), t, reduction="none"), x)
    # float32 sigmoid(30) rounds to exactly 1, so log(1 - p) = log 0, which torch clamps to -100: the loss
    # reads 100 instead of 30, and no gradient flows. sigmoid(-30) = 9.4e-14 is still representable.
    assert naive.tolist() == [100.0, pytest.approx(30.0)]
    assert naive_grad[0] == 0.0
    ours, ours_grad = grad_of(losses.bce_with_logits, x, t, reduction="none")
    torch.testing.assert_close(ours, torch.tensor([30.0, 30.0]))
    torch.testing.assert_close(ours_grad, torch.tensor([1.0, -1.0]))


def test_hinge_family():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, generator=g, dtype=torch.float64) * 2
    y = torch.where(torch.rand(200, generator=g) < 0.5, -1.0, 1.0).double()
    assert losses.hinge_loss(f, y).item() == pytest.approx(sk_hinge(y.numpy(), f.numpy()), rel=1e-12)
    m = (1 - y * f).clamp(min=0)
    torch.testing.assert_close(losses.squared_hinge_loss(f, y), (m ** 2).mean())
    torch.testing.assert_close(losses.exponential_loss(f, y), torch.exp(-y * f).mean())
    # zero gradient once past the margin: the hinge's dead zone
    _, g_hinge = grad_of(losses.hinge_loss, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]), reduction="none")
    assert g_hinge.tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="labels -1 and \\+1"):
        losses.hinge_loss(f, (y > 0).double())


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_margin_matches_torch(p, weighted, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 7, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 7, (30,), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64).to(dtype) if weighted else None
    for reduction in ("mean", "sum", "none"):
        got, got_g = grad_of(losses.multi_margin_loss, x, y, p=p, margin=0.7, weight=w, reduction=reduction)
        want, want_g = grad_of(F.multi_margin_loss, x, y, p=p, margin=0.7, weight=w, reduction=reduction)
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got_g, want_g, **TOL[dtype])


def torchvision_focal(x, t, alpha, gamma):
    """The reference semantics (torchvision.ops.sigmoid_focal_loss, reduction='none')."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 0.5), (0.25, 0.0), (0.9, 5.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_matches_torchvision_formula(dtype, alpha, gamma, soft):
    x, t = logits_and_targets(dtype, scale=2.0, soft=soft, seed=3)
    got, got_g = grad_of(losses.sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma, reduction="none")
    want, want_g = grad_of(torchvision_focal, x, t, alpha, gamma)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_g, want_g, **TOL[dtype])


def test_sigmoid_focal_extremes_and_identities():
    x = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4])
    for t_value in (0.0, 1.0):
        t = torch.full_like(x, t_value)
        for gamma in (0.5, 2.0):  # gamma < 1: the reference's gradient is NaN at saturation, ours is not
            value, grad = grad_of(losses.sigmoid_focal_loss, x, t, gamma=gamma, reduction="none")
            assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    _, ref_grad = grad_of(torchvision_focal, torch.tensor([50.0]), torch.tensor([1.0]), 0.25, 0.5)
    assert torch.isnan(ref_grad).all()  # what the log-space form avoids
    # gamma 0 with alpha disabled is plain BCE
    x, t = logits_and_targets(torch.float64, seed=4)
    torch.testing.assert_close(losses.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0),
                               losses.bce_with_logits(x, t))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        losses.sigmoid_focal_loss(x, t, gamma=-1.0)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_distillation_matches_kl_div(T):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randn(16, 10, generator=g, dtype=torch.float64)
    want = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T ** 2
    torch.testing.assert_close(losses.distillation_loss(s, t, temperature=T), want)
    torch.testing.assert_close(losses.distillation_loss(s, t, temperature=T, scale_by_t2=False), want / T ** 2)
    # on (B, T, V): the mean KL per token, not per sequence
    s3, t3 = s.view(4, 4, 10), t.view(4, 4, 10)
    torch.testing.assert_close(losses.distillation_loss(s3, t3, temperature=T), want)
    assert losses.distillation_loss(s, s, temperature=T).abs().item() < 1e-12  # KL(p || p) = 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(dtype, reduction, log_target):
    g = torch.Generator().manual_seed(3)
    logq = F.log_softmax(torch.randn(12, 7, generator=g, dtype=torch.float64) * 3, 1).to(dtype)
    p = F.softmax(torch.randn(12, 7, generator=g, dtype=torch.float64) * 3, 1)
    p[0, :] = 0.0
    p[0, 2] = 1.0  # a one-hot row: its zero entries must count 0, not NaN
    target = (p.log() if log_target else p).to(dtype)
    got, g_got = grad_of(losses.kl_div, logq, target, reduction=reduction, log_target=log_target)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    want, g_want = grad_of(F.kl_div, logq, target, reduction=reduction, log_target=log_target)
    if log_target:
        # F.kl_div gives NaN where log p = -inf (0 * inf); compare on the other rows, and the one-hot row
        # with the same divergence given as probabilities
        assert torch.isnan(F.kl_div(logq, target, reduction="none", log_target=True)[0]).any()
        rows = slice(1, None)
        nolog, g_nolog = grad_of(losses.kl_div, logq, p.to(dtype), reduction=reduction)
        torch.testing.assert_close(got, nolog, **TOL[dtype])
        torch.testing.assert_close(g_got, g_nolog, **TOL[dtype])
        want, g_want = grad_of(F.kl_div, logq[rows], target[rows], reduction="none", log_target=True)
        got, g_got = grad_of(losses.kl_div, logq[rows], target[rows], reduction="none", log_target=True)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(g_got, g_want, **TOL[dtype])


def test_kl_div_refuses_its_traps():
    logq = F.log_softmax(torch.randn(4, 3), 1)
    p = F.softmax(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="'mean' averages over classes"):
        losses.kl_div(logq, p, reduction="mean")
    with pytest.raises(ValueError, match="input must hold log-probabilities"):
        losses.kl_div(p, logq.exp())  # the argument order swapped: probabilities where log q belongs
    with pytest.raises(ValueError, match="target must hold probabilities"):
        losses.kl_div(logq, logq)  # log-probabilities without log_target=True
    with pytest.raises(ValueError, match="shape"):
        losses.kl_div(logq, p[:, :2])
    assert float(losses.kl_div(logq, logq.exp())) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("spatial", [(8,), (6, 5), (3, 4, 5)])
def test_dice_any_spatial_dims(spatial):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, *spatial, generator=g, dtype=torch.float64)
    t = (torch.rand(2, 3, *spatial, generator=g) < 0.4).double()
    flat = losses.dice_loss(x.reshape(2, 3, -1), t.reshape(2, 3, -1), reduction="none")
    torch.testing.assert_close(losses.dice_loss(x, t, reduction="none"), flat)
    p = torch.sigmoid(x).reshape(2, 3, -1)
    tf = t.reshape(2, 3, -1)
    by_hand = 1 - (2 * (p * tf).sum(-1) + 1) / (p.sum(-1) + tf.sum(-1) + 1)
    torch.testing.assert_close(flat, by_hand)
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: losses.dice_loss(a, t), (x,))


def test_dice_empty_masks():
    empty = torch.zeros(1, 1, 4, 4)
    predicted_empty = torch.full((1, 1, 4, 4), -20.0)
    value, grad = grad_of(losses.dice_loss, predicted_empty, empty)
    assert value.item() < 1e-6 and torch.isfinite(grad).all()  # right about nothing: no loss, no NaN
    with pytest.raises(ValueError, match="smooth must be > 0"):
        losses.dice_loss(predicted_empty, empty, smooth=0.0)


def test_info_nce():
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(8, 16, generator=g)
    z2 = z1 + 0.1 * torch.randn(8, 16, generator=g)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    sim = a @ b.T / 0.1
    by_hand = -(torch.log(torch.exp(sim).diag() / torch.exp(sim).sum(1))).mean()
    torch.testing.assert_close(losses.info_nce_loss(z1, z2, temperature=0.1, symmetric=False), by_hand)
    # matched views beat shuffled ones
    assert losses.info_nce_loss(z1, z2) < losses.info_nce_loss(z1, z2[torch.randperm(8, generator=g)])
    # float16 at T = 0.07: exp(1/0.07) is about 1.6e6, past float16's 65504, yet the loss is finite
    z16 = z1.half()
    assert torch.isinf(torch.exp((F.normalize(z16.float(), dim=1) @ F.normalize(z16.float(), dim=1).T / 0.07).half())).any()
    assert torch.isfinite(losses.info_nce_loss(z16, z16, temperature=0.07)).all()
    with pytest.raises(ValueError, match="N >= 2"):
        losses.info_nce_loss(z1[:1], z2[:1])


def test_bad_inputs_name_the_argument():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="target must hold probabilities"):
        losses.bce_with_logits(x, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="pos_weight must be > 0"):
        losses.bce_with_logits(x, torch.zeros(4), pos_weight=0.0)
    with pytest.raises(ValueError, match="target must have the shape of input"):
        losses.sigmoid_focal_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="target holds labels outside"):
        losses.multi_margin_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match="spatial"):
        losses.dice_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    assert math.isfinite(losses.exponential_loss(torch.tensor([5.0]), torch.tensor([1.0])).item())


def test_neighbour_info_nce_marks_rows_around_each_row():
    """The notes' loss: with features that make rows i-1 and i+1 identical to row i and every other row
    orthogonal, it is as small as it gets; the positives are neighbours, whatever they hold."""
    n = 6
    base = torch.eye(3, dtype=torch.float64)
    # rows 0..5 = e0, e0, e1, e1, e2, e2: row 1's neighbours are rows 0 (same) and 2 (different)
    feats = base.repeat_interleave(2, dim=0)
    loss = losses.neighbour_info_nce_loss(feats, temperature=0.1)
    # by hand: row i's log-probability of its two neighbours, with self excluded from the denominator
    z = F.normalize(feats, dim=1)
    sim = z @ z.T / 0.1
    sim.fill_diagonal_(-math.inf)
    logp = sim - torch.logsumexp(sim, 1, keepdim=True)
    idx = torch.arange(n)
    want = -torch.logsumexp(torch.stack([logp[idx, (idx - 1) % n], logp[idx, (idx + 1) % n]], 1), 1).mean()
    torch.testing.assert_close(loss, want)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: losses.neighbour_info_nce_loss(f, temperature=0.5), (x,))
    with pytest.raises(ValueError, match="features"):
        losses.neighbour_info_nce_loss(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        losses.neighbour_info_nce_loss(torch.zeros(4, 4), temperature=0.0)


def test_neighbour_positive_mask_wraps_around():
    m = losses.neighbour_positive_mask(4)
    assert m.tolist() == [[False, True, False, True], [True, False, True, False],
                          [False, True, False, True], [True, False, True, False]]
