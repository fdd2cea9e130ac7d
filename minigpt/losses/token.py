"""Token-level classification losses over large vocabularies, fast and lean.

``F.cross_entropy`` keeps the whole (N, V) log-softmax for its backward pass, and a focal loss written
with tensor operations keeps several (N, V) tensors more; at N = 8192 tokens and V = 50257 each of them
is 1.6 GB. These losses are ``autograd.Function``s that keep only two numbers per row, the row maximum
``m`` and the log-sum-exp relative to it, ``log sum_c exp(x_c - m)``, and compute the gradient
``a * softmax - b * onehot - c * w`` in the one (N, V) buffer that the gradient needs anyway, in row
chunks so that no other full-size temporary exists.

The log-sum-exp is kept relative to the maximum because the softmax is recomputed from it: with the
absolute ``lse`` (about 1e4 at logits of 1e4), ``exp(x - lse)`` inherits lse's rounding error (half a
float32 ulp at 1e4 is 5e-4), where ``exp((x - m) - lse_rel)`` subtracts numbers of the size of log C.

Shapes are those of ``F.cross_entropy``: input (C,), (N, C) or (N, C, d1, ...) with the class dimension
second; other layouts are moved to (rows, C) first (a copy for 3-D and more).
"""

from __future__ import annotations

import torch

from .common import IGNORE_INDEX, accumulate_dtype, check_reduction, check_tensor

_CHUNK_ROWS = 1024


def _chunks(n: int):
    for r in range(0, n, _CHUNK_ROWS):
        yield slice(r, min(r + _CHUNK_ROWS, n))


def _as_rows(input: torch.Tensor, target: torch.Tensor, soft: bool):
    """F.cross_entropy's layouts to (rows, C) logits and (rows,) labels or (rows, C) probabilities, and
    the shape of the per-position loss ("none")."""
    if input.ndim == 1:
        return input[None], (target[None] if soft else target.reshape(1)), ()
    C = input.shape[1]
    out_shape = input.shape[:1] + input.shape[2:]
    if input.ndim == 2:
        return input, target, out_shape
    rows = input.movedim(1, -1).reshape(-1, C)
    return rows, (target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)), out_shape


