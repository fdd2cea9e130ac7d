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


# --- issue 14: NaN gradients at log p = -inf, dropped precision, errors that name the wrong argument -------

def test_kl_div_gradient_is_zero_not_nan_where_the_target_is_zero():
    """log p = -inf contributes 0, and so does its derivative: with respect to the log-target (the old
    single where gave 0 * -inf = NaN there) and to the input."""
    g = torch.Generator().manual_seed(8)
    logq = F.log_softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), 1)
    p = F.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64) * 2, 1)
    p[0] = 0.0
    p[0, 3] = 1.0
    p[1, :2] = 0.0
    p = p / p.sum(1, keepdim=True)
    logp = p.log().requires_grad_(True)
    q = logq.clone().requires_grad_(True)
    losses.kl_div(q, logp, log_target=True).backward()
    assert torch.isfinite(logp.grad).all() and torch.isfinite(q.grad).all()
    assert (logp.grad[p == 0] == 0).all()
    # elsewhere the derivative is p (log p - log q + 1) / N
    present = p > 0
    torch.testing.assert_close(logp.grad[present], (p * (p.log() - logq + 1) / 5)[present])
    # and the input's gradient is the probability-space one, -p / N
    torch.testing.assert_close(q.grad, -p / 5)
    # gradcheck where the target is finite, with the -inf entries held fixed
    mask = p > 0
    def f(finite_logp, q_):
        full = torch.full_like(p, -math.inf).masked_scatter(mask, finite_logp)
        return losses.kl_div(q_, full, log_target=True, reduction="none")
    assert torch.autograd.gradcheck(f, (p.log()[mask].clone().requires_grad_(True), logq.clone().requires_grad_(True)))


def test_kl_div_zero_target_where_the_model_says_minus_inf():
    """p = 0 where log q = -inf (a masked class both agree on): 0, where F.kl_div gives NaN (0 * -inf)."""
    logq = torch.tensor([[0.0, -math.inf], [math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert torch.isnan(F.kl_div(logq, p, reduction="sum"))
    for log_target in (False, True):
        value, grad = grad_of(losses.kl_div, logq, p.log() if log_target else p, log_target=log_target)
        assert value.item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_keeps_float64(symmetric):
    """The loss used to be computed in float32 whatever the input: float64 gradcheck failed."""
    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: losses.info_nce_loss(a, b, temperature=0.3, symmetric=symmetric),
                                    (z1, z2))
    value = losses.info_nce_loss(z1, z2, temperature=0.1, symmetric=symmetric)
    assert value.dtype == torch.float64
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    sim = a @ b.T / 0.1
    want = F.cross_entropy(sim, torch.arange(6))
    if symmetric:
        want = (want + F.cross_entropy(sim.T, torch.arange(6))) / 2
    torch.testing.assert_close(value, want, rtol=1e-13, atol=0)  # float64 to its last digits, not float32's


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contrastive_losses_upcast_half_precision_only(dtype):
    g = torch.Generator().manual_seed(10)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    half = losses.info_nce_loss(z1.to(dtype), z2.to(dtype), temperature=0.07)
    assert half.dtype == dtype
    want = losses.info_nce_loss(z1.to(dtype).float(), z2.to(dtype).float(), temperature=0.07)
    torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=1e-2)
    feats = torch.randn(8, 4, generator=g)
    nb = losses.neighbour_info_nce_loss(feats.to(dtype), temperature=0.07)
    assert nb.dtype == dtype and torch.isfinite(nb)
    torch.testing.assert_close(nb.float(), losses.neighbour_info_nce_loss(feats.to(dtype).float(), temperature=0.07),
                               rtol=1e-2, atol=1e-2)
    x = torch.randn(8, 4, dtype=torch.float64)
    assert losses.neighbour_info_nce_loss(x).dtype == torch.float64


def test_bce_pos_weight_of_the_wrong_size_is_a_value_error():
    x, t = logits_and_targets(torch.float64)  # (40, 3)
    with pytest.raises(ValueError, match=r"pos_weight must be a scalar or broadcast to input's shape \(40, 3\)"):
        losses.bce_with_logits(x, t, pos_weight=torch.ones(4))  # torch: a broadcasting RuntimeError
    with pytest.raises(ValueError, match="pos_weight must be a scalar or broadcast"):
        losses.bce_with_logits(x[:, 0], t[:, 0], pos_weight=torch.ones(40, 1))  # torch: silently (40, 40)
    # what does broadcast is taken, as torch takes it
    for pw in (2.0, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.rand(40, 1, dtype=torch.float64) + 0.5):
        torch.testing.assert_close(losses.bce_with_logits(x, t, pos_weight=pw),
                                   F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.as_tensor(pw, dtype=x.dtype)))


