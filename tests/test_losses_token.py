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
        losses.cross_entropy(x.long(), y)
    # (B, T, V) logits are F.cross_entropy's (N, C, d1) layout, whose target is (N, d1): a flat (B*T,)
    # target is refused, naming the shape it expects
    with pytest.raises(ValueError, match=r"target must be an int64 tensor of class indices of shape \(4, 9\)"):
        losses.cross_entropy(x.view(4, 10, 9), y)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), C=st.integers(2, 30), scale=st.floats(0.1, 50.0), weighted=st.booleans())
def test_focal_with_gamma_zero_is_cross_entropy_property(seed, C, scale, weighted):
    x, y, w = data(C=C, scale=scale, seed=seed)
    alpha = w if weighted else None
    torch.testing.assert_close(losses.softmax_focal_loss(x, y, gamma=0.0, alpha=alpha),
                               F.cross_entropy(x, y, weight=alpha))


# --- issue 14 and issue 12: precision at large logits, every F.cross_entropy shape, soft targets ---------

def large_logits(seed=0, N=64, C=7):
    """Logits of magnitude 1e4, already rounded to float32 (the float64 reference sees the same input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (N, C), generator=g).double() * 1e4 + torch.randn(N, C, generator=g, dtype=torch.float64)
    x[0, :3] = torch.tensor([-1e4, 1e4, 1e4])  # the row
    return x.float(), torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("fn, kw", [
    (losses.cross_entropy, {}), (losses.cross_entropy, dict(label_smoothing=0.1)),
    (losses.cross_entropy, dict(weight="w")), (losses.softmax_focal_loss, dict(gamma=2.0)),
    (losses.softmax_focal_loss, dict(gamma=0.5)),
])
def test_float32_gradient_at_logits_of_1e4_matches_float64(fn, kw):
    """The backward recomputes the softmax from saved row statistics; with the absolute log-sum-exp
    (rounded at 1e4 in float32) the gradient was off by 3e-4 of its largest entry (F.cross_entropy: 7e-8)."""
    x32, y = large_logits()
    if kw.get("weight") == "w":
        kw = dict(weight=torch.linspace(0.5, 2.0, x32.shape[1]))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        kw_d = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        _, grads[dtype] = value_grad(fn, x32.to(dtype), y, reduction="sum", **kw_d)
    g32, g64 = grads[torch.float32].double(), grads[torch.float64]
    assert (g32 - g64).abs().max() <= 1e-4 * g64.abs().max() * 1e-2  # 1e-6 of the largest entry
    big = g64.abs() > 1e-3
    torch.testing.assert_close(g32[big], g64[big], rtol=1e-4, atol=0)
    value32 = fn(x32, y, reduction="none", **{k: v for k, v in kw.items()})
    value64 = fn(x32.double(), y, reduction="none", **{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                         for k, v in kw.items()})
    # the loss itself: lse - x_y formed as (m - x_y) + lse_rel, not rounded at 1e4 (half an ulp is 5e-4)
    torch.testing.assert_close(value32.double(), value64, rtol=1e-6, atol=1e-6)


SHAPES = [(), (6,), (6, 4), (3, 2, 5)]  # the positions: (C,) input, (N, C), (N, C, d1), (N, C, d1, d2)


def shaped(positions, C, seed, dtype=torch.float64, p_ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    shape = (C,) if positions == () else (positions[0], C, *positions[1:])
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    y = torch.randint(0, C, positions, generator=g)
    if positions:
        y[torch.rand(positions, generator=g) < p_ignore] = -100
    y.view(-1)[0] = 1  # at least one kept position, whichever ignore_index
    return x, y


@settings(max_examples=60, deadline=None)
@given(positions=st.sampled_from(SHAPES), C=st.integers(2, 9), seed=st.integers(0, 10_000),
       weighted=st.booleans(), eps=st.sampled_from([0.0, 0.1, 0.5]),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignore_index=st.sampled_from([-100, 0]))
def test_cross_entropy_matches_torch_for_every_shape(positions, C, seed, weighted, eps, reduction, ignore_index):
    x, y = shaped(positions, C, seed)
    if ignore_index == 0 and positions:
        y = torch.where(y == -100, torch.zeros_like(y), y)
    y.view(-1)[0] = 1
    w = torch.linspace(0.3, 2.0, C, dtype=torch.float64) if weighted else None
    kw = dict(weight=w, label_smoothing=eps, reduction=reduction, ignore_index=ignore_index)
    got, got_g = value_grad(losses.cross_entropy, x, y, **kw)
    want, want_g = value_grad(F.cross_entropy, x, y, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(got_g, want_g, **TOL[torch.float64])


def soft_targets(x, seed, dim):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(x.shape, generator=g, dtype=x.dtype) * 2, dim=dim)


@settings(max_examples=60, deadline=None)
@given(positions=st.sampled_from(SHAPES), C=st.integers(2, 9), seed=st.integers(0, 10_000),
       weighted=st.booleans(), eps=st.sampled_from([0.0, 0.1, 0.5]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_soft_targets_match_torch(positions, C, seed, weighted, eps, reduction):
    """Class-probability targets as F.cross_entropy takes them: value, gradient in the logits and in the
    target; with weights the mean divides by the number of positions."""
    x, _ = shaped(positions, C, seed)
    t = soft_targets(x, seed + 1, dim=0 if positions == () else 1)
    w = torch.linspace(0.3, 2.0, C, dtype=torch.float64) if weighted else None
    kw = dict(weight=w, label_smoothing=eps, reduction=reduction)
    outs = []
    for fn in (losses.cross_entropy, F.cross_entropy):
        xl, tl = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        out = fn(xl, tl, **kw)
        outs.append((out.detach(), *torch.autograd.grad(out.sum(), (xl, tl))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_soft_target_gradcheck_and_refusals():
    x, _ = shaped((5,), 4, seed=1)
    t = soft_targets(x, 2, dim=1)
    x.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: losses.cross_entropy(a, b, label_smoothing=0.2, reduction="none"), (x, t))
    with pytest.raises(ValueError, match="target of class probabilities must have the shape of input"):
        losses.cross_entropy(x, t[:, :3])
    with pytest.raises(ValueError, match="target of class probabilities must be >= 0"):
        losses.cross_entropy(x, t.detach() - 0.5)
    with pytest.raises(ValueError, match="must sum to 1"):
        losses.cross_entropy(x, x.detach().abs())  # logits passed where probabilities belong
    with pytest.raises(ValueError, match="class probabilities are not supported"):
        losses.softmax_focal_loss(x, t)


@pytest.mark.parametrize("positions", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_focal_every_shape_equals_the_flat_rows(positions, reduction):
    x, y = shaped(positions, 5, seed=3)
    alpha = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    got, got_g = value_grad(losses.softmax_focal_loss, x, y, gamma=2.0, alpha=alpha, reduction=reduction)
    if positions == ():
        rows, flat_y = x[None], y.reshape(1)
    else:
        rows, flat_y = x.movedim(1, -1).reshape(-1, 5), y.reshape(-1)
    want = losses.softmax_focal_loss(rows, flat_y, gamma=2.0, alpha=alpha, reduction=reduction)
    torch.testing.assert_close(got, want.view(got.shape))
    # gamma = 0: F.cross_entropy for every shape, value and gradient
    ce, ce_g = value_grad(losses.softmax_focal_loss, x, y, gamma=0.0, alpha=alpha, reduction=reduction)
    ref, ref_g = value_grad(F.cross_entropy, x, y, weight=alpha, reduction=reduction)
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(ce_g, ref_g)


@pytest.mark.parametrize("fn", [losses.cross_entropy, losses.softmax_focal_loss])
def test_ignored_rows_with_minus_inf_logits_stay_finite(fn):
    """A padding row may hold -inf logits (a masked vocabulary); ignored, it must not turn the loss or the
    gradient into NaN (0 * inf)."""
    x = torch.tensor([[-torch.inf, 0.0, 1.0], [-torch.inf] * 3, [2.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([-100, -100, 0])
    for reduction in ("mean", "sum", "none"):
        value, grad = value_grad(fn, x, y, reduction=reduction)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        assert (grad[:2] == 0).all()
        want, want_g = value_grad(fn, x[2:], y[2:], reduction=reduction)
        torch.testing.assert_close(value.reshape(-1)[-1:] if reduction == "none" else value,
                                   want.reshape(-1) if reduction == "none" else want)
        torch.testing.assert_close(grad[2:], want_g)


@pytest.mark.parametrize("fn", [losses.cross_entropy, losses.softmax_focal_loss])
def test_all_ignored_targets_sum_to_zero_and_mean_raises(fn):
    """As F.cross_entropy: 'sum' of nothing is 0 and 'none' is zeros (connected to the logits, for
    gradient accumulation); the mean of nothing is undefined (torch returns NaN; here an error)."""
    x, y, _ = data()
    y = torch.full_like(y, -100)
    for reduction in ("sum", "none"):
        value, grad = value_grad(fn, x, y, reduction=reduction)
        assert (value == 0).all() and (grad == 0).all()
    with pytest.raises(ValueError, match="target is all ignore_index"):
        fn(x, y)


def test_focal_alpha_errors_name_alpha():
    x, y, w = data()
    with pytest.raises(ValueError, match="alpha must be a tensor of shape"):
        losses.softmax_focal_loss(x, y, alpha=w[:3])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        losses.softmax_focal_loss(x, y, alpha=-w)
    with pytest.raises(ValueError, match="zero total alpha"):
        losses.softmax_focal_loss(x, y, alpha=torch.zeros_like(w))
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        losses.cross_entropy(x, y, weight=torch.ones(9, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [losses.cross_entropy, losses.softmax_focal_loss])
def test_half_precision_keeps_its_dtype_and_is_accurate(dtype, fn):
    x, y, _ = data(torch.float32, scale=4.0)
    x = x.to(dtype)
    value, grad = value_grad(fn, x, y)
    assert value.dtype == dtype and grad.dtype == dtype
    want, want_g = value_grad(fn, x.float(), y)  # the same rounded logits, in float32
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.float16 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(value.float(), want, **tol)
    torch.testing.assert_close(grad.float(), want_g, **tol)
