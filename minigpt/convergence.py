"""Convergence analysis (chapter 8): small classifiers trained through :func:`minigpt.train.train` on
one or many splits side by side, a diagnosis of a run by its symptoms, the source notes' rules kept to
be scored, and the chapter's setup at each scale.

- :class:`ClassificationTask`: ``get_batch`` and ``batch_loss`` for a classifier on a
  :class:`minigpt.data.TabularSplits` (one split, or B stacked splits for ``MLP(..., problems=B)``),
  with an L1 penalty, the notes' faults on request (a cross-entropy that takes ``log(0)``), and a record
  of every problem's own losses (the History holds their sum).
- :func:`diagnose`: names a run's symptom from ``minigpt.diagnostics``' curve summaries.
- :func:`guide_diagnosis`: the source notes' rules (NaN row of their symptom table, the validation
  slope rule, the capacity rule, the convergence rule), in the order a reader would apply them.
- :func:`guide_l1_penalty`: the notes' L1 line as written (it raises a TypeError) and :func:`l1_penalty`.
- :func:`convergence_setup`: the chapter's settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SCALES
from .diagnostics.lr_range import LRRangeResult
from .diagnostics.curves import convergence_summary, detect_overfitting, running_mean, val_slope_rule
from .model import GPTConfig
from .train import TrainConfig


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of the absolute values of every parameter: ``sum(p.abs().sum() for p in model.parameters())``.
    ``model.parameters()`` is a generator of tensors, so the sum runs over it, one tensor at a time."""
    return sum(p.abs().sum() for p in model.parameters())


def guide_l1_penalty(model: nn.Module, lambda1: float = 1e-4) -> torch.Tensor:
    """The source notes' L1 line as written: ``lambda1 * torch.sum(torch.abs(model.parameters()))``.
    ``torch.abs`` takes a tensor, not a generator, so this raises ``TypeError``; kept to show it."""
    return lambda1 * torch.sum(torch.abs(model.parameters()))


