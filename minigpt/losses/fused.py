"""Cross-entropy of a linear layer's output, computed without the logits.

A language model's last step is ``logits = hidden @ weight.T + bias`` followed by cross-entropy. At
N = 8192 tokens and a 50,257-word vocabulary the (N, V) logits are 1.6 GB in float32, and
``F.linear`` + ``F.cross_entropy`` keep about three more logits-sized tensors alive for the backward pass
(``minigpt.loss_bench`` measures it). :func:`linear_cross_entropy` never forms them: it walks the rows in
chunks of ``chunk_size``, and for each chunk computes the logits, the loss, and at once the chunk's
gradient with respect to the logits, which it turns into the gradients of ``hidden``, ``weight`` and
``bias`` before the next chunk overwrites it. Only one (chunk_size, V) block exists at a time.

Computing the gradient in the forward pass is what keeps the time at that of the two-step version: the
three matrix products (forward, and the two of the backward) each run once. It is possible because a
reduced loss is a scalar, so the backward pass only multiplies the stored gradients by the incoming
gradient. With ``reduction="none"`` the incoming gradient differs per row and is not known in the
forward pass: then the forward keeps only two numbers per row and the backward recomputes the logits
chunk by chunk (one matrix product more). Without grad mode (evaluation) no gradient is computed.

This is the idea of Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and, without storing
gradients, of Cut Cross-Entropy (Wijmans et al. 2024), written with torch operations for clarity.
"""

from __future__ import annotations

import torch

from .common import IGNORE_INDEX, accumulate_dtype, check_reduction, check_tensor

# rows per chunk by default: about 2**23 logits (32 MiB in float32) per block, at least 16 rows
_CHUNK_ELEMENTS = 2**23


