"""Classification losses with ``torch.nn.functional``'s conventions, computed from logits in log space so
that no probability is ever rounded to 0 or 1 on the way (see the sigmoid-then-BCE failure in
chapter 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import IGNORE_INDEX, check_float_pair, check_floating, check_reduction, check_tensor, reduce


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
        try:
            fits = torch.broadcast_shapes(pw.shape, input.shape) == input.shape
        except RuntimeError:
            fits = False
        if not fits:
            # torch would raise its own broadcasting error, or silently grow the loss to a larger shape
            raise ValueError(f"pos_weight must be a scalar or broadcast to input's shape {tuple(input.shape)} "
                             f"(one weight per class: shape ({input.shape[-1] if input.ndim else 1},)), "
                             f"got shape {tuple(pw.shape)}")
        if bool((pw <= 0).any()) or not bool(torch.isfinite(pw).all()):
            raise ValueError("pos_weight must be > 0 and finite")
        pos = pos * pw
    # select, not multiply: at a logit of +-inf one of the two terms is 0 * inf (NaN) where it should be 0
    pos_term = torch.where(target > 0, target * pos, torch.zeros_like(pos))
    neg_term = torch.where(target < 1, (1 - target) * neg, torch.zeros_like(neg))
    return reduce(pos_term + neg_term, reduction)


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
    check_floating(input, "input")
    check_tensor(target, "target")
    if input.ndim != 2:
        raise ValueError(f"input must be an (N, C) tensor of scores, got shape {tuple(input.shape)}")
    if target.dtype != torch.long or target.shape != input.shape[:1]:
        raise ValueError(f"target must be an int64 tensor of shape ({input.shape[0]},), got dtype {target.dtype} "
                         f"and shape {tuple(target.shape)}")
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
        check_floating(weight, "weight")
        if weight.shape != (C,):
            raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
        loss = loss * weight[target].to(loss.dtype)  # a float64 weight must not promote a float32 loss
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
    if not alpha <= 1:  # written so that NaN is refused too
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


KL_REDUCTIONS = ("batchmean", "sum", "none")


def _check_kl_reduction(reduction: str) -> None:
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}"
                         + (" ('mean' averages over classes too, which is not a KL; use 'batchmean')"
                            if reduction == "mean" else ""))


def _kl_log_target(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pointwise ``exp(target) (target - input)``, 0 where ``target = log p = -inf``.

    Double ``where``: the selected-away branch is computed on a finite stand-in, because autograd
    multiplies its zero gradient by the branch's own derivative, and ``exp(-inf) * (-inf - input)``
    has derivative 0 * inf = NaN with respect to ``target`` (and ``input``, if it is -inf too)."""
    present = target != -math.inf
    safe_target = torch.where(present, target, torch.zeros_like(target))
    safe_input = torch.where(present, input, torch.zeros_like(input))
    return torch.where(present, safe_target.exp() * (safe_target - safe_input), torch.zeros_like(safe_target))


def kl_div(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "batchmean",
           log_target: bool = False) -> torch.Tensor:
    """Kullback-Leibler divergence ``KL(p || q) = sum p (log p - log q)`` with ``F.kl_div``'s argument order:
    ``input`` is the model's **log**-probabilities ``log q``, ``target`` the reference distribution ``p``.

    Terms with ``p = 0`` contribute 0 (``0 log 0 = 0``), with zero gradient, also where ``log q = -inf``
    (``F.kl_div`` gives NaN there, 0 * inf). Pass ``log_target=True`` to give ``log p``; then
    ``log p = -inf`` also contributes 0 with zero gradient in both arguments, where
    ``F.kl_div(log_target=True)`` returns NaN.

    Args:
        input: (N, ..., C) log-probabilities, e.g. ``log_softmax(logits, -1)``; every entry must be <= 0.
        target: same shape, probabilities (>= 0) or, with ``log_target``, log-probabilities.
        reduction: ``"batchmean"`` (sum / N: the KL per example, the true divergence for 2-D input),
            ``"sum"`` or ``"none"``. ``F.kl_div``'s ``"mean"`` divides by the number of *elements* (N x C),
            which is not a KL; it is refused here.
    """
    check_float_pair(input, target)
    _check_kl_reduction(reduction)
    if bool((input > 1e-6).any()):
        raise ValueError("input must hold log-probabilities (<= 0): pass log_softmax(logits), not logits or probabilities")
    if log_target:
        pointwise = _kl_log_target(input, target)
    else:
        if bool((target < 0).any()):
            raise ValueError("target must hold probabilities (>= 0); pass log_target=True for log-probabilities")
        # p = 0 where log q = -inf: 0 * -inf is NaN; the term is 0 (double where, as above)
        present = target > 0
        safe_input = torch.where(present, input, torch.zeros_like(input))
        pointwise = torch.where(present, torch.xlogy(target, target) - target * safe_input,
                                torch.zeros_like(target))
    if reduction == "none":
        return pointwise
    total = pointwise.sum()
    return total / input.shape[0] if reduction == "batchmean" else total


