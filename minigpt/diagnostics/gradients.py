"""Inside a model: per-parameter gradient and weight statistics, loss components over time, and a text
report that flags what deserves a look.

The source notes sketch such a toolkit (``analyze_gradients``, ``analyze_parameter_distributions``,
``generate_diagnostic_report``) without code. This one measures rather than judges: every flag states the
number it saw and the rule that raised it, and the rules compare a layer with the model's own other
layers instead of with absolute thresholds that depend on the model and the loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


@dataclass
class GradientStats:
    """Gradient of one parameter tensor after a backward pass (before clipping or the optimizer step).

    ``norm`` is the L2 norm (NaN when the parameter got no gradient); ``rms`` is norm / sqrt(numel), which
    compares tensors of different sizes; ``ratio`` is gradient norm over weight norm, the relative size of
    a plain SGD step per unit learning rate.
    """

    name: str
    shape: tuple[int, ...]
    has_grad: bool  # False: the parameter took no part in the loss (unused or frozen)
    norm: float
    rms: float
    abs_max: float
    zero_fraction: float  # share of entries whose gradient is exactly 0
    nonfinite: int  # number of NaN or infinite entries
    weight_norm: float

    @property
    def ratio(self) -> float:
        return self.norm / self.weight_norm if self.weight_norm > 0 else math.inf


@torch.no_grad()
def gradient_stats(model: nn.Module) -> list[GradientStats]:
    """One :class:`GradientStats` per parameter tensor, in the model's order (a tied weight appears once).
    Call it after ``loss.backward()``, or pass it to :func:`minigpt.train.train` through
    :class:`GradientRecorder`."""
    out = []
    for name, p in model.named_parameters():
        w_norm = float(p.detach().float().norm())
        g = p.grad
        if g is None:
            out.append(GradientStats(name, tuple(p.shape), False, math.nan, math.nan, math.nan, math.nan, 0, w_norm))
            continue
        g = g.detach().float()
        finite = torch.isfinite(g)
        nonfinite = int((~finite).sum())
        # the norm is taken as is, so a NaN anywhere shows as a NaN norm rather than being hidden
        norm = float(g.norm())
        out.append(GradientStats(
            name, tuple(p.shape), True, norm, norm / math.sqrt(max(g.numel(), 1)),
            float(g.abs().max()) if g.numel() else 0.0, float((g == 0).float().mean()) if g.numel() else 0.0,
            nonfinite, w_norm,
        ))
    return out


@dataclass
class ParameterStats:
    """Distribution of one parameter tensor's values."""

    name: str
    shape: tuple[int, ...]
    numel: int
    mean: float
    std: float
    abs_max: float
    norm: float
    zero_fraction: float
    nonfinite: int
    quantiles: dict[float, float]  # e.g. {0.01: ..., 0.5: ..., 0.99: ...}


