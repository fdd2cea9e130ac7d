"""Chapter 5's tools: label-smoothing targets in both conventions, temperature scaling, calibration
summaries, Müller et al.'s penultimate-layer picture, full-batch training of side-by-side networks
through :func:`minigpt.train.train`, and the chapter's setup.

- :func:`smoothed_targets`: the target distribution of either convention, to look at.
- :func:`fit_temperature`: temperature scaling (Guo et al. 2017), one temperature per side-by-side model,
  fitted on a validation split by minimising the NLL.
- :func:`calibration_summary`: accuracy, NLL, ECE (15 bins) and the mean logit norm of a set of logits.
- :func:`template_plane` and :func:`cluster_tightness`: Müller, Kornblith and Hinton (2019), "When does
  label smoothing help?": activations projected on the plane through three class templates, and
  within-class over between-class spread.
- :func:`train_full_batch`: side-by-side networks (``problems=B``) on full batches through
  :func:`minigpt.train.train`.
- :func:`collect_logits`: a language model's logits and targets on fixed evaluation batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SCALES
from .metrics import accuracy, exact_float, expected_calibration_error
from .model import GPTConfig
from .train import EVAL_SEED, TrainConfig, train

CONVENTIONS = ("uniform", "others")


def smoothed_targets(target: torch.Tensor, n_classes: int, epsilon: float, convention: str = "uniform") -> torch.Tensor:
    """The smoothed target distribution of each label, (N,) -> (N, K) float64.

    ``"uniform"`` (PyTorch's ``label_smoothing``): ``(1 - eps) onehot + eps / K``, the true class gets
    ``1 - eps + eps / K``. ``"others"`` (the source notes' code): ``1 - eps`` on the true class and
    ``eps / (K - 1)`` on each other. The two agree when the uniform convention uses ``eps * K / (K - 1)``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    onehot = F.one_hot(target, n_classes).double()
    if convention == "uniform":
        return (1 - epsilon) * onehot + epsilon / n_classes
    return (1 - epsilon) * onehot + epsilon / (n_classes - 1) * (1 - onehot)


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, *, iters: int = 80,
                    bounds: tuple[float, float] = (0.01, 100.0)) -> torch.Tensor:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the mean NLL of
    ``softmax(logits / T)`` on held-out data, one T per model.

    The NLL is convex in ``1 / T`` (a log-sum-exp of functions linear in it), so a golden-section search
    over ``log T`` finds the minimum within ``bounds``; all models are searched at once, without an
    optimizer.

    Args:
        logits: (N, C) or (B, N, C) for B side-by-side models. target: (N,) or (B, N) int64 labels.
        iters: golden-section steps (each shrinks the bracket by 0.618; 80 reach float64 precision).
        bounds: the search range of T.
    Returns:
        () or (B,) float64 temperatures on the CPU. ``softmax(logits / T)`` are the calibrated probabilities.
    """
    if logits.ndim not in (2, 3) or target.shape != logits.shape[:-1] or target.dtype != torch.long:
        raise ValueError(f"logits must be (N, C) or (B, N, C) and target int64 of shape logits.shape[:-1], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)} {target.dtype}")
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    x = exact_float(logits.detach())
    if x.ndim == 2:
        return fit_temperature(logits[None], target[None], iters=iters, bounds=bounds)[0]
    y = target[..., None]

    def nll(log_t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        scaled = x / log_t.exp()[:, None, None]
        return (torch.logsumexp(scaled, -1) - scaled.gather(-1, y).squeeze(-1)).mean(-1)

    B = x.shape[0]
    lo = torch.full((B,), math.log(bounds[0]), dtype=x.dtype, device=x.device)
    hi = torch.full((B,), math.log(bounds[1]), dtype=x.dtype, device=x.device)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        left = fa < fb  # the minimum lies in [lo, b]
        hi, lo = torch.where(left, b, hi), torch.where(left, lo, a)
        a_new = torch.where(left, hi - ratio * (hi - lo), b)
        b_new = torch.where(left, a, lo + ratio * (hi - lo))
        fa_new = torch.where(left, nll(a_new), fb)
        fb_new = torch.where(left, fa, nll(b_new))
        a, b, fa, fb = a_new, b_new, fa_new, fb_new
    return ((lo + hi) / 2).exp().cpu()


def calibration_summary(logits: torch.Tensor, target: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                        n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL (nats per example), ECE with ``n_bins`` equal-width bins, the mean top-class
    confidence and the mean L2 norm of the logit vectors, of ``softmax(logits / temperature)``.

    Args:
        logits: (N, C). target: (N,) int64 labels. temperature: T > 0 (the logit norm is of ``logits / T``).
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    x = exact_float(logits.detach()) / exact_float(torch.as_tensor(temperature))
    probs = x.softmax(-1)
    return {
        "accuracy": accuracy(x, target),
        "nll": F.cross_entropy(x, target).item(),
        "ece": expected_calibration_error(probs, target, n_bins),
        "confidence": probs.max(-1).values.mean().item(),
        "logit_norm": x.norm(dim=-1).mean().item(),
    }


def template_plane(features: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Müller et al.'s picture: coordinates of ``features`` in an orthonormal basis of the plane through
    three class templates (the last layer's weight vectors of three classes), origin at their centroid.

    Args:
        features: (N, D) penultimate-layer activations. templates: (3, D), one template per class.
    Returns:
        (N, 2) coordinates in the plane (the component orthogonal to the plane is dropped).
    """
    if templates.ndim != 2 or templates.shape[0] != 3 or features.ndim != 2 or features.shape[1] != templates.shape[1]:
        raise ValueError(f"templates must be (3, D) and features (N, D) with the same D, got {tuple(templates.shape)} "
                         f"and {tuple(features.shape)}")
    t = exact_float(templates.detach())
    basis, _ = torch.linalg.qr(torch.stack([t[1] - t[0], t[2] - t[0]], dim=1))  # (D, 2) orthonormal
    return (exact_float(features.detach()) - t.mean(0)) @ basis


def cluster_tightness(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-class over between-class spread: the mean squared distance of an example to its class
    mean, divided by the mean squared distance between two class means (over all pairs of classes
    present). Smaller means tighter, better separated clusters; it does not change when the features are
    scaled.

    Args:
        features: (N, D). labels: (N,) int64, at least two classes present.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    x = exact_float(features.detach())
    classes = labels.unique()
    if len(classes) < 2:
        raise ValueError("labels must hold at least two classes")
    means = torch.stack([x[labels == c].mean(0) for c in classes])  # (K, D)
    within = ((x - means[torch.searchsorted(classes, labels)]) ** 2).sum(-1).mean()
    between = torch.pdist(means).pow(2).mean()
    return float(within / between)


def train_full_batch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn, *, steps: int, lr: float,
                     seed: int = 0):
    """Train ``model`` on the full batch ``(X, y)`` for ``steps`` Adam updates through
    :func:`minigpt.train.train`, the learning rate decaying from ``lr`` to 0 along a half cosine.

    For B side-by-side networks (``problems=B``, X of shape (B, N, F)) the objective is the sum over
    networks of each one's mean loss: every weight belongs to one network and Adam's update is
    elementwise, so each follows the trajectory it would follow alone.

    Args:
        loss_fn: ``loss_fn(outputs, y)`` -> per-example losses (N,) or (B, N) (``reduction="none"``).
    Returns:
        :class:`minigpt.train.TrainResult`.
    """

    def get_batch(split, generator):
        return X, y

    def batch_loss(net, batch):
        per_example = loss_fn(net(batch[0]), batch[1])
        if per_example.ndim == 0:
            raise ValueError("loss_fn must return per-example losses (reduction='none'), got a scalar")
        batched = getattr(net, "problems", None) is not None
        return (per_example.flatten(1).mean(1).sum() if batched else per_example.mean()), 1

    config = TrainConfig.adam(steps, lr, seed=seed, min_lr=0.0, progress=False)
    return train(model, get_batch, config, batch_loss=batch_loss)


def fit_side_by_side(loss_fns, X: torch.Tensor, y: torch.Tensor, *, n_classes: int, hidden: int, steps: int,
                     lr: float, seed: int = 0) -> nn.Module:
    """One-hidden-layer networks for C training configurations on S splits, all C x S trained side by side
    (:func:`train_full_batch`), every configuration of a split starting from the same initial weights
    (drawn from ``seed``), so that comparisons between configurations are paired.

    Args:
        loss_fns: C functions ``loss_fn(logits (S, N, K), labels (S, N)) -> (S, N)`` per-example losses.
        X: (S, N, F) inputs, the same for every configuration. y: (C, S, N) int64 labels, one set per
            configuration (noisy labels for some, say), or (S, N) shared by all.
    Returns:
        The :class:`minigpt.small_models.MLP` with ``problems = C * S``: configuration c, split s is
        problem ``c * S + s``; ``net(X.repeat(C, 1, 1)).view(C, S, N, K)`` gives every model's logits.
    """
    from .small_models import MLP

    C, (S, N, F_) = len(loss_fns), X.shape
    if tuple(y.shape) not in ((S, N), (C, S, N)):
        raise ValueError(f"y must have shape ({S}, {N}) or ({C}, {S}, {N}), got {tuple(y.shape)}")
    y = y.expand(C, S, N) if y.ndim == 2 else y
    gen = torch.Generator().manual_seed(seed)
    one = MLP(F_, hidden, n_classes, problems=S, generator=gen, dtype=X.dtype)
    net = MLP(F_, hidden, n_classes, problems=C * S, dtype=X.dtype)
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            getattr(net, name).copy_(getattr(one, name).repeat(C, 1, 1))

    def loss_fn(out, labels):
        out, labels = out.view(C, S, N, -1), labels.view(C, S, N)
        return torch.cat([fn(out[c], labels[c]) for c, fn in enumerate(loss_fns)])

    train_full_batch(net, X.repeat(C, 1, 1), y.reshape(C * S, N), loss_fn, steps=steps, lr=lr, seed=seed)
    return net


def mlp_features(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The penultimate-layer activations ``relu(X @ w1 + b1)`` of a :class:`minigpt.small_models.MLP`
    (problems side by side: X (B, N, F) -> (B, N, hidden)); ``features @ w2 + b2`` are its logits."""
    with torch.no_grad():
        return torch.relu(X @ net.w1 + (net.b1 if net.problems is not None else net.b1[0]))


@torch.no_grad()
def collect_logits(model: nn.Module, get_batch, split: str = "val", iters: int = 20,
                   seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A language model's logits and next-token targets on ``iters`` batches of ``split`` drawn with
    ``seed`` (fixed batches: every model is measured on the same tokens), in eval mode.

    Returns:
        logits (N, V) and targets (N,) on the model's device, N = iters x batch x block.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    all_logits, all_targets = [], []
    for _ in range(iters):
        x, y = get_batch(split, gen)
        logits, _ = model(x)
        all_logits.append(logits.flatten(0, -2))
        all_targets.append(y.flatten())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_targets)


@dataclass(frozen=True)
class LabelSmoothingSetup:
    """Chapter 5. Digits: one-hidden-layer networks, ``n_seeds`` splits side by side, ``mlp_steps``
    full-batch updates. Shakespeare: ``gpt`` trained with ``gpt_train`` (its seed replaced by each run's) per seed and epsilon over
    ``n_gpt_seeds`` seeds, measured on ``gpt_eval_iters`` fixed batches of each half of the validation text."""

    scale: str
    n_seeds: int
    hidden: int
    mlp_steps: int
    mlp_lr: float
    student_hidden: int
    student_labels: int
    gpt: GPTConfig
    gpt_batch: int
    gpt_train: TrainConfig
    n_gpt_seeds: int
    gpt_eval_iters: int
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)


def label_smoothing_setup(scale: str) -> LabelSmoothingSetup:
    """``small``: 5 digit splits, networks of 32 hidden units; a GPT of 2 layers, 64 wide, on blocks of 32,
    200 updates per run, 5 seeds. ``full``: 10 splits, 64 hidden units; nanoGPT's CPU model (0.8M
    parameters), 1,000 updates, 5 seeds."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "small":
        return LabelSmoothingSetup(scale, n_seeds=5, hidden=32, mlp_steps=400, mlp_lr=0.01, student_hidden=16,
                                   student_labels=100, gpt=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64),
                                   gpt_batch=16,
                                   gpt_train=TrainConfig(max_iters=200, learning_rate=3e-3, min_lr=3e-4, warmup_iters=20,
                                                         eval_iters=0), n_gpt_seeds=5, gpt_eval_iters=10)
    return LabelSmoothingSetup(scale, n_seeds=10, hidden=64, mlp_steps=400, mlp_lr=0.01, student_hidden=16,
                               student_labels=100, gpt=GPTConfig(), gpt_batch=32,
                               gpt_train=TrainConfig(max_iters=1000, warmup_iters=100, eval_iters=0), n_gpt_seeds=5,
                               gpt_eval_iters=40)
