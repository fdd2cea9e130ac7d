"""Classification losses with ``torch.nn.functional``'s conventions, computed from logits in log space so
that no probability is ever rounded to 0 or 1 on the way (see the sigmoid-then-BCE failure in
chapter 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_float_pair, check_reduction, reduce


def _check_binary_target(target: torch.Tensor, name: str = "target") -> None:
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError(f"{name} must hold probabilities in [0, 1] (0/1 labels or soft targets)")


def _check_sign_target(target: torch.Tensor) -> None:
    if not bool(((target == 1) | (target == -1)).all()):
        raise ValueError("target must hold labels -1 and +1 (margin losses use signed labels)")


def bce_with_logits(input: torch.Tensor, target: torch.Tensor, *, pos_weight: torch.Tensor | float | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on logits, ``-[w_p t log s(x) + (1 - t) log s(-x)]`` with ``s`` the sigmoid,
    computed as ``w_p t softplus(-x) + (1 - t) softplus(x)``: finite for any logit.

    Args:
        input: (...) logits. target: (...) in [0, 1].
        pos_weight: weight of the positive term (> 0), a scalar or broadcast over the last dimension
            (one per class); ``n_negative / n_positive`` balances a rare positive class.
    Equal to ``F.binary_cross_entropy_with_logits``.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_binary_target(target)
    pos = F.softplus(-input)  # -log s(x)
    neg = F.softplus(input)  # -log s(-x)
    if pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=input.dtype, device=input.device)
        if bool((pw <= 0).any()):
            raise ValueError("pos_weight must be > 0")
        pos = pos * pw
    return reduce(target * pos + (1 - target) * neg, reduction)


def hinge_loss(input: torch.Tensor, target: torch.Tensor, *, margin: float = 1.0,
               reduction: str = "mean") -> torch.Tensor:
    """Binary hinge loss ``max(0, margin - y f)`` with ``y`` in {-1, +1}: zero (and zero gradient) once
    an example is on the right side by the margin. Matches ``sklearn.metrics.hinge_loss``."""
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_sign_target(target)
    return reduce(torch.clamp(margin - target * input, min=0), reduction)


def squared_hinge_loss(input: torch.Tensor, target: torch.Tensor, *, margin: float = 1.0,
                       reduction: str = "mean") -> torch.Tensor:
    """``max(0, margin - y f)^2``, y in {-1, +1}: smooth at the margin, quadratic beyond it."""
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_sign_target(target)
    return reduce(torch.clamp(margin - target * input, min=0) ** 2, reduction)


def exponential_loss(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """AdaBoost's loss ``exp(-y f)``, y in {-1, +1}. It grows exponentially with the margin of a wrong
    example, which makes it the most sensitive of these losses to mislabelled data; beyond a margin of
    about -88 (float32) or -709 (float64) the value itself overflows to inf, as the mathematics says."""
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_sign_target(target)
    return reduce(torch.exp(-target * input), reduction)


def multi_margin_loss(input: torch.Tensor, target: torch.Tensor, *, p: int = 1, margin: float = 1.0,
                      weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Multi-class hinge (Weston and Watkins's form as in ``F.multi_margin_loss``):
    ``sum_{i != y} max(0, margin - x_y + x_i)^p / C`` per example, times ``weight[y]``.

    Args:
        input: (N, C) scores. target: (N,) int64 labels. p: 1 or 2. weight: (C,) class weights.
    """
    if not isinstance(input, torch.Tensor) or input.ndim != 2:
        raise ValueError("input must be an (N, C) tensor of scores")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.shape != input.shape[:1]:
        raise ValueError(f"target must be an int64 tensor of shape ({input.shape[0]},)")
    C = input.shape[1]
    if bool(((target < 0) | (target >= C)).any()):
        raise ValueError(f"target holds labels outside [0, {C})")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    check_reduction(reduction)
    true_score = input.gather(1, target[:, None])  # (N, 1)
    violation = torch.clamp(margin - true_score + input, min=0) ** p
    violation = violation.scatter(1, target[:, None], 0.0)  # the true class does not compete with itself
    loss = violation.sum(dim=1) / C
    if weight is not None:
        if weight.shape != (C,):
            raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
        loss = loss * weight[target]
    return reduce(loss, reduction)