@torch.no_grad()
def parameter_stats(model: nn.Module, quantiles=QUANTILES) -> list[ParameterStats]:
    """One :class:`ParameterStats` per parameter tensor: mean, standard deviation, largest magnitude, L2
    norm, share of exact zeros, non-finite count and the requested quantiles of the values."""
    qs = tuple(float(q) for q in quantiles)
    if any(not 0 <= q <= 1 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {qs}")
    out = []
    for name, p in model.named_parameters():
        v = p.detach().double().flatten().cpu()
        n = v.numel()
        finite = v[torch.isfinite(v)]
        q_values = np.quantile(finite.numpy(), qs) if finite.numel() else np.full(len(qs), math.nan)
        out.append(ParameterStats(
            name, tuple(p.shape), n, float(v.mean()) if n else math.nan,
            float(v.std(unbiased=False)) if n else math.nan, float(v.abs().max()) if n else 0.0,
            float(v.norm()), float((v == 0).double().mean()) if n else 0.0, n - finite.numel(),
            {q: float(x) for q, x in zip(qs, q_values)},
        ))
    return out


def group_name(name: str, depth: int = 3) -> str:
    """The first ``depth`` dot-separated parts of a parameter name: ``transformer.h.2.attn.c_attn.weight``
    belongs to ``transformer.h.2`` at depth 3."""
    return ".".join(name.split(".")[:depth])


def group_norms(stats, depth: int = 3) -> dict[str, float]:
    """Combined L2 norm per group of parameters (see :func:`group_name`), from
    :class:`GradientStats` (gradient norms) or :class:`ParameterStats` (weight norms):
    ``sqrt(sum of squared norms)``, so the groups combine to the global norm. Parameters without a
    gradient are left out."""
    sq: dict[str, float] = defaultdict(float)
    for s in stats:
        if isinstance(s, GradientStats) and not s.has_grad:
            continue
        sq[group_name(s.name, depth)] += s.norm ** 2
    return {k: math.sqrt(v) for k, v in sq.items()}


@dataclass
class GradientRecorder:
    """A ``grad_hook`` for :func:`minigpt.train.train` that keeps every parameter's gradient norm (before
    clipping) every ``every`` updates.

    After training, ``steps[i]`` is the update and ``norms[name][i]`` the norm of that parameter's
    gradient; ``total[i]`` is the global norm (what ``History.grad_norm`` records).
    """

    every: int = 1
    steps: list[int] = field(default_factory=list)
    norms: dict[str, list[float]] = field(default_factory=dict)
    total: list[float] = field(default_factory=list)
    first: list[GradientStats] = field(default_factory=list)  # full statistics at the first call (before any update)
    last: list[GradientStats] = field(default_factory=list)  # the full statistics of the last recorded step

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive int, got {self.every!r}")

    def __call__(self, step: int, model: nn.Module) -> None:
        if not self.first:  # the first call is kept whatever ``every`` says: the weights before any update
            self.first = gradient_stats(model)
        if step % self.every:
            return
        stats = gradient_stats(model)
        self.steps.append(step)
        for s in stats:
            self.norms.setdefault(s.name, []).append(s.norm)
        self.total.append(math.sqrt(sum(s.norm ** 2 for s in stats if s.has_grad)))
        self.last = stats

    def group_series(self, depth: int = 3) -> dict[str, np.ndarray]:
        """Per group of parameters (see :func:`group_name`), the combined gradient norm at each recorded
        step."""
        sq: dict[str, np.ndarray] = {}
        for name, series in self.norms.items():
            arr = np.nan_to_num(np.asarray(series, dtype=float), nan=0.0) ** 2
            key = group_name(name, depth)
            sq[key] = sq.get(key, 0.0) + arr
        return {k: np.sqrt(v) for k, v in sq.items()}


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a loss component must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach())
    return float(value)


@dataclass
class ComponentSummary:
    """One loss component over the last ``window`` recorded steps."""

    last: float
    mean: float  # over the window
    share: float  # mean / sum of the components' means (of the tracked values, weighted or not)
    slope: float  # least-squares slope over the window, per step


@dataclass
class LossTracker:
    """Records the parts of a composite loss (reconstruction, KL, each task...) step by step, so that a
    run shows which part moves, which stalls and which dominates the total.

    ``update(step, recon=..., kl=...)`` takes floats or scalar tensors (detached, so no graph is kept).
    Record the values as they enter the total (after weighting) if shares of the total are what you want.
    """

    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def update(self, step: int, **components) -> None:
        if not components:
            raise ValueError("update needs at least one named component, e.g. update(step, recon=r, kl=k)")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step must increase, got {step} after {self.steps[-1]}")
        if self.values and set(components) != set(self.values):
            raise ValueError(f"components must be the same at every step: expected {sorted(self.values)}, "
                             f"got {sorted(components)}")
        self.steps.append(int(step))
        for name, value in components.items():
            self.values.setdefault(name, []).append(_as_float(value))

    def summary(self, window: int = 50) -> dict[str, ComponentSummary]:
        if not self.steps:
            raise ValueError("nothing recorded yet")
        if window < 1:
            raise ValueError(f"window must be a positive int, got {window}")
        steps = np.asarray(self.steps[-window:], dtype=float)
        means = {k: float(np.mean(v[-window:])) for k, v in self.values.items()}
        total = sum(means.values())
        out = {}
        for name, series in self.values.items():
            tail = np.asarray(series[-window:], dtype=float)
            slope = float(np.polyfit(steps, tail, 1)[0]) if len(tail) >= 2 else math.nan
            out[name] = ComponentSummary(tail[-1], means[name], means[name] / total if total else math.nan, slope)
        return out