def test_errors_name_the_arguments_by_their_real_names():
    s, t = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape of student_logits \(2, 3\)"):
        losses.distillation_loss(s, t)
    with pytest.raises(ValueError, match="student_logits must be a floating-point"):
        losses.distillation_loss(s.long(), s)
    with pytest.raises(ValueError, match="z2 must have the shape of z1"):
        losses.info_nce_loss(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="z1 must be a floating-point"):
        losses.info_nce_loss(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="logvar must have the shape of mu"):
        losses.gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2), reduction="avg")
    with pytest.raises(ValueError, match="input must be a floating-point"):
        losses.multi_margin_loss(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight must be a floating-point"):
        losses.multi_margin_loss(torch.zeros(2, 3), torch.tensor([0, 1]), weight=torch.ones(3, dtype=torch.long))
    # an integer input is named, not blamed on the quantiles (it rounded 0.1 to 0 before they were checked)
    with pytest.raises(ValueError, match="input must be a floating-point"):
        losses.multi_quantile_loss(torch.zeros(5, 2, dtype=torch.long), torch.zeros(5), [0.1, 0.9])


def test_multi_margin_weight_does_not_change_the_dtype():
    x = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    w = torch.rand(4, dtype=torch.float64)
    got = losses.multi_margin_loss(x, y, weight=w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.multi_margin_loss(x, y, weight=w.float()))


# --- issue 12: distillation with per-position temperatures and reductions --------------------------------

def test_distillation_equals_chapter_3_per_problem_temperatures():
    """Chapter 3's hand-written form: C*S problems, each with its own temperature, (C*S, 1, 1)."""
    g = torch.Generator().manual_seed(11)
    P, N = 6, 20
    temps = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.5, 3.0]).view(P, 1, 1)
    teacher = torch.randn(N, 10, generator=g) * 3
    o = torch.randn(P, N, 10, generator=g, requires_grad=True)
    t_rep = teacher.expand(P, N, 10)
    want = F.kl_div(F.log_softmax(o / temps, -1), F.log_softmax(t_rep / temps, -1), reduction="none",
                    log_target=True).sum(-1)  # (P, N)
    got = losses.distillation_loss(o, t_rep, temperature=temps, scale_by_t2=False, reduction="none")
    assert got.shape == (P, N)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (g_got,) = torch.autograd.grad(got.sum(), o)
    (g_want,) = torch.autograd.grad(want.sum(), o)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    # (P, 1) against the leading dims is the same thing
    torch.testing.assert_close(losses.distillation_loss(o, t_rep, temperature=temps.view(P, 1), scale_by_t2=False,
                                                        reduction="none"), got)
    # T^2 per problem, then the reductions
    scaled = losses.distillation_loss(o, t_rep, temperature=temps, reduction="none")
    torch.testing.assert_close(scaled, want * temps.view(P, 1) ** 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses.distillation_loss(o, t_rep, temperature=temps), scaled.mean())
    torch.testing.assert_close(losses.distillation_loss(o, t_rep, temperature=temps, reduction="sum"), scaled.sum())


@pytest.mark.parametrize("T", [0.5, 2.0, 3.3])
def test_distillation_number_and_tensor_temperatures_agree(T):
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    as_number = losses.distillation_loss(s, t, temperature=T, reduction="none")
    want = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="none", log_target=True).sum(1) * T ** 2
    torch.testing.assert_close(as_number, want, rtol=1e-12, atol=1e-14)  # T not rounded through float32
    for shape in ((), (1,), (7,), (7, 1)):
        temp = torch.full(shape, T, dtype=torch.float64)
        torch.testing.assert_close(losses.distillation_loss(s, t, temperature=temp, reduction="none"), as_number)
    # one temperature per example
    per_example = torch.linspace(0.5, 4.0, 7, dtype=torch.float64)
    got = losses.distillation_loss(s, t, temperature=per_example, reduction="none")
    for i in range(7):
        Ti = per_example[i].item()
        torch.testing.assert_close(got[i], losses.distillation_loss(s[i:i + 1], t[i:i + 1], temperature=Ti))
    assert losses.distillation_loss(s.float(), t.float(), temperature=per_example).dtype == torch.float32


