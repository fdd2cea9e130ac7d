"""Token-level classification losses over large vocabularies, fast and lean.

``F.cross_entropy`` keeps the whole (N, V) log-softmax for its backward pass, and a focal loss written
with tensor operations keeps several (N, V) tensors more; at N = 8192 tokens and V = 50257 each of them
is 1.6 GB. These losses are ``autograd.Function``s that keep only the per-row log-sum-exp (N numbers)
and compute the gradient ``a * softmax - b * onehot - c * w`` in the one (N, V) buffer that the gradient
needs anyway, in row chunks so that no other full-size temporary exists.
"""

from __future__ import annotations

import torch

from ._checks import IGNORE_INDEX, check_reduction

_CHUNK_ROWS = 1024


def _check(input, target, ignore_index, weight):
    if not isinstance(input, torch.Tensor) or input.ndim != 2 or not input.is_floating_point():
        raise ValueError("input must be a floating (N, C) tensor of logits (flatten (B, T, V) to (B*T, V))")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.shape != input.shape[:1]:
        raise ValueError(f"target must be an int64 tensor of shape ({input.shape[0]},)")
    C = input.shape[1]
    kept = target != ignore_index
    if not bool(kept.any()):
        raise ValueError(f"target is all ignore_index={ignore_index}: a fully masked batch has no loss")
    if bool(((target[kept] < 0) | (target[kept] >= C)).any()):
        raise ValueError(f"target holds class indices outside [0, {C}) other than ignore_index")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (C,):
            raise ValueError(f"weight must be a tensor of shape ({C},)")
        if bool((weight < 0).any()):
            raise ValueError("weight must be >= 0")
    return kept


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for r in range(0, x.shape[0], _CHUNK_ROWS):
        out[r:r + _CHUNK_ROWS] = torch.logsumexp(x[r:r + _CHUNK_ROWS], dim=1)
    return out


def _softmax_gradient(x, lse, a, y_safe, b, c=None, w=None) -> torch.Tensor:
    """``a_i * softmax(x_i) - b_i * onehot(y_i) - c_i * w`` (w = 1 if None), row by row, in one buffer."""
    grad = torch.empty_like(x)
    for r in range(0, x.shape[0], _CHUNK_ROWS):
        block = grad[r:r + _CHUNK_ROWS]
        torch.sub(x[r:r + _CHUNK_ROWS], lse[r:r + _CHUNK_ROWS, None], out=block)
        block.exp_().mul_(a[r:r + _CHUNK_ROWS, None])
    grad.scatter_add_(1, y_safe[:, None], -b[:, None])
    if c is not None:
        if w is None:
            grad.sub_(c[:, None])
        else:
            grad.addr_(c, w, alpha=-1.0)
    return grad


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y_safe, kept, w, eps, row_scale):
        K = x.shape[1]
        lse = _logsumexp_rows(x)
        x_y = x.gather(1, y_safe[:, None])[:, 0]
        w_y = torch.ones_like(lse) if w is None else w[y_safe].to(x.dtype)
        keep = kept.to(x.dtype)
        loss = (1 - eps) * w_y * (lse - x_y)
        if eps > 0:
            W = float(K) if w is None else float(w.sum())
            x_dot_w = x.sum(dim=1) if w is None else x @ w.to(x.dtype)
            loss = loss + eps / K * (W * lse - x_dot_w)
        ctx.save_for_backward(x, y_safe, keep, w_y, lse, row_scale)
        ctx.w, ctx.eps = w, eps
        return loss * keep * row_scale

    @staticmethod
    def backward(ctx, grad_out):
        x, y_safe, keep, w_y, lse, row_scale = ctx.saved_tensors
        K = x.shape[1]
        g = grad_out * row_scale * keep  # (N,) upstream gradient per row
        eps, w = ctx.eps, ctx.w
        W = float(K) if w is None else float(w.sum())
        a = g * ((1 - eps) * w_y + eps * W / K)
        b = g * (1 - eps) * w_y
        c = g * eps / K if eps > 0 else None
        grad = _softmax_gradient(x, lse, a, y_safe, b, c, None if w is None else w.to(x.dtype))
        return grad, None, None, None, None, None