def default_chunk_size(vocab_size: int) -> int:
    """The default rows per chunk for a vocabulary of ``vocab_size``: about 2**23 logits per block (32 MiB
    in float32; 166 rows at V = 50,257), and at least 16."""
    return max(16, _CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_logits(hidden, weight, bias, sl, acc):
    """The (c, V) logits of rows ``sl``, in the accumulation dtype (one block; addmm adds the bias in place)."""
    z = hidden[sl] @ weight.T if bias is None else torch.addmm(bias, hidden[sl], weight.T)
    return z.to(acc) if z.dtype != acc else z


def _chunk_stats(z, y, eps):
    """Per row of the (c, V) block ``z``: loss terms, and ``z`` overwritten with ``exp(z - m)``.
    Returns (m, lse_rel, loss_without_scale). ``lse_rel = log sum exp(z - m)``."""
    V = z.shape[1]
    m = z.amax(dim=1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # as torch.logsumexp does
    z_y = z.gather(1, y[:, None])[:, 0]
    mean_z = z.mean(dim=1) if eps > 0 else None
    z.sub_(m[:, None]).exp_()
    lse_rel = z.sum(dim=1).log_()
    # (1 - eps)(lse - z_y) + eps * (lse - mean_c z_c), with lse = m + lse_rel formed only as differences
    loss = (1 - eps) * ((m - z_y) + lse_rel)
    if eps > 0:
        loss = loss + eps * ((m - mean_z) + lse_rel)
    return m, lse_rel, loss


def _logit_gradient_(block, y, g, lse_rel, eps):
    """Turn ``block = exp(z - m)`` into ``g * (softmax(z) - (1 - eps) onehot(y) - eps / V)`` in place."""
    V = block.shape[1]
    block.mul_((g * torch.exp(-lse_rel))[:, None])
    block.scatter_add_(1, y[:, None], (-(1 - eps) * g)[:, None])
    if eps > 0:
        block.sub_((eps / V) * g[:, None])
    return block


def _accumulate(block, hidden, weight, sl, grads, needs):
    """Add one chunk's logit gradient ``block`` (c, V) to the gradients of hidden, weight and bias."""
    grad_hidden, grad_weight, grad_bias = grads
    b = block.to(hidden.dtype)
    if needs[0]:
        grad_hidden[sl] = b @ weight
    if needs[1]:
        grad_weight.addmm_(block.T, hidden[sl].to(block.dtype))
    if needs[2]:
        grad_bias.add_(block.sum(dim=0))


def _new_grads(hidden, weight, bias, needs, acc):
    return (torch.empty_like(hidden) if needs[0] else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None,
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs[2] else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row loss ``row_scale_i * [(1 - eps)(lse_i - z_iy) + eps (lse_i - mean_c z_ic)]`` of
    ``z = hidden @ weight.T + bias``; rows with ``row_scale`` 0 (ignored) take no part."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, y, row_scale, eps, chunk, grad_now):
        acc = accumulate_dtype(hidden.dtype)
        N = hidden.shape[0]
        loss = torch.empty(N, dtype=acc, device=hidden.device)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grads = _new_grads(hidden, weight, bias, needs, acc) if grad_now else None
        m_all = torch.empty(N, dtype=acc, device=hidden.device) if not grad_now else None
        lse_all = torch.empty_like(m_all) if not grad_now else None
        for start in range(0, N, chunk):
            sl = slice(start, min(start + chunk, N))
            z = _chunk_logits(hidden, weight, bias, sl, acc)
            m, lse_rel, rows = _chunk_stats(z, y[sl], eps)
            scale = row_scale[sl]
            # select, not multiply: an ignored row's loss may be inf, and 0 * inf is NaN
            loss[sl] = torch.where(scale != 0, rows * scale, torch.zeros_like(rows))
            if grad_now:  # the block becomes this chunk's logit gradient, then the inputs' gradients
                _accumulate(_logit_gradient_(z, y[sl], scale, lse_rel, eps), hidden, weight, sl, grads, needs)
            else:
                m_all[sl], lse_all[sl] = m, lse_rel
            del z
        ctx.eps, ctx.chunk, ctx.grad_now, ctx.needs = eps, chunk, grad_now, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        empty = torch.empty(0)
        if grad_now:
            ctx.save_for_backward(*(empty if g is None else g for g in grads))
        else:
            ctx.save_for_backward(hidden, weight, empty if bias is None else bias, y, row_scale, m_all, lse_all)
        ctx.has_bias = bias is not None
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs
        if ctx.grad_now:
            # the loss was summed afterwards, so grad_out is one number repeated on every row
            # (in place: a second weight-sized buffer here would double the memory the gradients take,
            # which is also why a second backward through the same graph is refused)
            if getattr(ctx, "backward_done", False):
                raise RuntimeError("linear_cross_entropy supports one backward pass per forward "
                                   "(its stored gradients were scaled in place); call it again instead of "
                                   "retain_graph=True")
            ctx.backward_done = True
            g = grad_out[0]
            grads = [s.mul_(g.to(s.dtype)) if need else None for s, need in zip(ctx.saved_tensors, needs)]
        else:
            hidden, weight, bias, y, row_scale, m_all, lse_all = ctx.saved_tensors
            bias = bias if ctx.has_bias else None
            grads = _new_grads(hidden, weight, bias, needs, m_all.dtype)
            g_rows = grad_out.to(m_all.dtype) * row_scale
            for start in range(0, hidden.shape[0], ctx.chunk):
                sl = slice(start, min(start + ctx.chunk, hidden.shape[0]))
                z = _chunk_logits(hidden, weight, bias, sl, m_all.dtype)
                z.sub_(m_all[sl, None]).exp_()
                _accumulate(_logit_gradient_(z, y[sl], g_rows[sl], lse_all[sl], ctx.eps),
                            hidden, weight, sl, grads, needs)
                del z
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``target``, without the (N, V) logits.

    Equals ``F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction=reduction)`` in value and in the gradients of ``hidden``,
    ``weight`` and ``bias``:

    .. math::
        z_i = W h_i + b, \\quad
        \\ell_i = (1 - \\varepsilon)\\,(\\operatorname{lse}(z_i) - z_{i y_i})
                  + \\varepsilon\\,\\bigl(\\operatorname{lse}(z_i) - \\tfrac{1}{V} \\textstyle\\sum_c z_{ic}\\bigr)

    computed ``chunk_size`` rows at a time, so that at most one (chunk_size, V) block of logits exists.

    Args:
        hidden: (N, D) or (B, T, D) floating hidden states (the input of the output layer).
        weight: (V, D) output matrix of the same dtype (``nn.Linear(D, V).weight``, or a tied embedding).
        target: int64 class indices of hidden's leading shape, (N,) or (B, T); ``ignore_index`` marks
            positions without a loss.
        bias: (V,) or None.
        ignore_index: label of positions that take no loss.
        label_smoothing: epsilon in [0, 1), PyTorch's convention (target ``(1 - eps) onehot + eps / V``).
        reduction: ``"mean"`` over the kept positions, ``"sum"``, or ``"none"`` (per position, target's
            shape, 0 where ignored). ``"mean"`` of a batch whose targets are all ignored raises.
        chunk_size: rows per block; default :func:`default_chunk_size` (about 32 MiB of float32 logits).
            Smaller saves memory (the block is chunk_size * V numbers), larger makes each matrix product
            bigger, which a CPU or GPU runs a little more efficiently.

    Returns:
        A scalar, or the per-position loss for ``"none"``, in hidden's dtype (accumulated in float32 for
        float16 and bfloat16 inputs).

    References: Hsu et al. 2024, "Liger Kernel: Efficient Triton kernels for LLM training"; Wijmans et al.
    2024, "Cut your losses in large-vocabulary language models".
    """
    check_reduction(reduction)
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        check_tensor(t, name)
    if not hidden.is_floating_point() or hidden.ndim < 2:
        raise ValueError(f"hidden must be a floating tensor of shape (N, D) or (B, T, D), got dtype "
                         f"{hidden.dtype} and shape {tuple(hidden.shape)}")
    D = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != D or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, {D}) to match hidden's last dimension, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.shape != (V,) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be a ({V},) tensor of dtype {hidden.dtype}, got shape "
                             f"{tuple(bias.shape)} and dtype {bias.dtype}")
    if target.dtype != torch.long or target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must be an int64 tensor of class indices of shape {tuple(hidden.shape[:-1])}, "
                         f"got dtype {target.dtype} and shape {tuple(target.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if chunk_size is None:
        chunk_size = default_chunk_size(V)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    out_shape = target.shape
    h = hidden.reshape(-1, D)
    t = target.reshape(-1)
    kept = t != ignore_index
    if bool(((t[kept] < 0) | (t[kept] >= V)).any()):
        raise ValueError(f"target holds class indices outside [0, {V}) other than ignore_index={ignore_index}")
    acc = accumulate_dtype(hidden.dtype)
    row_scale = kept.to(acc)
    if reduction == "mean":
        n = int(kept.sum())
        if n == 0:
            raise ValueError(f"target is all ignore_index={ignore_index}: the mean of a fully masked batch is "
                             f"undefined (reduction 'sum' gives 0)")
        row_scale = row_scale / n
    y_safe = torch.where(kept, t, torch.zeros_like(t))
    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    grad_now = wants_grad and reduction != "none" and h.shape[0] > 0
    losses = _LinearCrossEntropy.apply(h, weight, bias, y_safe, row_scale, float(label_smoothing), chunk_size,
                                       grad_now)
    return losses.view(out_shape) if reduction == "none" else losses.sum()