def naive_bce_loss(logits: torch.Tensor, target: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A fault on purpose: one-vs-rest binary cross-entropy written out as
    ``-(y log p + (1 - y) log(1 - p))`` with ``p = sigmoid(logits)`` and one-hot ``y``, computed in
    ``dtype`` (half precision by default, as under mixed precision), per example summed over classes.
    Once a logit exceeds about 7.6 in float16 (16.6 in float32), ``p`` rounds to exactly 1,
    ``log(1 - p)`` is ``-inf`` and ``0 * -inf`` is NaN: the log(0) behind a NaN loss.
    ``F.binary_cross_entropy_with_logits`` computes the same loss stably (and autocast refuses
    ``F.binary_cross_entropy`` for this reason)."""
    p = torch.sigmoid(logits.to(dtype))
    y = F.one_hot(target, logits.shape[-1]).to(dtype)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).to(logits.dtype).sum(-1)


class ClassificationTask:
    """A classifier's data for :func:`minigpt.train.train`: ``task.get_batch`` and ``task.batch_loss``.

    Args:
        X_train, y_train, X_val, y_val: (N, F) and (N,) tensors, or (B, N, F) and (B, N) for B problems
            side by side (a stacked :class:`minigpt.data.TabularSplits`); the model maps X to (..., N, C)
            logits.
        batch_size: training examples per update and problem, drawn without replacement within a batch.
        l1: weight of :func:`l1_penalty` in the objective (per item, so it does not depend on the batch).
        loss: ``"cross_entropy"`` or ``"naive_bce"`` (:func:`naive_bce_loss`, the log(0) fault).

    Training batches are ``("train", indices)``; evaluation batches hold no indices, and in eval mode the
    loss is taken over the whole split (training or validation), so each evaluation needs
    ``eval_iters=1``. Every call records each problem's mean loss (without the penalty) in
    ``records["train"]`` (training mode), ``records["eval_train"]`` or ``records["eval_val"]``.
    """

    def __init__(self, X_train, y_train, X_val, y_val, batch_size: int, *, l1: float = 0.0,
                 loss: str = "cross_entropy"):
        if X_train.dim() not in (2, 3) or X_train.shape[:-1] != y_train.shape:
            raise ValueError(f"X_train must be (N, F) or (B, N, F) with y_train (N,) or (B, N), got "
                             f"{tuple(X_train.shape)} and {tuple(y_train.shape)}")
        if X_val.shape[:-1] != y_val.shape or X_val.dim() != X_train.dim():
            raise ValueError(f"X_val and y_val must match X_train's layout, got {tuple(X_val.shape)}, {tuple(y_val.shape)}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= y_train.shape[-1]:
            raise ValueError(f"batch_size must be an int in [1, {y_train.shape[-1]}], got {batch_size!r}")
        if l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {l1}")
        if loss not in ("cross_entropy", "naive_bce"):
            raise ValueError(f"loss must be 'cross_entropy' or 'naive_bce', got {loss!r}")
        self.X_train, self.y_train, self.X_val, self.y_val = X_train, y_train, X_val, y_val
        self.batch_size, self.l1, self.loss = batch_size, l1, loss
        self.records: dict[str, list[torch.Tensor]] = {"train": [], "eval_train": [], "eval_val": []}

    @property
    def problems(self) -> int | None:
        return self.X_train.shape[0] if self.X_train.dim() == 3 else None

    def get_batch(self, split: str, generator: torch.Generator):
        if split == "val":
            return ("val", None)
        n = self.y_train.shape[-1]
        rows = self.problems or 1
        idx = torch.rand(rows, n, generator=generator).argsort(dim=1)[:, : self.batch_size]
        return ("train", idx if self.problems else idx[0])

    def _per_item(self, logits, y):
        if self.loss == "naive_bce":
            return naive_bce_loss(logits, y)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)

    def batch_loss(self, model: nn.Module, batch):
        split, idx = batch
        X, y = (self.X_val, self.y_val) if split == "val" else (self.X_train, self.y_train)
        if model.training and idx is not None:
            idx = idx.to(X.device)
            if self.problems:
                X = X.gather(1, idx[..., None].expand(-1, -1, X.shape[-1]))
                y = y.gather(1, idx)
            else:
                X, y = X[idx], y[idx]
        per_item = self._per_item(model(X), y)
        n = y.shape[-1]
        key = "train" if model.training else f"eval_{split}"
        self.records[key].append((per_item.detach().sum(-1) / n).reshape(-1).cpu())
        loss_sum = per_item.sum()
        if self.l1:
            loss_sum = loss_sum + self.l1 * n * l1_penalty(model)
        return loss_sum, n

    def curve(self, key: str) -> np.ndarray:
        """``records[key]`` as an array (calls, problems)."""
        rows = self.records[key]
        return torch.stack(rows).double().numpy() if rows else np.empty((0, self.problems or 1))


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy per problem (one entry for a single problem), the model in eval mode."""
    was = model.training
    model.eval()
    correct = (model(X).argmax(-1) == y).double().mean(-1)
    model.train(was)
    return correct.reshape(-1).tolist()


def range_tests(task: ClassificationTask, lrs, diverge_factor: float = 4.0) -> list[LRRangeResult]:
    """One :class:`minigpt.diagnostics.LRRangeResult` per problem from a range test run on all of a
    task's problems side by side (``lr_range_test(..., diverge_factor=large)`` so that it ran to the
    end): each problem's batch losses from ``task.records["train"]``, smoothed and cut at that problem's
    own divergence (:meth:`LRRangeResult.from_losses`)."""
    curve = task.curve("train")
    if len(curve) != len(lrs):
        raise ValueError(f"the task recorded {len(curve)} training batches, but {len(lrs)} rates were given")
    return [LRRangeResult.from_losses(lrs, curve[:, p], diverge_factor=diverge_factor) for p in range(curve.shape[1])]


def suggestions(result: LRRangeResult) -> dict[str, float]:
    """The learning rates the common rules read off a range test: the steepest descent of the smoothed
    loss (torch-lr-finder's suggestion), the minimum divided by 10 and the valley (fastai's)."""
    return {"steepest": result.steepest_lr(), "minimum / 10": result.min_over_ten_lr(),
            "valley": result.valley_lr()}


# ---------------------------------------------------------------------------------------------------
# Diagnosis by symptom

SYMPTOMS = ("non-finite loss", "unstable", "no generalisation", "noisy", "overfitting", "too slow",
            "underfitting", "healthy")


@dataclass
class RunCurves:
    """One run of one problem: per-update training losses, and per-evaluation losses on the whole
    training and validation splits at ``eval_steps``; ``chance`` is the loss of a uniform prediction
    (log K for K classes)."""

    steps: np.ndarray
    train: np.ndarray
    eval_steps: np.ndarray
    eval_train: np.ndarray
    eval_val: np.ndarray
    chance: float


def curves_of(task: ClassificationTask, result, problem: int = 0, chance: float = math.log(10)) -> RunCurves:
    """A :class:`RunCurves` for one problem of a run of ``task`` (records taken since the task was made)."""
    h = result.history
    train = task.curve("train")[:, problem]
    steps = np.arange(1, len(train) + 1)
    k = len(h.eval_step)
    return RunCurves(steps, train, np.asarray(h.eval_step), task.curve("eval_train")[:k, problem],
                     task.curve("eval_val")[:k, problem], chance)


def diagnose(run: RunCurves, *, min_rise: float = 0.05, noise: float = 0.1, slow: float = 0.1,
             underfit: float = 0.25) -> str:
    """Name a run's symptom (one of :data:`SYMPTOMS`) from ``minigpt.diagnostics``' curve summaries; the
    first that matches wins:

    - ``"non-finite loss"``: a NaN or infinite training loss (:func:`convergence_summary` says
      ``"diverged"``);
    - ``"unstable"``: the loss on the whole training set rises, at some evaluation, more than
      ``min_rise`` above its value at initialisation (a run that works never does);
    - ``"no generalisation"``: validation loss never gets ``min_rise`` below chance (``run.chance``):
      nothing learnt carries over to new data (shuffled labels);
    - ``"noisy"``: the per-update loss's residual spread around its trend over the run's last fifth
      (:func:`convergence_summary`'s volatility times its level) exceeds ``noise`` times chance;
    - ``"overfitting"``: :func:`detect_overfitting` (validation up by over ``min_rise`` from its best
      while the training loss kept falling);
    - ``"too slow"``: the last fifth of the evaluations still brought more than a share ``slow`` of the
      whole-training-set loss's fall since initialisation: far from done when the budget ends;
    - ``"underfitting"``: settled, but the training loss ends above ``underfit`` times chance;
    - ``"healthy"`` otherwise.
    """
    if not (np.all(np.isfinite(run.train)) and np.all(np.isfinite(run.eval_train))):
        return "non-finite loss"
    summary = convergence_summary(run.steps, run.train)
    if np.max(run.eval_train[1:]) > run.eval_train[0] + min_rise:
        return "unstable"
    if np.min(run.eval_val) > run.chance - min_rise:
        return "no generalisation"
    if summary.volatility * abs(summary.final) > noise * run.chance:
        return "noisy"
    if detect_overfitting(run.eval_steps, run.eval_train, run.eval_val, min_rise=min_rise).overfitting:
        return "overfitting"
    fifth = max(1, len(run.eval_train) // 5)
    before, last = run.eval_train[-fifth - 1], run.eval_train[-1]
    if before - last > slow * (run.eval_train[0] - last):
        return "too slow"
    if last > underfit * run.chance:
        return "underfitting"
    return "healthy"


def guide_convergence_rule(losses, patience: int = 10) -> str:
    """The notes' ``convergence_analysis``: relative improvement from the first to the last of the last
    ``patience`` losses; below 0.001 "converged", above 0.1 "converging fast", else "converging slowly"
    ("not enough data" for fewer losses). A NaN compares false everywhere and lands in "converging slowly"."""
    losses = list(losses)
    if len(losses) < patience:
        return "not enough data"
    recent = losses[-patience:]
    improvement = (recent[0] - recent[-1]) / recent[0]
    if improvement < 0.001:
        return "converged"
    if improvement > 0.1:
        return "converging fast"
    return "converging slowly"


def guide_capacity_rule(train_acc: float, val_acc: float) -> str:
    """The notes' ``model_capacity_analysis``, thresholds as written."""
    if train_acc > 0.9 and val_acc < 0.7:
        return "overfitting"
    if train_acc < 0.7 and val_acc < 0.7:
        return "underfitting"
    if abs(train_acc - val_acc) < 0.05:
        return "capacity fine"
    return "needs further analysis"


def guide_diagnosis(run: RunCurves, train_acc: float, val_acc: float) -> str:
    """The notes' rules in the order a reader applies them: a NaN loss (their symptom table's first row,
    "gradient explosion / learning rate too high"), then their validation-slope rule ("validation loss
    rising": overfitting), then the capacity rule (over- or underfitting), then the convergence rule on
    the per-evaluation training losses."""
    if not (np.all(np.isfinite(run.train)) and np.all(np.isfinite(run.eval_train))):
        return "NaN: lr too high"
    if val_slope_rule(run.eval_val, window=10):
        return "val rising: overfitting"
    capacity = guide_capacity_rule(train_acc, val_acc)
    if capacity in ("overfitting", "underfitting"):
        return capacity
    return guide_convergence_rule(run.eval_train)


@torch.no_grad()
def guide_landscape(model: nn.Module, evaluate_loss, n: int = 100, scale: float = 0.01,
                    generator: torch.Generator | None = None) -> tuple[np.ndarray, str]:
    """The notes' ``loss_landscape_analysis``: the loss at ``n`` random perturbations that add Gaussian
    noise of standard deviation ``scale`` to every parameter, and its verdict, "rugged" when the losses'
    standard deviation exceeds a tenth of their mean, else "smooth". The weights are restored after."""
    saved = [p.detach().clone() for p in model.parameters()]
    was = model.training
    model.eval()
    losses = []
    try:
        for _ in range(n):
            for p, p0 in zip(model.parameters(), saved):
                p.copy_(p0 + scale * torch.randn(p0.shape, generator=generator, dtype=p0.dtype))
            losses.append(float(evaluate_loss(model)))
    finally:
        for p, p0 in zip(model.parameters(), saved):
            p.copy_(p0)
        model.train(was)
    losses = np.asarray(losses)
    return losses, "rugged" if losses.std() / losses.mean() > 0.1 else "smooth"


@torch.no_grad()
def rescale_relu_mlp(model: nn.Module, c: float) -> nn.Module:
    """A copy of a one-hidden-layer ReLU :class:`minigpt.small_models.MLP` computing the same function with
    the first layer (``w1``, ``b1``) multiplied by ``c > 0`` and ``w2`` divided by it
    (``relu(c z) = c relu(z)``): same predictions, different weight norms."""
    import copy

    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    out = copy.deepcopy(model)
    out.w1.mul_(c)
    out.b1.mul_(c)
    out.w2.div_(c)
    return out


def smoothed(values, window: int = 20) -> np.ndarray:
    """Trailing mean, for plotting per-update curves (:func:`minigpt.diagnostics.running_mean`)."""
    return running_mean(values, window)


# ---------------------------------------------------------------------------------------------------
# The chapter's setup


@dataclass(frozen=True)
class ConvergenceSetup:
    """Chapter 8's settings.

    Digits MLP (``hidden`` units, batch ``batch_size``): ``digits_run`` is the training run every digits
    experiment varies (its ``learning_rate`` and ``optimizer`` replaced per run), ``n_seeds`` splits side
    by side; ``lr_grid`` the learning rates tried around the range test's suggestions (Adam), and
    ``opt_grids`` each optimizer's grid. The character GPT (``gpt``, batch ``gpt_batch``): ``gpt_run`` for
    the learning-rate grid ``gpt_lr_grid`` and the schedules, over ``gpt_seeds`` seeds.
    """

    scale: str
    hidden: int
    batch_size: int
    digits_run: TrainConfig
    lr_grid: tuple[float, ...]
    opt_grids: dict
    range_steps: int
    gpt: GPTConfig
    gpt_batch: int
    gpt_run: TrainConfig
    gpt_lr_grid: tuple[float, ...]
    gpt_range_steps: int
    n_seeds: int = 5
    gpt_seeds: int = 5
    fault_steps: int = 300


def convergence_setup(scale: str) -> ConvergenceSetup:
    """``small``: a 32-unit MLP on digits (batch 32, 300 updates, 5 splits) and a 2-layer, 48-wide
    character GPT (block 32, batch 16, 150 updates, 5 seeds). ``full``: 64 units, 600 updates, 10 splits;
    a 4-layer, 128-wide GPT (block 64, batch 32), 1,000 updates, 5 seeds."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    quiet = dict(progress=False, on_nonfinite="stop")
    k = 1 if scale == "small" else 2
    digits = TrainConfig(max_iters=300 * k, learning_rate=1e-2, min_lr=1e-2, warmup_iters=0, weight_decay=0.0,
                         beta2=0.999, grad_clip=None, eval_interval=10 * k, eval_iters=1, **quiet)
    lr_grid = tuple(float(x) for x in np.logspace(-4, 0, 9))
    opt_grids = {"SGD-momentum": lr_grid[2:], "Adam": lr_grid, "AdamW": lr_grid, "RMSprop": lr_grid}
    if scale == "small":
        gpt, gpt_batch, gpt_steps, gpt_seeds = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4,
                                                         n_embd=48), 16, 150, 5
    else:
        gpt, gpt_batch, gpt_steps, gpt_seeds = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4,
                                                         n_embd=128), 32, 1000, 5
    gpt_run = TrainConfig(max_iters=gpt_steps, learning_rate=1e-3, min_lr=1e-3, warmup_iters=0, weight_decay=0.0,
                          grad_clip=1.0, eval_interval=gpt_steps // 10, eval_iters=4, **quiet)
    return ConvergenceSetup(scale, 32 * k, 32, digits, lr_grid, opt_grids, 100, gpt, gpt_batch, gpt_run,
                            (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), 100, n_seeds=5 * k, gpt_seeds=gpt_seeds,
                            fault_steps=300 * k)