def _leading_temperature(temperature, logits: torch.Tensor) -> torch.Tensor:
    """``temperature`` as a tensor of logits' leading shape (``logits.shape[:-1]``), in logits' dtype."""
    if isinstance(temperature, torch.Tensor):
        T = temperature.to(logits.device)
    else:  # a Python number straight into logits' dtype, not through float32 first
        T = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    lead = logits.shape[:-1]
    if T.ndim == logits.ndim:
        # broadcast against the logits themselves, as in s / T: one temperature per position, not per class
        if T.shape[-1] != 1:
            raise ValueError(f"temperature with as many dimensions as the logits must have size 1 in the last "
                             f"(class) dimension, got shape {tuple(T.shape)}")
        T = T.squeeze(-1)
    try:
        fits = T.ndim <= len(lead) and torch.broadcast_shapes(T.shape, lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"temperature must be a number or a tensor broadcastable to the logits' leading shape "
                         f"{tuple(lead)} (or to the logits, with size 1 in the class dimension), "
                         f"got shape {tuple(T.shape)}")
    if not bool((T > 0).all()) or not bool(torch.isfinite(T).all()):
        raise ValueError(f"temperature must be > 0 and finite everywhere, got "
                         f"{T.min().item() if not bool((T > 0).all()) else T.max().item()}")
    # a float64 temperature must not promote float32 logits
    return T.to(logits.dtype).expand(lead)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float | torch.Tensor = 1.0, scale_by_t2: bool = True,
                      reduction: str = "batchmean") -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(teacher || student) between their softmaxes at
    temperature T, per position, times ``T^2`` so that the gradient keeps its size as T changes.

    .. math::
        \\ell = T^2 \\sum_v p_v (\\log p_v - \\log q_v), \\quad
        p = \\mathrm{softmax}(t / T), \\ q = \\mathrm{softmax}(s / T)

    Args:
        student_logits, teacher_logits: (..., V) logits of the same shape; the leading dimensions
            (batch, sequence, problem) are positions. No gradient flows to ``teacher_logits``.
        temperature: T > 0, a number or a tensor: broadcastable to the leading shape (e.g. (N,) per
            example, or (P, 1) per problem for (P, N, V) logits), or with the logits' number of
            dimensions and size 1 in the last, broadcastable to the logits (e.g. (P, 1, 1)).
        scale_by_t2: multiply each position's KL by its own ``T^2`` before reducing.
        reduction: ``"batchmean"`` (the mean over all leading positions: on (B, T, V) the mean KL per
            token, where ``F.kl_div(reduction="batchmean")`` would divide by B only), ``"sum"``, or
            ``"none"`` (per position, the leading shape).

    Equal to ``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean") * T**2`` on 2-D input
    with a number T; with ``reduction="none"`` and ``scale_by_t2=False`` it is
    ``F.kl_div(log_softmax(s / T, -1), log_softmax(t / T, -1), reduction="none", log_target=True).sum(-1)``.
    """
    check_float_pair(student_logits, teacher_logits, names=("student_logits", "teacher_logits"))
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a class dimension (..., V)")
    _check_kl_reduction(reduction)
    T = _leading_temperature(temperature, student_logits)  # (...,) leading shape
    log_q = F.log_softmax(student_logits / T[..., None], dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / T[..., None], dim=-1)
    kl = _kl_log_target(log_q, log_p).sum(dim=-1)  # (...,) per position
    if scale_by_t2:
        kl = kl * T ** 2
    if reduction == "none":
        return kl
    return kl.mean() if reduction == "batchmean" else kl.sum()


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
    if not from_logits and bool(((input < 0) | (input > 1)).any()):
        raise ValueError("input must hold probabilities in [0, 1] with from_logits=False (pass logits with "
                         "from_logits=True)")
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

    Computed in the inputs' precision (float64 stays float64); float16 and bfloat16 are computed in
    float32 and the loss returned in their dtype.
    """
    check_float_pair(z1, z2, names=("z1", "z2"))
    if z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 must have shape (N, D) with N >= 2, got {tuple(z1.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_dtype = torch.promote_types(z1.dtype, z2.dtype)
    dtype = _compute_dtype(out_dtype)
    a, b = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
    logits = a @ b.T / temperature  # (N, N): positives on the diagonal
    labels = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss.to(out_dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision overflows exp(1 / T) and rounds similarities to 3 digits: compute those in float32;
    # float32 and float64 keep their own precision
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    z = F.normalize(features.to(_compute_dtype(features.dtype)), dim=1)
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = neighbour_positive_mask(n, z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, -math.inf)
    log_p = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -torch.logsumexp(log_p.masked_fill(~positive, -math.inf), dim=1).mean().to(features.dtype)


def _check_class_targets(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N, C) logits and (N,) int64 labels in [0, C) or ``ignore_index``; returns the kept mask (N,)."""
    check_floating(input, "input")
    check_tensor(target, "target")
    if input.ndim != 2:
        raise ValueError(f"input must be an (N, C) tensor of logits, got shape {tuple(input.shape)}")
    if target.dtype != torch.long or target.shape != input.shape[:1]:
        raise ValueError(f"target must be an int64 tensor of shape ({input.shape[0]},), got dtype {target.dtype} "
                         f"and shape {tuple(target.shape)}")
    kept = target != ignore_index
    if bool(((target[kept] < 0) | (target[kept] >= input.shape[1])).any()):
        raise ValueError(f"target holds labels outside [0, {input.shape[1]}) that are not ignore_index ({ignore_index})")
    return kept


def _reduce_kept(loss: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    if reduction == "mean":
        if not bool(kept.any()):
            raise ValueError("every target is ignore_index: the mean is undefined")
        return loss.sum() / kept.sum()
    return loss.sum() if reduction == "sum" else loss


def confidence_penalty_loss(input: torch.Tensor, target: torch.Tensor, *, beta: float = 0.1,
                            ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy minus ``beta`` times the entropy of the prediction (Pereyra et al. 2017, "Regularizing
    neural networks by penalizing confident output distributions"):

    .. math::
        \\ell_i = -\\log p_{i y_i} - \\beta\\, H(p_i), \\quad H(p) = -\\sum_c p_c \\log p_c,
        \\quad p_i = \\mathrm{softmax}(x_i)

    Label smoothing pulls the prediction towards the uniform distribution through the target,
    ``KL(u || p)``; the confidence penalty pushes through the prediction's own entropy, ``-H(p)`` (up to a
    constant, ``KL(p || u)``), so its push is strongest where the prediction is most peaked.

    Args:
        input: (N, C) logits. target: (N,) int64 labels; ``ignore_index`` marks rows without a loss.
        beta: weight of the entropy term, >= 0 (0 gives cross-entropy).
        reduction: ``"mean"`` over the kept rows, ``"sum"``, or ``"none"`` ((N,), 0 at ignored rows).
    """
    check_reduction(reduction)
    kept = _check_class_targets(input, target, ignore_index)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    log_p = F.log_softmax(input, dim=-1)
    nll = -log_p.gather(1, torch.where(kept, target, 0)[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return _reduce_kept(nll - beta * entropy, kept, reduction)


def adaptive_label_smoothing_loss(input: torch.Tensor, target: torch.Tensor, *, base_smoothing: float = 0.1,
                                  min_smoothing: float = 0.01, ignore_index: int = IGNORE_INDEX,
                                  reduction: str = "mean") -> torch.Tensor:
    """The source notes' "adaptive" label smoothing, kept to be measured: each example's epsilon is
    ``max(base * (1 - p_y), min_smoothing)`` with ``p_y`` the model's own (detached) probability of the
    true class, and the target puts ``1 - eps`` on the true class and ``eps / (C - 1)`` on each other
    (the notes' convention, ``smoothing_convention="others"`` of :func:`minigpt.losses.cross_entropy`).

    .. math::
        \\varepsilon_i = \\max(b\\,(1 - \\mathrm{sg}[p_{i y_i}]),\\ \\varepsilon_{\\min}), \\quad
        \\ell_i = -(1 - \\varepsilon_i) \\log p_{i y_i} - \\frac{\\varepsilon_i}{C - 1}\\sum_{c \\ne y_i} \\log p_{ic}

    It smooths least where the model is already most confident in the true class: the opposite of what a
    fix for over-confidence needs (chapter 5 measures what it does to calibration).

    Args:
        input: (N, C) logits, C >= 2. target: (N,) int64 labels; ``ignore_index`` marks rows without a loss.
        base_smoothing: b in [0, 1]. min_smoothing: floor of epsilon, in [0, 1].
        reduction: ``"mean"`` over the kept rows, ``"sum"``, or ``"none"`` ((N,), 0 at ignored rows).
    """
    check_reduction(reduction)
    kept = _check_class_targets(input, target, ignore_index)
    C = input.shape[1]
    if C < 2:
        raise ValueError("input must have at least 2 classes to smooth over")
    for name, value in (("base_smoothing", base_smoothing), ("min_smoothing", min_smoothing)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    log_p = F.log_softmax(input, dim=-1)
    y = torch.where(kept, target, 0)[:, None]
    log_p_true = log_p.gather(1, y).squeeze(1)
    eps = torch.clamp(base_smoothing * (1 - log_p_true.detach().exp()), min=min_smoothing)
    log_p_others = log_p.sum(dim=-1) - log_p_true
    loss = -(1 - eps) * log_p_true - eps / (C - 1) * log_p_others
    return _reduce_kept(loss, kept, reduction)