def cross_entropy(input: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None,
                  ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                  smoothing_convention: str = "uniform", reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with class weights, ``ignore_index`` and label smoothing, exactly as
    ``F.cross_entropy``, at lower time and memory cost.

    Args:
        input: (N, C) logits. target: (N,) int64 labels or ``ignore_index``.
        weight: (C,) class weights. The mean divides by the summed weight of the kept targets, and the
            smoothing term weights each class c by ``w_c`` (PyTorch's semantics).
        label_smoothing: epsilon in [0, 1).
        smoothing_convention: ``"uniform"`` (PyTorch's: target ``(1 - eps) onehot + eps / C``, the true
            class gets ``1 - eps + eps / C``) or ``"others"`` (true class ``1 - eps``, the others
            ``eps / (C - 1)``), which equals PyTorch's with ``eps * C / (C - 1)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (ignored rows give 0).
    """
    kept = _check(input, target, ignore_index, weight)
    C = input.shape[1]
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if smoothing_convention == "others":
        # exact for any eps in [0, 1), also where eps * C / (C - 1) > 1 is beyond F.cross_entropy's range
        label_smoothing = label_smoothing * C / (C - 1)
    elif smoothing_convention != "uniform":
        raise ValueError(f"smoothing_convention must be 'uniform' or 'others', got {smoothing_convention!r}")
    check_reduction(reduction)
    return _cross_entropy(input, target, kept, weight, label_smoothing, reduction)


def _cross_entropy(input, target, kept, weight, label_smoothing, reduction):
    """:func:`cross_entropy` on arguments already checked (``kept``: the rows that take a loss)."""
    y_safe = torch.where(kept, target, torch.zeros_like(target))
    if reduction == "mean":
        denom = kept.sum() if weight is None else weight[y_safe][kept].sum()
        if not denom > 0:
            raise ValueError("the kept targets have zero total weight: the mean is undefined")
        row_scale = torch.full_like(input[:, 0], 1.0).detach() / denom.to(input.dtype)
    else:
        row_scale = torch.ones_like(input[:, 0]).detach()
    losses = _CrossEntropy.apply(input, y_safe, kept, weight, float(label_smoothing), row_scale)
    return losses if reduction == "none" else losses.sum()


class _SoftmaxFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y_safe, keep, alpha_y, gamma, row_scale):
        lse = _logsumexp_rows(x)
        log_p = x.gather(1, y_safe[:, None])[:, 0] - lse  # log p_y
        one_minus_p = -torch.expm1(log_p)  # accurate where p_y is close to 1
        loss = -alpha_y * one_minus_p.pow(gamma) * log_p
        ctx.save_for_backward(x, y_safe, keep, alpha_y, lse, log_p, one_minus_p, row_scale)
        ctx.gamma = gamma
        return loss * keep * row_scale

    @staticmethod
    def backward(ctx, grad_out):
        x, y_safe, keep, alpha_y, lse, log_p, one_minus_p, row_scale = ctx.saved_tensors
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
        g = grad_out * row_scale * keep * d_logp  # d loss / d x_j = d_logp * (onehot_j - softmax_j)
        grad = _softmax_gradient(x, lse, -g, y_safe, -g)
        return grad, None, None, None, None, None


def softmax_focal_loss(input: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                       alpha: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                       reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017, multi-class form): ``-alpha_y (1 - p_y)^gamma log p_y``.

    Args:
        input: (N, C) logits. target: (N,) int64 labels or ``ignore_index``.
        gamma: focusing exponent >= 0; 0 is cross-entropy.
        alpha: (C,) class weights, or None. A single number would only rescale the loss, so it is not
            offered. ``"mean"`` divides by the summed ``alpha_y`` of the kept rows, so that gamma = 0
            equals ``F.cross_entropy(weight=alpha)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    kept = _check(input, target, ignore_index, alpha)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_reduction(reduction)
    y_safe = torch.where(kept, target, torch.zeros_like(target))
    alpha_y = torch.ones_like(input[:, 0]).detach() if alpha is None else alpha[y_safe].to(input.dtype)
    keep = kept.to(input.dtype)
    if reduction == "mean":
        row_scale = torch.ones_like(keep) / (alpha_y * keep).sum()
    else:
        row_scale = torch.ones_like(keep)
    losses = _SoftmaxFocal.apply(input, y_safe, keep, alpha_y, float(gamma), row_scale)
    return losses if reduction == "none" else losses.sum()


def naive_softmax_focal_loss(input: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """The textbook focal loss written over the full probability tensor, as it is commonly implemented:
    ``-sum_c onehot_c (1 - p_c)^gamma log p_c``, every operation on all (N, V) entries. Kept to show what
    that costs (see ``minigpt.loss_bench``) and as a reference for the fused version. No ignore_index."""
    log_probs = torch.log_softmax(input, dim=1)
    probs = log_probs.exp()
    onehot = torch.nn.functional.one_hot(target, input.shape[1]).to(input.dtype)
    return (-(onehot * (1 - probs) ** gamma * log_probs).sum(dim=1)).mean()
