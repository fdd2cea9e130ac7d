"""Finding wrong labels: examples the model confidently assigns to another class.

The source notes flag an example when the model's top probability exceeds 0.9 and its top class differs
from the label, using the model that was trained on those very labels. A model that fits its training
set has learnt the wrong labels too, so on its own training data it is rarely confidently wrong about
them. The scores must be out-of-sample: each example scored by a model that never saw it
(:func:`out_of_fold_logits`). A fixed 0.9 also ignores that classes differ in how confident the model is
about them; ``threshold="per_class"`` uses confident learning's per-class thresholds (Northcutt, Jiang,
Chuang 2021): the mean predicted probability of class ``k`` over the examples labelled ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def _probabilities(logits) -> np.ndarray:
    x = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits.detach().cpu())
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2 classes, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("logits must be finite")
    return torch.softmax(x.double(), dim=1).numpy()


def _labels(labels, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}], got values from {y.min()} to {y.max()}")
    return y.astype(np.int64)


@dataclass
class SuspectLabels:
    """Examples flagged as possibly mislabelled, most confident first: ``indices`` into the data, the
    ``given`` label, the ``suggested`` class, the model's ``confidence`` in it and its probability of the
    given label (``given_prob``)."""

    indices: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    confidence: np.ndarray
    given_prob: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def precision_recall(self, truly_wrong) -> tuple[float, float]:
        """Against the indices known to be mislabelled (when noise was injected on purpose): the share of
        flagged examples that are wrong, and the share of wrong examples that were flagged."""
        truth = set(int(i) for i in np.asarray(truly_wrong).ravel())
        flagged = set(int(i) for i in self.indices)
        hits = len(truth & flagged)
        precision = hits / len(flagged) if flagged else float("nan")
        recall = hits / len(truth) if truth else float("nan")
        return precision, recall


def confident_wrong(logits, labels, threshold: float | str = 0.9) -> SuspectLabels:
    """Flag examples whose predicted class differs from the label with high confidence.

    Args:
        logits: (N, C) scores, out-of-sample (see :func:`out_of_fold_logits`).
        labels: (N,) integer labels in [0, C).
        threshold: a probability in (0, 1): flag when the top class is not the label and its probability
            exceeds it (the notes' rule, default 0.9). Or ``"per_class"``: flag when some class ``k`` other
            than the label reaches its own threshold ``t_k``, the mean probability of ``k`` among examples
            labelled ``k``; the suggested class is the likeliest such ``k``.
    """
    p = _probabilities(logits)
    n, c = p.shape
    y = _labels(labels, n, c)
    if threshold == "per_class":
        t = np.array([p[y == k, k].mean() if np.any(y == k) else 1.0 for k in range(c)])
        above = p >= t[None, :]
        above[np.arange(n), y] = False
        masked = np.where(above, p, -1.0)
        suggested = masked.argmax(axis=1)
        flagged = above.any(axis=1)
    elif isinstance(threshold, (int, float)) and 0 < threshold < 1:
        suggested = p.argmax(axis=1)
        flagged = (p.max(axis=1) > threshold) & (suggested != y)
    else:
        raise ValueError(f"threshold must be a probability in (0, 1) or 'per_class', got {threshold!r}")
    idx = np.nonzero(flagged)[0]
    conf = p[idx, suggested[idx]]
    order = np.argsort(-conf, kind="stable")
    idx = idx[order]
    return SuspectLabels(idx, y[idx], suggested[idx], p[idx, suggested[idx]], p[idx, y[idx]])


def out_of_fold_logits(fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], X, y, *,
                       n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-sample scores for every example: split the data into ``n_folds`` folds (shuffled with
    ``seed``), fit on all folds but one and score the held-out fold.

    Args:
        fit_predict: ``fit_predict(X_train, y_train, X_test) -> (n_test, C) logits`` (or log-probabilities).
        X: (N, ...) features; y: (N,) integer labels.
    Returns:
        (N, C) array, row ``i`` from the model that did not see example ``i``.
    """
    X, y = np.asarray(X), np.asarray(y)
    n = len(y)
    if len(X) != n:
        raise ValueError(f"X and y must have the same number of examples, got {len(X)} and {n}")
    if not isinstance(n_folds, int) or not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be an int in [2, {n}], got {n_folds!r}")
    order = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(order, n_folds)
    out = None
    for held in folds:
        train = np.setdiff1d(order, held)
        scores = np.asarray(fit_predict(X[train], y[train], X[held]), dtype=float)
        if scores.ndim != 2 or len(scores) != len(held):
            raise ValueError(f"fit_predict must return ({len(held)}, C) scores for the held-out fold, "
                             f"got shape {scores.shape}")
        if out is None:
            out = np.empty((n, scores.shape[1]))
        out[held] = scores
    return out
