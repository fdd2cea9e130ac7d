"""Evaluation metrics: accuracy, F1, PR-AUC, calibration (ECE and reliability diagrams), the
coverage of prediction intervals, and how a training curve settles (``settling_step``, ``rise_ratio``).
Inputs are tensors on any one device (CPU, CUDA, MPS); results are Python floats, except
``dice_score``'s per-example tensor and the curve measures' per-curve tensors, which stay on the inputs'
device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def exact_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float64, for counts and sums that should not round; as float32 on Apple MPS, which has
    no float64. Stays on ``t``'s device."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _check_labels(name: str, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.bool):
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")


def accuracy(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Share of correct predictions. ``prediction``: (N,) labels, or (N, C) scores (logits or
    probabilities) whose argmax is the label; ``target``: (N,) labels."""
    _check_labels("target", target)
    if prediction.ndim == 2:
        prediction = prediction.argmax(dim=1)
    _check_labels("prediction", prediction)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction must have {len(target)} rows like target, got {tuple(prediction.shape)}")
    return (prediction == target).float().mean().item()


def f1_score(prediction: torch.Tensor, target: torch.Tensor, *, average: str = "binary",
             positive: int = 1) -> float:
    """F1, the harmonic mean of precision and recall. ``average="binary"``: of class ``positive``;
    ``"macro"``: the unweighted mean over the classes present in target or prediction. A class with no
    true positives has F1 0 (also when it has no predictions), as in scikit-learn with
    ``zero_division=0``. ``prediction``, ``target``: (N,) labels."""
    _check_labels("prediction", prediction)
    _check_labels("target", target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction must have the shape of target {tuple(target.shape)}, got {tuple(prediction.shape)}")

    def f1_of(c: int) -> float:
        predicted, actual = prediction == c, target == c
        # one read-back per class, not three
        tp, fp, fn = torch.stack([(predicted & actual).sum(), (predicted & ~actual).sum(),
                                  (~predicted & actual).sum()]).tolist()
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if average == "binary":
        return f1_of(positive)
    if average == "macro":
        classes = torch.unique(torch.cat([prediction, target])).tolist()
        return sum(f1_of(c) for c in classes) / len(classes)
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


def pr_auc(score: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the precision-recall curve as average precision, ``sum_n (R_n - R_{n-1}) P_n`` over
    the distinct score thresholds (tied scores form one threshold), as ``sklearn.metrics.
    average_precision_score``. ``score``: (N,) higher means more likely positive; ``target``: (N,) 0/1.
    Unlike ROC-AUC it reflects how rare the positive class is: a random scorer gets the positive share."""
    _check_labels("target", target)
    if not isinstance(score, torch.Tensor) or score.shape != target.shape:
        raise ValueError(f"score must be a tensor of shape {tuple(target.shape)}")
    if not bool(((target == 0) | (target == 1)).all()):
        raise ValueError("target must hold 0/1 labels")
    n_pos = int(target.sum())
    if n_pos == 0:
        raise ValueError("target has no positive example: precision-recall is undefined")
    score = exact_float(score)
    order = torch.argsort(score, descending=True, stable=True)
    s, t = score[order], exact_float(target[order])
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]  # evaluate at the end of each run of tied scores
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision, recall = tp / (tp + fp), tp / n_pos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


@dataclass
class ReliabilityDiagram:
    """Per confidence bin (equal width over [0, 1]): how many predictions, their mean top-label
    confidence and their accuracy. Empty bins hold NaN confidence and accuracy."""

    edges: list[float]
    count: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def ece(self) -> float:
        n = sum(self.count)
        return sum(c / n * abs(a - f) for c, a, f in zip(self.count, self.accuracy, self.confidence) if c)


def reliability_diagram(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin top-label confidences into ``n_bins`` equal-width bins ``((m-1)/M, m/M]`` (Guo et al. 2017).

    Args:
        probs: (N, C) class probabilities (each row sums to 1; apply softmax to logits first).
        target: (N,) labels.
    """
    _check_labels("target", target)
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or len(probs) != len(target):
        raise ValueError(f"probs must have shape (N, C) with N = {len(target)}, got "
                         f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p = exact_float(probs.detach())
    if bool(((p < 0) | (p > 1)).any()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise ValueError("probs must be probabilities in [0, 1] whose rows sum to 1 (apply softmax to logits)")
    confidence, predicted = p.max(dim=1)
    correct = exact_float(predicted == target)
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    # read the (n_bins,) sums back to the host once, not once per bin
    count, conf_sum, acc_sum = count.tolist(), conf_sum.tolist(), acc_sum.tolist()
    nan = float("nan")
    return ReliabilityDiagram(
        edges=[m / n_bins for m in range(n_bins + 1)],
        count=count,
        confidence=[cs / c if c else nan for cs, c in zip(conf_sum, count)],
        accuracy=[a / c if c else nan for a, c in zip(acc_sum, count)],
    )


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` over ``n_bins`` equal-width
    bins of top-label confidence. 0 is perfectly calibrated; the unit is a probability."""
    return reliability_diagram(probs, target, n_bins).ece


def interval_coverage(lower: torch.Tensor, upper: torch.Tensor, target: torch.Tensor) -> float:
    """Share of targets inside their prediction interval ``[lower, upper]`` (all of shape (N,)). An
    80% interval from the 0.1 and 0.9 quantiles should cover about 0.8 of new targets."""
    for name, t in (("lower", lower), ("upper", upper)):
        if not isinstance(t, torch.Tensor) or t.shape != target.shape:
            raise ValueError(f"{name} must be a tensor of the shape of target {tuple(target.shape)}")
    return exact_float((target >= lower) & (target <= upper)).mean().item()


def quantile_crossing_rate(predictions: torch.Tensor) -> float:
    """Share of rows of ``predictions`` (N, Q), ordered by increasing quantile level, whose predicted
    quantiles are not in non-decreasing order: predictions that contradict themselves."""
    if not isinstance(predictions, torch.Tensor) or predictions.ndim != 2 or predictions.shape[1] < 2:
        raise ValueError("predictions must be a tensor of shape (N, Q) with Q >= 2")
    crossed = (torch.diff(predictions, dim=1) < 0).any(dim=1)
    return exact_float(crossed).mean().item()


def dice_score(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example Dice coefficient ``2 |P and T| / (|P| + |T|)`` of binary masks of shape (N, ...), summed
    over every non-batch dimension; an example where both masks are empty scores 1 (a perfect
    "nothing here"). Returns (N,) float64 (float32 on MPS) on the masks' device."""
    if not isinstance(prediction, torch.Tensor) or prediction.shape != target.shape or prediction.dim() < 2:
        raise ValueError(f"prediction must be a tensor of the shape of target {tuple(target.shape)}, with a batch dimension")
    for name, t in (("prediction", prediction), ("target", target)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold a binary mask (0/1)")
    p, t = exact_float(prediction.flatten(1)), exact_float(target.flatten(1))
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * (p * t).sum(1) / total.clamp_min(1), torch.ones_like(total))


def retrieval_accuracy(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of queries whose most cosine-similar key is their own (row i of ``keys`` belongs to row i of
    ``queries``), both of shape (N, D): top-1 retrieval of an example's other view among N candidates."""
    if not isinstance(queries, torch.Tensor) or queries.shape != keys.shape or queries.dim() != 2:
        raise ValueError(f"queries and keys must be tensors of one shape (N, D), got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    q = torch.nn.functional.normalize(exact_float(queries), dim=1)
    k = torch.nn.functional.normalize(exact_float(keys), dim=1)
    return exact_float((q @ k.T).argmax(1) == torch.arange(len(q), device=q.device)).mean().item()


def _check_curves(curves: torch.Tensor) -> None:
    if not isinstance(curves, torch.Tensor) or curves.dim() < 1 or curves.shape[-1] < 2:
        raise ValueError(f"curves must be a tensor (..., T + 1) of values at steps 0 to T, T >= 1, got "
                         f"{tuple(curves.shape) if isinstance(curves, torch.Tensor) else type(curves).__name__}")


def settling_step(curves: torch.Tensor, rtol: float) -> torch.Tensor:
    """The step from which a curve stays within a relative tolerance of its final value: the smallest ``t``
    with ``|c_s - c_T| <= rtol * |c_T|`` for every ``s >= t``. A curve that first touches the band and then
    leaves it again settles only when it comes back for good.

    Args:
        curves: (..., T + 1) values at steps 0 to T (e.g. training RMSE before each update and after the
            last, as :func:`minigpt.small_models.fit_full_batch`'s callback records it).
        rtol: the tolerance, a fraction of the final value (0.01: within 1%).

    Returns:
        (...) settling steps, float64 (float32 on MPS), between 0 and T.
    """
    _check_curves(curves)
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    c = exact_float(curves)
    final = c[..., -1:]
    outside = (c - final).abs() > rtol * final.abs()
    steps = outside.shape[-1]
    last_outside = steps - 1 - exact_float(outside.flip(-1)).argmax(-1)  # the last step outside the band
    return torch.where(outside.any(-1), last_outside + 1, torch.zeros_like(last_outside))


def rise_ratio(curves: torch.Tensor) -> torch.Tensor:
    """How far a falling curve goes back up on its way down: the sum of its rises (positive step-to-step
    changes) over its net fall ``c_0 - c_T``. 0 for a curve that never rises; 0.5 when it climbs back half
    as much as it falls in all. Scale-free, so curves of different quantities (or losses of different
    scales) compare.

    Args:
        curves: (..., T + 1) values at steps 0 to T, each ending below its start.

    Returns:
        (...) ratios, float64 (float32 on MPS).
    """
    _check_curves(curves)
    c = exact_float(curves)
    fall = c[..., 0] - c[..., -1]
    if not bool((fall > 0).all()):
        raise ValueError("every curve must end below its start (a net fall), for its rises to be measured against it")
    return torch.diff(c, dim=-1).clamp(min=0).sum(-1) / fall