def sigmoid_focal_loss(input: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "mean") -> torch.Tensor:
    """Focal loss for binary (or multi-label) classification (Lin et al. 2017, RetinaNet):

    .. math::
        \\mathrm{FL} = \\alpha_t\\,(1 - p_t)^\\gamma\\,\\mathrm{BCE}(x, t), \\quad
        p_t = p\\,t + (1 - p)(1 - t), \\quad \\alpha_t = \\alpha t + (1 - \\alpha)(1 - t)

    Args:
        input: (...) logits. target: (...) in [0, 1].
        alpha: weight of positives in [0, 1]; negative disables it. The paper's 0.25 gives positives *less*
            weight than negatives (0.25 vs 0.75): it offsets the down-weighting of easy negatives by the
            focusing term, it does not up-weight a rare class.
        gamma: focusing exponent >= 0; 0 gives (alpha-weighted) BCE.
        reduction: ``"mean"`` over all elements (RetinaNet instead divides the sum by the number of
            positives: use ``"sum"`` and divide).
    ``(1 - p_t)^gamma`` is computed as ``exp(gamma * log(1 - p_t))`` with ``log(1 - p_t)`` from log-sigmoids,
    so gamma < 1 gives no NaN gradient at saturated logits, where torchvision's form does.
    Matches ``torchvision.ops.sigmoid_focal_loss`` (``reduction="none"``) elsewhere.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_binary_target(target)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha > 1:
        raise ValueError(f"alpha must be <= 1 (negative disables it), got {alpha}")
    bce = bce_with_logits(input, target, reduction="none")
    if gamma > 0:
        # log(1 - p_t) = log(t (1 - p) + (1 - t) p), each term in log space (log 0 = -inf is fine here)
        log_one_minus_pt = torch.logaddexp(torch.log(target) + F.logsigmoid(-input),
                                           torch.log1p(-target) + F.logsigmoid(input))
        loss = torch.exp(gamma * log_one_minus_pt) * bce
    else:
        loss = bce
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return reduce(loss, reduction)


def kl_div(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "batchmean",
           log_target: bool = False) -> torch.Tensor:
    """Kullback-Leibler divergence ``KL(p || q) = sum p (log p - log q)`` with ``F.kl_div``'s argument order:
    ``input`` is the model's **log**-probabilities ``log q``, ``target`` the reference distribution ``p``.

    Terms with ``p = 0`` contribute 0 (``0 log 0 = 0``). Pass ``log_target=True`` to give ``log p``; then
    ``log p = -inf`` also contributes 0, where ``F.kl_div(log_target=True)`` returns NaN.

    Args:
        input: (N, ..., C) log-probabilities, e.g. ``log_softmax(logits, -1)``; every entry must be <= 0.
        target: same shape, probabilities (>= 0) or, with ``log_target``, log-probabilities.
        reduction: ``"batchmean"`` (sum / N: the KL per example, the true divergence for 2-D input),
            ``"sum"`` or ``"none"``. ``F.kl_div``'s ``"mean"`` divides by the number of *elements* (N x C),
            which is not a KL; it is refused here.
    """
    check_float_pair(input, target)
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}"
                         + (" ('mean' averages over classes too, which is not a KL; use 'batchmean')"
                            if reduction == "mean" else ""))
    if bool((input > 1e-6).any()):
        raise ValueError("input must hold log-probabilities (<= 0): pass log_softmax(logits), not logits or probabilities")
    if log_target:
        # log p = -inf is p = 0, whose term is 0; F.kl_div returns NaN there (0 * inf)
        pointwise = torch.where(target == -math.inf, 0.0, target.exp() * (target - input))
    else:
        if bool((target < 0).any()):
            raise ValueError("target must hold probabilities (>= 0); pass log_target=True for log-probabilities")
        pointwise = torch.xlogy(target, target) - target * input
    if reduction == "none":
        return pointwise
    total = pointwise.sum()
    return total / input.shape[0] if reduction == "batchmean" else total


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                      scale_by_t2: bool = True) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(teacher || student) between their softmaxes at
    ``temperature``, averaged over examples (or tokens), times ``T^2`` so that the gradient keeps its
    size as T changes.

    Args:
        student_logits, teacher_logits: (..., V) logits of the same shape; leading dimensions (batch,
            sequence) are all averaged over, so on (B, T, V) this is the mean KL per token (where
            ``F.kl_div(reduction="batchmean")`` would divide by B only).
    Equal to ``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean") * T**2`` on 2-D input.
    """
    check_float_pair(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, V) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.reshape(-1, V).detach() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * temperature ** 2 if scale_by_t2 else kl