def _flag_ratios(grads: list[GradientStats], factor: float) -> list[str]:
    # Matrices only: a LayerNorm gain starts at 1 and a bias at 0, so their gradient/weight ratios live on
    # other scales than a weight matrix's, and comparing them flags healthy models.
    ratios = [(g.name, g.ratio) for g in grads
              if g.has_grad and len(g.shape) >= 2 and math.isfinite(g.ratio) and g.weight_norm > 0]
    positive = [r for _, r in ratios if r > 0]
    if len(positive) < 3:  # with two, the median cannot tell which one is the odd one
        return []
    median = float(np.median(positive))
    flags = []
    for name, r in ratios:
        if r > median * factor:
            flags.append(f"{name}: gradient/weight ratio {r:.2e} is over {factor:g}x the median {median:.2e}")
        elif 0 < r < median / factor:
            flags.append(f"{name}: gradient/weight ratio {r:.2e} is under 1/{factor:g} of the median {median:.2e}")
    return flags


def _flag_growth(reference: list[GradientStats], now: list[GradientStats], factor: float) -> list[str]:
    start = {g.name: g.weight_norm for g in reference}
    flags = []
    for g in now:
        w0 = start.get(g.name)
        if len(g.shape) >= 2 and w0 and math.isfinite(g.weight_norm) and g.weight_norm > factor * w0:
            flags.append(f"{g.name}: weight norm {g.weight_norm:.3g} is {g.weight_norm / w0:.1f}x its "
                         f"{w0:.3g} at the reference step (over {factor:g}x: steps too large for the weights)")
    return flags


def _flag_history(history) -> tuple[list[str], list[str]]:
    result = history
    history = getattr(result, "history", result)
    losses = list(history.loss)
    stop = getattr(result, "stop_reason", None)
    lines, flags = [], []
    if losses:
        lines.append(f"Training: {len(losses)} updates, loss {losses[0]:.4g} -> {losses[-1]:.4g}, gradient norm "
                     f"{history.grad_norm[0]:.3g} -> {history.grad_norm[-1]:.3g}" + (f", stopped: {stop}" if stop else ""))
    else:
        lines.append("Training: no update taken" + (f", stopped: {stop}" if stop else ""))
    if stop is not None and stop.startswith("non-finite"):
        flags.append(f"training stopped on a non-finite loss or gradient ({stop})")
    elif len(losses) > 1 and losses[-1] > losses[0]:
        flags.append(f"training loss rose from {losses[0]:.4g} to {losses[-1]:.4g}")
    elif not losses:
        flags.append("training: no update was taken")
    return lines, flags