def test_distillation_refuses_bad_temperatures_and_reductions():
    s = torch.zeros(4, 3, 5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.distillation_loss(s, s, temperature=torch.tensor([1.0, 0.0, 1.0, 1.0]).view(4, 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.distillation_loss(s, s, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be a number or a tensor broadcastable"):
        losses.distillation_loss(s, s, temperature=torch.ones(5))  # one per class is not a temperature
    with pytest.raises(ValueError, match="size 1 in the last"):
        losses.distillation_loss(s, s, temperature=torch.ones(4, 1, 5))
    with pytest.raises(ValueError, match="temperature must be a number or a tensor broadcastable"):
        losses.distillation_loss(s, s, temperature=torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="temperature must be a number or a tensor broadcastable"):
        losses.distillation_loss(s, s, temperature=torch.ones(1, 4, 3, 1))
    with pytest.raises(ValueError, match="'mean' averages over classes"):
        losses.distillation_loss(s, s, reduction="mean")


def test_bce_at_infinite_logits_is_not_nan():
    """Confidently right at a logit of +-inf costs 0 (torch gives NaN: 0 * inf); confidently wrong, inf."""
    x = torch.tensor([-math.inf, math.inf, -math.inf, math.inf])
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.isnan(F.binary_cross_entropy_with_logits(x[:2], t[:2], reduction="none")).all()
    value, grad = grad_of(losses.bce_with_logits, x, t, reduction="none")
    assert value.tolist() == [0.0, 0.0, math.inf, math.inf]
    assert grad.tolist() == [0.0, 0.0, -1.0, 1.0]


def test_knobs_refuse_nan_and_out_of_range_inputs():
    x, t = logits_and_targets(torch.float64)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        losses.sigmoid_focal_loss(x, t, alpha=float("nan"))  # used to disable the weight silently
    with pytest.raises(ValueError, match="input must hold probabilities in \\[0, 1\\] with from_logits=False"):
        losses.dice_loss(torch.full((1, 1, 3), 3.0), torch.ones(1, 1, 3), from_logits=False)  # used to give -0.46


def _class_logits(n=64, c=10, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=dtype) * scale), torch.randint(0, c, (n,), generator=g)


# ---- confidence penalty and adaptive smoothing ------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_confidence_penalty_is_ce_minus_beta_entropy(reduction):
    x, y = _class_logits()
    y[3] = losses.IGNORE_INDEX
    kept = y != losses.IGNORE_INDEX
    p = x.softmax(1)
    per = F.cross_entropy(x, y, reduction="none") + 0.3 * (p * p.log()).sum(1)
    per = torch.where(kept, per, torch.zeros_like(per))
    want = {"mean": per.sum() / kept.sum(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(losses.confidence_penalty_loss(x, y, beta=0.3, reduction=reduction), want)
    torch.testing.assert_close(losses.confidence_penalty_loss(x, y, beta=0.0), F.cross_entropy(x, y))


def test_confidence_penalty_gradient_matches_autograd_of_reference():
    x, y = _class_logits(n=16, c=5)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    losses.confidence_penalty_loss(a, y, beta=0.5).backward()
    pb = b.softmax(1)
    (F.cross_entropy(b, y) + 0.5 * (pb * b.log_softmax(1)).sum(1).mean()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_confidence_penalty_is_finite_at_saturated_logits():
    x = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    loss = losses.confidence_penalty_loss(x, torch.tensor([0]), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_adaptive_smoothing_matches_the_notes_formula():
    x, y = _class_logits(c=7)
    C = 7
    p = x.softmax(1)
    eps = torch.clamp(0.2 * (1 - p.gather(1, y[:, None])), min=0.01)  # (N, 1)
    target = torch.full_like(x, 0.0) + eps / (C - 1)
    target.scatter_(1, y[:, None], 1 - eps)
    want = -(target * x.log_softmax(1)).sum(1)
    got = losses.adaptive_label_smoothing_loss(x, y, base_smoothing=0.2, reduction="none")
    torch.testing.assert_close(got, want)


def test_adaptive_smoothing_at_a_fixed_epsilon_is_the_others_convention():
    """With min_smoothing = base the epsilon is constant: the notes' fixed smoothing."""
    x, y = _class_logits()
    got = losses.adaptive_label_smoothing_loss(x, y, base_smoothing=0.1, min_smoothing=0.1)
    torch.testing.assert_close(got, losses.cross_entropy(x, y, label_smoothing=0.1, smoothing_convention="others"))


def test_adaptive_smoothing_confidence_is_detached():
    x, y = _class_logits(n=8, c=4)
    a = x.clone().requires_grad_(True)
    losses.adaptive_label_smoothing_loss(a, y, base_smoothing=0.3, min_smoothing=0.0, reduction="sum").backward()
    eps = (0.3 * (1 - x.softmax(1).gather(1, y[:, None]))).clamp(min=0.0)
    target = (eps / 3).expand(8, 4).clone()
    target.scatter_(1, y[:, None], 1 - eps)
    torch.testing.assert_close(a.grad, x.softmax(1) - target)  # the gradient of CE against a fixed soft target


@pytest.mark.parametrize("fn, kw", [(losses.confidence_penalty_loss, dict(beta=0.1)),
                                    (losses.adaptive_label_smoothing_loss, {})])
def test_new_losses_reject_bad_input(fn, kw):
    x, y = _class_logits(n=4, c=3)
    with pytest.raises(ValueError, match="input must be an"):
        fn(x[0], y, **kw)
    with pytest.raises(ValueError, match="target must be an int64"):
        fn(x, y.float(), **kw)
    with pytest.raises(ValueError, match="outside"):
        fn(x, torch.tensor([0, 1, 2, 3]), **kw)
    with pytest.raises(ValueError, match="reduction"):
        fn(x, y, reduction="batchmean", **kw)
    with pytest.raises(ValueError, match="mean is undefined"):
        fn(x, torch.full((4,), losses.IGNORE_INDEX), **kw)
    with pytest.raises(ValueError, match="beta" if "beta" in kw else "base_smoothing"):
        fn(x, y, **({"beta": -1.0} if "beta" in kw else {"base_smoothing": 2.0}))