def dice_loss(input: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0, from_logits: bool = True,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum p t + s) / (sum p + sum t + s)`` per example and channel, summed over
    every spatial dimension, whatever their number.

    Args:
        input: (B, C, *spatial) logits (or probabilities with ``from_logits=False``).
        target: (B, C, *spatial) masks in [0, 1].
        smooth: s > 0 keeps an empty mask (sum t = 0) predicted empty at a loss of about 0 instead of 0/0.
        reduction: over the (B, C) per-channel losses.
    """
    check_float_pair(input, target)
    check_reduction(reduction)
    _check_binary_target(target)
    if input.ndim < 3:
        raise ValueError(f"input must have shape (B, C, *spatial) with at least one spatial dimension, got {tuple(input.shape)}")
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0 (it keeps empty masks finite), got {smooth}")
    probs = torch.sigmoid(input) if from_logits else input
    dims = tuple(range(2, input.ndim))
    intersection = (probs * target).sum(dims)
    dice = (2 * intersection + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return reduce(1 - dice, reduction)


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.1, symmetric: bool = True) -> torch.Tensor:
    """InfoNCE / NT-Xent on two views (Oord et al. 2018; Chen et al. 2020): row i of ``z1`` and row i of
    ``z2`` are two views of the same example (the positive pair); every other row of the other view is a
    negative.

    Implemented as cross-entropy over cosine-similarity logits ``z1 z2^T / T`` with label i for row i:
    log-sum-exp keeps it finite at any temperature and precision (exp of raw similarities overflows in
    float16 at T = 0.07), and positives are explicit pairs, not neighbours from a ``roll``.

    Args:
        z1, z2: (N, D) embeddings, N >= 2. temperature: T > 0. symmetric: average both directions.
    """
    check_float_pair(z1, z2)
    if z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 must have shape (N, D) with N >= 2, got {tuple(z1.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    logits = a @ b.T / temperature  # (N, N): positives on the diagonal
    labels = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss.to(z1.dtype)


def neighbour_positive_mask(n: int, device=None) -> torch.Tensor:
    """(n, n) bool mask of the source notes' positives: row i marks rows i - 1 and i + 1 (wrapping)."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return eye.roll(1, dims=0) | eye.roll(-1, dims=0)


def neighbour_info_nce_loss(features: torch.Tensor, *, temperature: float = 0.07) -> torch.Tensor:
    """The source notes' contrastive loss, kept to be measured, not to be used: the positives of row i
    are rows i - 1 and i + 1 (a roll of the identity, wrapping around), whatever those rows hold.

    ``-mean_i log(sum_pos exp(s_ij) / sum_{j != i} exp(s_ij))`` with ``s = f f^T / T`` on L2-normalised
    features, computed with log-sum-exp. If the batch interleaves two views, ``[a_0, b_0, a_1, b_1, ...]``,
    one of each row's two positives is the other view of its own example and the other is a view of a
    different example; on a batch of distinct examples both are. Use :func:`info_nce_loss`.

    Args:
        features: (N, D) embeddings, N >= 3.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.ndim != 2 \
            or features.shape[0] < 3:
        raise ValueError(f"features must be a floating tensor of shape (N, D) with N >= 3, got "
                         f"{getattr(features, 'shape', type(features))}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(features, dim=1)
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = neighbour_positive_mask(n, z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, -math.inf)
    log_p = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -torch.logsumexp(log_p.masked_fill(~positive, -math.inf), dim=1).mean()
