"""Sequence losses for supervised fine-tuning: how per-token losses become one number.

Notation: per-token loss ``l[i, t]`` (e.g. the NLL of the next token), mask ``m[i, t]`` (1 where a token
takes a loss: response tokens, not padding or prompt), length ``T_i = sum_t m[i, t]``, batch size B.

========================  ===============================================  ===============================
reduction                 loss                                             gradient weight of token (i, t)
========================  ===============================================  ===============================
``"sum"``                 ``sum_i sum_t m l``                              1
``"token_mean"``          ``sum m l / sum m`` (Hugging Face, TRL, DAPO)    ``1 / sum m``: every token equal
``"sequence_mean"``       ``mean_i (sum_t m l / T_i)`` (GRPO's original)   ``1 / (B' T_i)``: short wins
``"length_normalized"``   ``(1/B') sum_i T_i^-alpha sum_t m l``            ``1 / (B' T_i^alpha)``
========================  ===============================================  ===============================

B' counts the sequences with at least one token. ``alpha = 1`` is the sequence mean and ``alpha = 0`` is
the sum divided by B'. With gradient accumulation, pass ``num_items``: the number of tokens
(``token_mean``) or sequences (the others) in the whole optimizer step, counted over all its
micro-batches. Each micro-batch's loss is then its share of the full batch's loss, and the summed
gradients equal those of one large batch. A mean of micro-batch means is wrong whenever micro-batches
hold different counts (the 2024 fix in Hugging Face's trainer, ``num_items_in_batch``).
"""

from __future__ import annotations

import torch

from .common import IGNORE_INDEX, check_floating, check_tensor
from .token import cross_entropy

SEQUENCE_REDUCTIONS = ("sum", "token_mean", "sequence_mean", "length_normalized")


def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token negative log-likelihood, ``-log softmax(logits[i, t])[labels[i, t]]``.

    Args:
        logits: (B, T, V) next-token scores, floating.
        labels: (B, T) int64 next-token ids; ``ignore_index`` marks positions without a loss.
    Returns:
        (B, T) losses in logits' dtype, 0 at ignored positions (all 0 if every label is ignored, still
        connected to ``logits`` so that a backward pass runs).
    """
    check_tensor(logits, "logits")
    check_tensor(labels, "labels")
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor of shape (B, T, V), got dtype {logits.dtype} "
                         f"and shape {tuple(logits.shape)}")
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be an int64 tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (logits without V), got {tuple(labels.shape)}")
    V = logits.shape[-1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels hold ids outside [0, {V}) other than ignore_index={ignore_index}: "
                         f"{labels[bad][:5].tolist()}")
    B, T = labels.shape
    # the lean cross-entropy: no (B*T, V) log-softmax kept for the backward pass
    return cross_entropy(logits.reshape(B * T, V), labels.reshape(B * T), ignore_index=ignore_index,
                         reduction="none").view(B, T)


def _check_mask(mask, shape, name="mask") -> None:
    check_tensor(mask, name)
    if mask.shape != shape:
        raise ValueError(f"{name} must have the shape of token_losses {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        # a fractional mask would silently count fractional tokens; weighted_token_mean takes weights
        raise ValueError(f"{name} must be boolean or hold only 0 and 1")


def _check_losses_and_mask(token_losses: torch.Tensor, mask: torch.Tensor, *, allow_empty: bool = False) -> torch.Tensor:
    check_floating(token_losses, "token_losses")  # integer losses would round, and weights with them
    if token_losses.ndim != 2:
        raise ValueError(f"token_losses must have shape (B, T), got {tuple(token_losses.shape)}")
    _check_mask(mask, token_losses.shape)
    if not allow_empty and not bool(mask.any()):
        raise ValueError("mask is all zero: a fully masked batch has no tokens to take a loss on "
                         "(with gradient accumulation, pass num_items and it contributes 0)")
    return mask.to(token_losses.dtype)


def token_weights(mask: torch.Tensor, *, reduction: str = "token_mean", alpha: float = 1.0,
                  num_items: int | None = None) -> torch.Tensor:
    """The weight each token's loss gets in :func:`sequence_loss`, i.e. d loss / d l[i, t]: (B, T),
    float64. The gradient a token sends to the model is this weight times the gradient of its own loss.

    ``mask`` (B, T) boolean or 0/1. An all-zero mask is refused unless ``num_items`` is given (then every
    weight is 0: a micro-batch without tokens contributes nothing to the optimizer step)."""
    if reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEQUENCE_REDUCTIONS}, got {reduction!r}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if num_items is not None and not num_items > 0:
        raise ValueError(f"num_items must be a positive count, got {num_items}")
    check_tensor(mask, "mask")
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    _check_mask(mask, mask.shape)
    m = mask.to(torch.float64)
    if num_items is None and not bool(m.any()):
        raise ValueError("mask is all zero: a fully masked batch has no tokens to take a loss on "
                         "(with gradient accumulation, pass num_items and it contributes 0)")
    lengths = m.sum(dim=1, keepdim=True)  # (B, 1)
    n_sequences = int((lengths > 0).sum())
    if reduction == "sum":
        return m
    if reduction == "token_mean":
        return m / (num_items if num_items is not None else m.sum())
    power = 1.0 if reduction == "sequence_mean" else alpha
    per_sequence = torch.where(lengths > 0, lengths.clamp(min=1) ** -power, torch.zeros_like(lengths))
    return m * per_sequence / (num_items if num_items is not None else n_sequences)


def sequence_loss(token_losses: torch.Tensor, mask: torch.Tensor, *, reduction: str = "token_mean",
                  alpha: float = 1.0, num_items: int | None = None) -> torch.Tensor:
    """Combine (B, T) per-token losses into one number; see the module docstring for the reductions.

    Args:
        token_losses: (B, T) floating per-token losses.
        mask: (B, T) boolean (or 0/1), true where a token takes a loss.
        reduction: one of :data:`SEQUENCE_REDUCTIONS`: ``"sum"``, ``"token_mean"``, ``"sequence_mean"``
            or ``"length_normalized"``.
        alpha: exponent of ``"length_normalized"`` (>= 0).
        num_items: tokens (``"token_mean"``) or sequences (the others) in the whole optimizer step, for
            gradient accumulation. With it, a micro-batch whose mask is all zero gives 0 (still connected
            to ``token_losses``); without it, such a batch raises.
    """
    m = _check_losses_and_mask(token_losses, mask, allow_empty=num_items is not None)
    weights = token_weights(mask, reduction=reduction, alpha=alpha, num_items=num_items)
    # select, not multiply: a masked position may hold inf or NaN (padding), and 0 * inf is NaN
    kept = torch.where(m > 0, token_losses, torch.zeros_like(token_losses))
    return (kept * weights.to(token_losses.dtype)).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "token_mean", alpha: float = 1.0,
             ignore_index: int = IGNORE_INDEX, num_items: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not ``ignore_index``, reduced as
    :func:`sequence_loss` says. ``logits`` (B, T, V), ``labels`` (B, T) int64. With
    ``reduction="token_mean"`` it equals ``F.cross_entropy(..., ignore_index=ignore_index)``.

    With ``num_items`` (gradient accumulation), a micro-batch whose labels are all ``ignore_index`` gives
    0, connected to ``logits`` so that ``.backward()`` runs and adds nothing; without it, it raises."""
    if num_items is None and isinstance(labels, torch.Tensor) and not bool((labels != ignore_index).any()):
        raise ValueError("labels are all ignore_index: a fully masked batch has no tokens to take a loss on "
                         "(with gradient accumulation, pass num_items and it contributes 0)")
    return sequence_loss(token_nll(logits, labels, ignore_index=ignore_index), labels != ignore_index,
                         reduction=reduction, alpha=alpha, num_items=num_items)