def diagnostic_report(model: nn.Module | None = None, *, gradients: list[GradientStats] | None = None,
                      parameters: list[ParameterStats] | None = None, losses: LossTracker | None = None,
                      history=None, reference: list[GradientStats] | None = None, window: int = 50,
                      ratio_factor: float = 100.0, growth_factor: float = 5.0,
                      latent: tuple[torch.Tensor, torch.Tensor] | None = None) -> str:
    """A readable text report of gradients, weights, loss components and a training run, with flags.

    Pass a model (its current gradients and weights are measured) or precomputed statistics; for a run,
    a :class:`GradientRecorder`'s ``last`` as ``gradients`` and its ``first`` as ``reference``, and the
    :class:`minigpt.train.TrainResult` (or its ``History``) as ``history``. Flags:

    - a gradient or weight with NaN or infinite entries;
    - a parameter with no gradient (not used in the loss, or frozen), or an all-zero gradient;
    - a weight matrix whose gradient/weight ratio is more than ``ratio_factor`` times above or below the
      median over the model's matrices (a layer learning far faster or slower than the rest);
    - a weight matrix whose norm grew more than ``growth_factor`` times since ``reference`` (updates too
      large for the weights: the learning rate, usually);
    - a run that stopped on a non-finite loss or gradient, or whose training loss ended above its start;
    - a loss component that is non-finite, or that holds more than 90% of the tracked total;
    - with ``latent=(mu, logvar)``, a VAE's posteriors (N, D) over held-out inputs: posterior collapse, no
      active latent dimension or a total KL under 0.1 nats (:func:`minigpt.diagnostics.posterior_collapse`).
    """
    if model is not None:
        gradients = gradient_stats(model) if gradients is None else gradients
        parameters = parameter_stats(model) if parameters is None else parameters
    if gradients is None and parameters is None and losses is None and history is None and latent is None:
        raise ValueError("diagnostic_report needs a model, or gradients, parameters, losses, history or latent")
    if reference is not None and gradients is None:
        raise ValueError("reference needs gradients (statistics of the same run at a later step) to compare with")
    if not growth_factor > 1:
        raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
    lines: list[str] = []
    flags: list[str] = []
    if history is not None:
        history_lines, history_flags = _flag_history(history)
        lines.extend(history_lines)
        flags.extend(history_flags)
    if gradients is not None:
        total = math.sqrt(sum(g.norm ** 2 for g in gradients if g.has_grad))
        lines.append(f"Gradients: {len(gradients)} tensors, global L2 norm {total:.3e}")
        width = max(len(g.name) for g in gradients)
        lines.append(f"  {'parameter':<{width}}  {'shape':<14} {'grad norm':>10} {'grad rms':>10} "
                     f"{'|g|/|w|':>10} {'zeros':>7}")
        for g in gradients:
            shape = "x".join(map(str, g.shape)) or "scalar"
            if not g.has_grad:
                lines.append(f"  {g.name:<{width}}  {shape:<14} {'none':>10}")
                flags.append(f"{g.name}: no gradient (not used in the loss, or frozen)")
                continue
            lines.append(f"  {g.name:<{width}}  {shape:<14} {g.norm:>10.3e} {g.rms:>10.3e} {g.ratio:>10.3e} "
                         f"{g.zero_fraction:>7.1%}")
            if g.nonfinite:
                flags.append(f"{g.name}: {g.nonfinite} non-finite gradient entries")
            elif g.zero_fraction == 1.0:
                flags.append(f"{g.name}: gradient exactly zero everywhere")
        flags.extend(_flag_ratios(gradients, ratio_factor))
        if reference is not None:
            flags.extend(_flag_growth(reference, gradients, growth_factor))
    if parameters is not None:
        lines.append(f"Parameters: {sum(p.numel for p in parameters):,} values in {len(parameters)} tensors")
        width = max(len(p.name) for p in parameters)
        lines.append(f"  {'parameter':<{width}}  {'mean':>10} {'std':>10} {'|max|':>10} {'p01':>10} {'p99':>10}")
        for p in parameters:
            q = p.quantiles
            lo, hi = q.get(0.01, math.nan), q.get(0.99, math.nan)
            lines.append(f"  {p.name:<{width}}  {p.mean:>10.3e} {p.std:>10.3e} {p.abs_max:>10.3e} "
                         f"{lo:>10.3e} {hi:>10.3e}")
            if p.nonfinite:
                flags.append(f"{p.name}: {p.nonfinite} non-finite weights")
    if losses is not None and losses.steps:
        summary = losses.summary(window)
        n = min(window, len(losses.steps))
        lines.append(f"Loss components: last {n} of {len(losses.steps)} recorded steps (up to step {losses.steps[-1]})")
        width = max(len(k) for k in summary)
        lines.append(f"  {'component':<{width}}  {'last':>10} {'mean':>10} {'share':>7} {'slope/step':>11}")
        for name, c in summary.items():
            lines.append(f"  {name:<{width}}  {c.last:>10.4g} {c.mean:>10.4g} {c.share:>7.1%} {c.slope:>11.3e}")
            if not math.isfinite(c.last):
                flags.append(f"loss component {name}: last value {c.last}")
            elif len(summary) > 1 and c.share > 0.9:
                flags.append(f"loss component {name}: {c.share:.1%} of the tracked total, the others barely count")
    if latent is not None:
        from .latent import posterior_collapse

        check = posterior_collapse(*latent)
        lines.extend(check.lines())
        flags.extend(check.flags())
    lines.append("Flags:" if flags else "Flags: none")
    lines.extend(f"  - {f}" for f in flags)
    return "\n".join(lines)