def _check(input, target, ignore_index, weight, *, weight_name="weight", allow_soft=True, need_kept=False):
    """Check ``F.cross_entropy``-style arguments; return (rows, C) logits, labels or probabilities, the
    kept rows (None for soft targets), whether the target is soft, and the per-position output shape."""
    check_tensor(input, "input")
    check_tensor(target, "target")
    if not input.is_floating_point() or input.ndim < 1:
        raise ValueError(f"input must be a floating tensor of logits of shape (C,), (N, C) or (N, C, d1, ...), "
                         f"got dtype {input.dtype} and shape {tuple(input.shape)}")
    C = input.shape[0] if input.ndim == 1 else input.shape[1]
    index_shape = () if input.ndim == 1 else input.shape[:1] + input.shape[2:]
    soft = target.is_floating_point()
    if soft and not allow_soft:
        raise ValueError(f"target must be an int64 tensor of class indices of shape {tuple(index_shape)}, "
                         f"got dtype {target.dtype} (class probabilities are not supported here)")
    if soft:
        if target.shape != input.shape:
            raise ValueError(f"target of class probabilities must have the shape of input {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
    elif target.dtype != torch.long or target.shape != index_shape:
        raise ValueError(f"target must be an int64 tensor of class indices of shape {tuple(index_shape)} "
                         f"(or floating class probabilities of input's shape), got dtype {target.dtype} "
                         f"and shape {tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (C,):
            raise ValueError(f"{weight_name} must be a tensor of shape ({C},), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if not weight.is_floating_point():
            raise ValueError(f"{weight_name} must be a floating tensor, got dtype {weight.dtype}")
        if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{weight_name} must be >= 0 and finite")
    x, t, out_shape = _as_rows(input, target, soft)
    if soft:
        if bool((t < 0).any()):
            raise ValueError("target of class probabilities must be >= 0")
        # a row that does not sum to 1 (logits or counts passed as target) has a loss whose minimum is
        # not the target distribution; the tolerance only absorbs rounding
        tol = 1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-3
        if t.shape[0] and not bool(((t.sum(dim=1, dtype=torch.float64) - 1).abs() <= tol).all()):
            raise ValueError("target of class probabilities must sum to 1 over the class dimension (dim 1)")
        return x, t, None, True, out_shape
    kept = t != ignore_index
    if need_kept and not bool(kept.any()):
        raise ValueError(f"target is all ignore_index={ignore_index}: the mean of a fully masked batch is "
                         f"undefined (reduction 'sum' gives 0)")
    if bool(((t[kept] < 0) | (t[kept] >= C)).any()):
        raise ValueError(f"target holds class indices outside [0, {C}) other than ignore_index")
    return x, t, kept, False, out_shape


def _row_stats(x: torch.Tensor, smooth_weight: torch.Tensor | None = None, smoothing: bool = False):
    """Per row of (N, C) ``x``: the maximum ``m`` (0 where it is infinite, as ``torch.logsumexp`` does),
    ``lse_rel = log sum_c exp(x_c - m)``, and with ``smoothing`` ``s = sum_c w_c (m - x_c)`` (w = 1 if
    None). In the accumulation dtype, chunk by chunk."""
    acc = accumulate_dtype(x.dtype)
    N = x.shape[0]
    m = torch.empty(N, dtype=acc, device=x.device)
    lse_rel = torch.empty_like(m)
    s = torch.empty_like(m) if smoothing else None
    w = None if smooth_weight is None else smooth_weight.to(acc)
    for sl in _chunks(N):
        shifted = x[sl].to(acc)
        top = shifted.amax(dim=1)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        m[sl] = top
        shifted = shifted - top[:, None]  # <= 0: x - m, exact where it matters (near the maximum)
        if smoothing:
            s[sl] = -(shifted.sum(dim=1) if w is None else shifted @ w)
        lse_rel[sl] = shifted.exp_().sum(dim=1).log_()
    return m, lse_rel, s


def _softmax_gradient(x, m, lse_rel, a, rest, drop=None) -> torch.Tensor:
    """``a_i * softmax(x_i)`` plus the terms ``rest(block, rows)`` adds in place, row chunk by row chunk,
    in one buffer of x's shape and dtype. Rows in ``drop`` get 0 (an ignored row may hold -inf logits,
    whose softmax is NaN)."""
    acc = accumulate_dtype(x.dtype)
    grad = torch.empty_like(x)
    # softmax = exp(x - m) * exp(-lse_rel): one pass fewer than subtracting lse_rel, as exact (lse_rel is
    # in [0, log C], so exp(-lse_rel) is a per-row number with a rounding error of one ulp)
    a = a * torch.exp(-lse_rel)
    for sl in _chunks(x.shape[0]):
        if acc == x.dtype:
            block = grad[sl]
            torch.sub(x[sl], m[sl, None], out=block)
        else:
            block = x[sl].to(acc) - m[sl, None]
        block.exp_().mul_(a[sl, None])
        rest(block, sl)
        if drop is not None:
            block.masked_fill_(drop[sl, None], 0.0)
        if block.data_ptr() != grad[sl].data_ptr():
            grad[sl].copy_(block)
    return grad


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy on class indices, ``(1 - eps) w_y (lse - x_y) + eps/K sum_c w_c (lse - x_c)``,
    times ``row_scale``; 0 on rows not ``kept``."""

    @staticmethod
    def forward(ctx, x, y_safe, kept, w, eps, row_scale):
        K = x.shape[1]
        acc = accumulate_dtype(x.dtype)
        m, lse_rel, s = _row_stats(x, w, smoothing=eps > 0)
        x_y = x.gather(1, y_safe[:, None])[:, 0].to(acc)
        w_y = torch.ones_like(m) if w is None else w[y_safe].to(acc)
        loss = (1 - eps) * w_y * ((m - x_y) + lse_rel)  # lse - x_y without forming lse (rounded at 1e4)
        if eps > 0:
            W = float(K) if w is None else float(w.sum())
            loss = loss + eps / K * (s + W * lse_rel)
        # select, not multiply: an ignored row's loss may be inf (a -inf logit at y_safe) and 0 * inf is NaN
        loss = torch.where(kept, loss * row_scale, torch.zeros_like(loss))
        ctx.save_for_backward(x, y_safe, kept, w_y, m, lse_rel, row_scale)
        ctx.w, ctx.eps = w, eps
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y_safe, kept, w_y, m, lse_rel, row_scale = ctx.saved_tensors
        K = x.shape[1]
        eps, w = ctx.eps, ctx.w
        g = torch.where(kept, grad_out.to(m.dtype) * row_scale, torch.zeros_like(m))  # (N,) per row
        W = float(K) if w is None else float(w.sum())
        a = g * ((1 - eps) * w_y + eps * W / K)
        b = g * (1 - eps) * w_y
        c = g * eps / K
        w_acc = None if w is None else w.to(m.dtype)

        def rest(block, sl):
            block.scatter_add_(1, y_safe[sl, None], -b[sl, None])
            if eps > 0:
                if w_acc is None:
                    block.sub_(c[sl, None])
                else:
                    block.addr_(c[sl], w_acc, alpha=-1.0)

        return _softmax_gradient(x, m, lse_rel, a, rest, ~kept), None, None, None, None, None


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy on class probabilities ``t``: ``sum_c w_c t'_c (lse - x_c)`` with
    ``t' = (1 - eps) t + eps / K``, times ``row_scale``. Differentiable in ``x`` and ``t``."""

    @staticmethod
    def forward(ctx, x, t, w, eps, row_scale):
        K = x.shape[1]
        acc = accumulate_dtype(x.dtype)
        m, lse_rel, _ = _row_stats(x)
        loss = torch.empty_like(m)
        total_weight = torch.empty_like(m)  # sum_c w_c t'_c per row
        w_acc = None if w is None else w.to(acc)
        for sl in _chunks(x.shape[0]):
            tw = _smoothed(t[sl].to(acc), eps, K, w_acc)
            # sum_c tw_c (m - x_c + lse_rel); a class with tw_c = 0 takes no part, even at x_c = -inf
            nll = (m[sl, None] - x[sl].to(acc)) + lse_rel[sl, None]
            loss[sl] = torch.where(tw > 0, tw * nll, torch.zeros_like(nll)).sum(dim=1)
            total_weight[sl] = tw.sum(dim=1)
        ctx.save_for_backward(x, t, m, lse_rel, total_weight, row_scale)
        ctx.w, ctx.eps = w, eps
        return (loss * row_scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, t, m, lse_rel, total_weight, row_scale = ctx.saved_tensors
        K = x.shape[1]
        eps, w = ctx.eps, ctx.w
        acc = m.dtype
        w_acc = None if w is None else w.to(acc)
        g = grad_out.to(acc) * row_scale

        def rest(block, sl):  # d/dx = g (sum_c tw_c) softmax - g tw
            block.sub_(g[sl, None] * _smoothed(t[sl].to(acc), eps, K, w_acc))

        grad_x = _softmax_gradient(x, m, lse_rel, g * total_weight, rest) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:  # d/dt_c = g (1 - eps) w_c (lse - x_c)
            grad_t = torch.empty_like(t)
            for sl in _chunks(x.shape[0]):
                block = (m[sl, None] - x[sl].to(acc)) + lse_rel[sl, None]
                block = block * (g[sl, None] * (1 - eps))
                grad_t[sl] = block if w_acc is None else block * w_acc
        return grad_x, grad_t, None, None, None


def _smoothed(t, eps, K, w):
    """``w * ((1 - eps) t + eps / K)`` (w = 1 if None)."""
    tw = t * (1 - eps) + eps / K if eps > 0 else t
    return tw if w is None else tw * w


def cross_entropy(input: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None,
                  ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                  smoothing_convention: str = "uniform", reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with class weights, ``ignore_index`` and label smoothing, equal to
    ``F.cross_entropy`` in value and gradient for every input shape it takes, at lower memory cost.

    .. math::
        \\ell_i = -\\sum_c w_c\\, q_{ic} \\log \\mathrm{softmax}(x_i)_c, \\quad
        q_i = (1 - \\varepsilon)\\, t_i + \\varepsilon / C

    with ``t_i`` the one-hot label (or the given class probabilities) and ``w = 1`` without weights.

    Args:
        input: logits, (C,), (N, C) or (N, C, d1, ...): the class dimension is dim 1 (dim 0 for 1-D).
        target: either int64 class indices, () for 1-D input, (N,) or (N, d1, ...), where
            ``ignore_index`` marks positions without a loss; or floating class probabilities of input's
            shape (soft targets: >= 0, summing to 1 over the class dimension; ``ignore_index`` does not
            apply; differentiable).
        weight: (C,) class weights >= 0. With class indices, ``"mean"`` divides by the summed weight
            ``sum w_y`` of the kept targets and the smoothing term weights class c by ``w_c`` (PyTorch's
            semantics); with probabilities, ``"mean"`` divides by the number of positions.
        ignore_index: label of positions that take no loss (class indices only).
        label_smoothing: epsilon in [0, 1).
        smoothing_convention: ``"uniform"`` (PyTorch's: target ``(1 - eps) onehot + eps / C``, the true
            class gets ``1 - eps + eps / C``) or ``"others"`` (true class ``1 - eps``, the others
            ``eps / (C - 1)``), which equals PyTorch's with ``eps * C / (C - 1)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per position, shape of target without the class
            dimension; ignored positions give 0). ``"mean"`` of a batch whose targets are all ignored is
            undefined and raises; ``"sum"`` gives 0.

    Only the row maximum and log-sum-exp are kept for the backward pass (not the (N, C) log-softmax).
    """
    check_reduction(reduction)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    x, t, kept, soft, out_shape = _check(input, target, ignore_index, weight, need_kept=reduction == "mean")
    C = x.shape[1]
    if smoothing_convention == "others":
        if C < 2 and label_smoothing > 0:
            raise ValueError("smoothing_convention 'others' needs at least 2 classes")
        # exact for any eps in [0, 1), also where eps * C / (C - 1) > 1 is beyond F.cross_entropy's range
        label_smoothing = label_smoothing * C / (C - 1) if label_smoothing > 0 else 0.0
    elif smoothing_convention != "uniform":
        raise ValueError(f"smoothing_convention must be 'uniform' or 'others', got {smoothing_convention!r}")
    acc = accumulate_dtype(x.dtype)
    if soft:
        n_rows = x.shape[0]
        if reduction == "mean" and n_rows == 0:
            raise ValueError("input has no positions: the mean is undefined")
        row_scale = torch.full((n_rows,), 1.0 / n_rows if reduction == "mean" else 1.0, dtype=acc, device=x.device)
        losses = _SoftCrossEntropy.apply(x, t, weight, float(label_smoothing), row_scale)
    else:
        y_safe = torch.where(kept, t, torch.zeros_like(t))
        row_scale = torch.ones(x.shape[0], dtype=acc, device=x.device)
        if reduction == "mean":
            denom = kept.sum() if weight is None else weight[y_safe][kept].sum()
            if not denom > 0:
                raise ValueError("the kept targets have zero total weight: the mean is undefined")
            row_scale = row_scale / denom.to(acc)
        losses = _CrossEntropy.apply(x, y_safe, kept, weight, float(label_smoothing), row_scale)
    return losses.view(out_shape) if reduction == "none" else losses.sum()


class _SoftmaxFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y_safe, kept, alpha_y, gamma, row_scale):
        acc = accumulate_dtype(x.dtype)
        m, lse_rel, _ = _row_stats(x)
        log_p = (x.gather(1, y_safe[:, None])[:, 0].to(acc) - m) - lse_rel  # log p_y, relative to the max
        one_minus_p = -torch.expm1(log_p)  # accurate where p_y is close to 1
        loss = -alpha_y * one_minus_p.pow(gamma) * log_p
        loss = torch.where(kept, loss * row_scale, torch.zeros_like(loss))  # 0 * inf is NaN on ignored rows
        ctx.save_for_backward(x, y_safe, kept, alpha_y, m, lse_rel, log_p, one_minus_p, row_scale)
        ctx.gamma = gamma
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y_safe, kept, alpha_y, m, lse_rel, log_p, one_minus_p, row_scale = ctx.saved_tensors
        gamma = ctx.gamma
        p = torch.exp(log_p)
        # d loss / d log p_y; the gamma term is written so that gamma < 1 gives 0, not 0 * inf, at p_y = 1
        focus = one_minus_p.pow(gamma)
        if gamma > 0:
            safe = one_minus_p > 0
            extra = torch.where(safe, gamma * one_minus_p.clamp(min=1e-30).pow(gamma - 1) * p * log_p,
                                torch.zeros_like(p))
        else:
            extra = torch.zeros_like(p)
        d_logp = -alpha_y * (focus - extra)
        # d loss / d x_j = d_logp * (onehot_j - softmax_j)
        g = torch.where(kept, grad_out.to(m.dtype) * row_scale * d_logp, torch.zeros_like(m))

        def rest(block, sl):
            block.scatter_add_(1, y_safe[sl, None], g[sl, None])

        return _softmax_gradient(x, m, lse_rel, -g, rest, ~kept), None, None, None, None, None


def softmax_focal_loss(input: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                       alpha: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                       reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017, multi-class form): ``-alpha_y (1 - p_y)^gamma log p_y``.

    Args:
        input: logits, (C,), (N, C) or (N, C, d1, ...), classes in dim 1 as for ``F.cross_entropy``.
        target: int64 class indices, (), (N,) or (N, d1, ...), or ``ignore_index``. Class probabilities
            are refused (ValueError): the focal term of a soft target has no single ``p_y``.
        gamma: focusing exponent >= 0; 0 is cross-entropy.
        alpha: (C,) class weights, or None. A single number would only rescale the loss, so it is not
            offered. ``"mean"`` divides by the summed ``alpha_y`` of the kept positions, so that gamma = 0
            equals ``F.cross_entropy(weight=alpha)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per position; ignored positions give 0).
    """
    check_reduction(reduction)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    x, t, kept, _, out_shape = _check(input, target, ignore_index, alpha, weight_name="alpha", allow_soft=False,
                                      need_kept=reduction == "mean")
    acc = accumulate_dtype(x.dtype)
    y_safe = torch.where(kept, t, torch.zeros_like(t))
    alpha_y = torch.ones(x.shape[0], dtype=acc, device=x.device) if alpha is None else alpha[y_safe].to(acc)
    row_scale = torch.ones_like(alpha_y)
    if reduction == "mean":
        denom = (alpha_y * kept).sum()
        if not denom > 0:
            raise ValueError("the kept targets have zero total alpha: the mean is undefined")
        row_scale = row_scale / denom
    losses = _SoftmaxFocal.apply(x, y_safe, kept, alpha_y, float(gamma), row_scale)
    return losses.view(out_shape) if reduction == "none" else losses.sum()


def naive_softmax_focal_loss(input: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """The textbook focal loss written over the full probability tensor, as it is commonly implemented:
    ``-sum_c onehot_c (1 - p_c)^gamma log p_c``, every operation on all (N, V) entries. Kept to show what
    that costs (see ``minigpt.loss_bench``) and as a reference for the fused version. No ignore_index."""
    log_probs = torch.log_softmax(input, dim=1)
    probs = log_probs.exp()
    onehot = torch.nn.functional.one_hot(target, input.shape[1]).to(input.dtype)
    return (-(onehot * (1 - probs) ** gamma * log_probs).sum(dim=1)).mean()