def adaptive_length_penalty_loss(token_losses: torch.Tensor, mask: torch.Tensor, *, target_length: float,
                                 penalty: float = 0.1) -> torch.Tensor:
    """The source notes' "adaptive length" loss: each sequence's summed token loss is multiplied by
    ``1 + penalty * |T_i - target_length| / target_length``, then averaged over sequences.

    Kept so the book can measure it. Note what it does: it scales the loss (and gradient) of sequences
    whose length is far from the target, in either direction. It does not change which tokens a sequence
    emits, and it makes long sequences weigh even more than the plain sum does.
    """
    m = _check_losses_and_mask(token_losses, mask)
    if not target_length > 0:
        raise ValueError(f"target_length must be > 0, got {target_length}")
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    lengths = m.sum(dim=1)
    factor = 1.0 + penalty * (lengths - target_length).abs() / target_length
    kept = torch.where(m > 0, token_losses, torch.zeros_like(token_losses))
    return (kept.sum(dim=1) * factor).mean()


def weighted_token_mean(token_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum w l / sum w``: a token mean where each token counts ``w[i, t]`` times, e.g. weight 0.1 on
    instruction tokens and 1 on response tokens (0 drops a token). ``token_losses`` (B, T) floating,
    ``weights`` (B, T) >= 0."""
    check_floating(token_losses, "token_losses")
    check_tensor(weights, "weights")
    if weights.shape != token_losses.shape:
        raise ValueError(f"weights must have the shape of token_losses {tuple(token_losses.shape)}, "
                         f"got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be >= 0 and finite")
    weights = weights.to(token_losses.dtype)
    total = weights.sum()
    if not total > 0:
        raise ValueError("weights sum to zero: no token takes a loss")
    # select, not multiply, as in sequence_loss: a dropped position may hold inf or NaN
    kept = torch.where(weights > 0, token_losses, torch.zeros_like(token_losses))
    return (kept * weights).sum() / total


def mask_prompt(labels: torch.Tensor, prompt_lengths, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A copy of ``labels`` (B, T) with the first ``prompt_lengths[i]`` positions of row i set to
    ``ignore_index``, so that only the response takes a loss (TRL's ``completion_only_loss``)."""
    check_tensor(labels, "labels")
    if labels.ndim != 2 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape (B, T), got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    lengths = torch.as_tensor(prompt_lengths, device=labels.device)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        # a fractional length would mask up to its ceiling without a word
        raise ValueError(f"prompt_lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != labels.shape[:1]:
        raise ValueError(f"prompt_lengths must hold one length per row ({labels.shape[0]}), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > labels.shape[1]).any()):
        raise ValueError(f"prompt_lengths must lie in [0, {labels.shape[1]}]")
    positions = torch.arange(labels.shape[1], device=labels.device)
    return labels.masked_fill(positions[None, :] < lengths[:, None], ignore_index)
