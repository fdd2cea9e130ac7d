"""Chapter 7's multi-task model: two views of a digit fused by a learned gate, trained on three tasks.

The model is the one source note 000 describes, built small enough to train many variants side by side:

- two encoders, one per view: ``h_a = relu(x_a W_a + b_a)``, ``h_b = relu(x_b W_b + b_b)``, (N, H) each;
- a gate per hidden unit, ``g = sigmoid([h_a, h_b] W_g + b_g)``, and the fused representation
  ``h = g * h_a + (1 - g) * h_b``;
- three heads: class logits ``h W_c + b_c``; a projection ``z = h_v W_p`` of each view's encoding for the
  contrastive loss; a decoder ``D(h) = h W_d + b_d`` back to both views' pixels.

Its losses, per problem (see :func:`task_losses`):

- classification: cross-entropy of the logits (or softmax focal loss, ``focal_gamma > 0``);
- contrastive: InfoNCE between the two views' projections (:func:`batched_info_nce`, which equals
  :func:`minigpt.losses.info_nce_loss`, symmetric, temperature 0.1);
- encoder (the note's "fusion reconstruction"): ``global + inter + c_gate * gate_reg`` with
  ``global = l(D(h), x)`` (both views from the fused representation), ``inter = (l(D(h_a), x) +
  l(D(h_b), x)) / 2`` (both views from each view alone) and ``gate_reg = mean((g - 0.5)^2)``; ``l`` is MSE
  or SmoothL1 (beta 1) over pixels.

``problems=P`` side by side: every weight has a leading dimension P, and problem p is initialised from
its own seed, so variants that share a seed start from the same weights and (see :func:`digit_halves`
and :func:`train_fusion`) see the same batches: their differences are paired.

Everything trains through :func:`minigpt.train.train`; :func:`train_fusion` supplies its ``batch_loss``
(the weighted total of every problem) and ``grad_hook`` (gradient statistics, PCGrad, evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from . import multitask as mt
from .config import SCALES
from .train import TrainConfig, train

TASKS = ("classification", "contrastive", "encoder")
# The note's weights: cls + 0.2 contrastive + 0.05 encoder. Every weighting method is scaled to their sum.
NOTE_WEIGHTS = (1.0, 0.2, 0.05)
WEIGHT_TOTAL = sum(NOTE_WEIGHTS)
LOSS_ONLY_METHODS = ("fixed", "equal", "uncertainty (exact)", "uncertainty (common)", "DWA", "random (RLW)",
                     "difficulty-adaptive", "performance-based", "1/(1+std)")
GRADIENT_METHODS = ("PCGrad", "gradient balance", "GradNorm")
METHODS = LOSS_ONLY_METHODS + GRADIENT_METHODS
SATURATED = 0.05  # a gate below 0.05 or above 0.95 is saturated: sigmoid' < 0.048, a fifth of its peak


# --- setup and data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionSetup:
    """Chapter 7's settings. ``n_seeds`` seeds for the note's variants, ``n_method_seeds`` for each
    weighting method; every run is ``steps`` Adam updates at ``lr`` on batches of ``batch_size``,
    evaluated on the validation split every ``eval_every`` updates. ``target_f1`` is the validation macro
    F1 whose first crossing counts as convergence. ``lr_factors``: the learning rates (times ``lr``) tried
    for equal weights."""

    scale: str
    n_seeds: int
    n_method_seeds: int
    hidden: int = 32
    proj_dim: int = 16
    batch_size: int = 64
    steps: int = 300
    lr: float = 3e-3
    eval_every: int = 5
    target_f1: float = 0.9
    gate_coef: float = 0.01
    temperature: float = 0.1
    lr_factors: tuple = (1 / 3, 1.0, 3.0, 10.0)


def fusion_setup(scale: str) -> FusionSetup:
    """``small``: 10 seeds for the note's variants, 5 per weighting method, 300 updates. ``full``: 20 and
    10 seeds, a wider network (64 units), 600 updates."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "small":
        return FusionSetup(scale, n_seeds=10, n_method_seeds=5)
    return FusionSetup(scale, n_seeds=20, n_method_seeds=10, hidden=64, steps=600)


@dataclass
class DigitHalves:
    """The left and right halves of scikit-learn's 8x8 digits as two views, one stratified split per seed,
    stacked: ``a[split]`` and ``b[split]`` are (S, N, 32) standardized pixels (columns 0-3 and 4-7),
    ``y[split]`` (S, N) labels, for ``split`` in train, val, test."""

    seeds: list
    a: dict
    b: dict
    y: dict

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def whole(self, split: str) -> torch.Tensor:
        """(S, N, 64) both views side by side: the decoder's target (the halves, not the image's pixel order)."""
        return torch.cat([self.a[split], self.b[split]], dim=-1)


def digit_halves(seeds, dtype=torch.float32) -> DigitHalves:
    """One split of the digits per seed (60/20/20, stratified, standardized on the training split), each
    image cut into its left and right halves."""
    from .data import load_digits, load_stacked

    data = load_stacked(load_digits, list(seeds), dtype=dtype)
    a, b, y = {}, {}, {}
    for split in ("train", "val", "test"):
        pixels = getattr(data, f"X_{split}").unflatten(-1, (8, 8))  # (S, N, row, column)
        a[split] = pixels[..., :4].flatten(-2).contiguous()
        b[split] = pixels[..., 4:].flatten(-2).contiguous()
        y[split] = getattr(data, f"y_{split}")
    return DigitHalves(list(seeds), a, b, y)


# --- the model ---------------------------------------------------------------------------------------


@dataclass
class FusionOutput:
    """What :class:`GatedFusionNet` computes, each with a leading problem dimension P: ``logits``
    (P, N, C); ``h_a``, ``h_b``, ``gate``, ``fused`` (P, N, H); ``z_a``, ``z_b`` (P, N, D) projections;
    ``recon``, ``recon_a``, ``recon_b`` (P, N, 2V) both views decoded from the fused, the first and the
    second view's encoding."""

    logits: torch.Tensor
    h_a: torch.Tensor
    h_b: torch.Tensor
    gate: torch.Tensor
    fused: torch.Tensor
    z_a: torch.Tensor
    z_b: torch.Tensor
    recon: torch.Tensor
    recon_a: torch.Tensor
    recon_b: torch.Tensor


class GatedFusionNet(nn.Module):
    """Two views, two encoders, a per-unit gate that mixes them, and three heads (see the module's
    docstring), for ``len(seeds)`` problems side by side. Problem p's weights are drawn as ``nn.Linear``
    draws them (uniform in ``+-1/sqrt(fan_in)``) from a generator seeded with ``seeds[p]``.

    Args:
        seeds: one seed per problem (P of them).
        view_dim: V, features per view. hidden: H. n_classes: C. proj_dim: D.
    """

    ENCODERS = ("w_a", "b_a", "w_b", "b_b")  # the layers every task's gradient reaches

    def __init__(self, seeds, view_dim: int = 32, hidden: int = 32, n_classes: int = 10, proj_dim: int = 16):
        super().__init__()
        seeds = list(seeds)
        if not seeds or min(view_dim, hidden, n_classes, proj_dim) < 1:
            raise ValueError(f"need at least one seed and positive sizes, got {len(seeds)} seeds and "
                             f"{view_dim}, {hidden}, {n_classes}, {proj_dim}")
        self.problems, self.view_dim, self.hidden = len(seeds), view_dim, hidden
        shapes = {"w_a": (view_dim, hidden), "b_a": (1, hidden), "w_b": (view_dim, hidden), "b_b": (1, hidden),
                  "w_g": (2 * hidden, hidden), "b_g": (1, hidden), "w_c": (hidden, n_classes), "b_c": (1, n_classes),
                  "w_p": (hidden, proj_dim), "w_d": (hidden, 2 * view_dim), "b_d": (1, 2 * view_dim)}
        fan_in = {"w_a": view_dim, "b_a": view_dim, "w_b": view_dim, "b_b": view_dim, "w_g": 2 * hidden,
                  "b_g": 2 * hidden}
        draws = {name: [] for name in shapes}
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            for name, shape in shapes.items():
                bound = 1 / math.sqrt(fan_in.get(name, hidden))
                draws[name].append((torch.rand(*shape, generator=gen) * 2 - 1) * bound)
        for name, values in draws.items():
            setattr(self, name, nn.Parameter(torch.stack(values)))

    def no_weight_decay(self) -> set[str]:
        """The biases, (P, 1, H) each: vectors per problem, never decayed (see ``train.decay_groups``)."""
        return {name for name, _ in self.named_parameters() if name.startswith("b_")}

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.ENCODERS]

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> FusionOutput:
        """``xa``, ``xb``: (P, N, V) the two views of N examples for each problem."""
        for name, x in (("xa", xa), ("xb", xb)):
            if x.dim() != 3 or x.shape[0] != self.problems or x.shape[-1] != self.view_dim:
                raise ValueError(f"{name} must have shape ({self.problems}, N, {self.view_dim}), got {tuple(x.shape)}")
        h_a = torch.relu(torch.baddbmm(self.b_a, xa, self.w_a))  # (P, N, H)
        h_b = torch.relu(torch.baddbmm(self.b_b, xb, self.w_b))
        gate = torch.sigmoid(torch.baddbmm(self.b_g, torch.cat([h_a, h_b], -1), self.w_g))
        fused = gate * h_a + (1 - gate) * h_b
        N = xa.shape[1]
        recon = torch.baddbmm(self.b_d, torch.cat([fused, h_a, h_b], 1), self.w_d)  # (P, 3N, 2V), one product
        return FusionOutput(torch.baddbmm(self.b_c, fused, self.w_c), h_a, h_b, gate, fused,
                            h_a @ self.w_p, h_b @ self.w_p, recon[:, :N], recon[:, N:2 * N], recon[:, 2 * N:])


def batched_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE of P problems at once: (P, N, D) and (P, N, D) -> (P,), each equal to
    ``minigpt.losses.info_nce_loss(z1[p], z2[p], temperature=temperature)``: cross-entropy over cosine
    similarities, positives on the diagonal (row i of each view is the same example)."""
    if z1.shape != z2.shape or z1.dim() != 3 or z1.shape[1] < 2:
        raise ValueError(f"z1 and z2 must have the same shape (P, N, D) with N >= 2, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    P, N, _ = z1.shape
    logits = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).transpose(1, 2) / temperature  # (P, N, N)
    labels = torch.arange(N, device=z1.device).repeat(P)
    one = F.cross_entropy(logits.reshape(P * N, N), labels, reduction="none").view(P, N).mean(1)
    other = F.cross_entropy(logits.transpose(1, 2).reshape(P * N, N), labels, reduction="none").view(P, N).mean(1)
    return (one + other) / 2


def _huber_scale(smooth_l1: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) bool -> (P,) delta and scale with ``scale * huber(r, delta)`` = SmoothL1 (beta 1: delta 1,
    scale 1) or MSE (delta beyond any residual, scale 2: ``2 * r^2 / 2``)."""
    one = torch.ones(smooth_l1.shape, dtype=dtype, device=smooth_l1.device)
    return torch.where(smooth_l1, one, 1e6 * one), torch.where(smooth_l1, one, 2 * one)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, smooth_l1: torch.Tensor) -> torch.Tensor:
    """(P, N, F) reconstructions and targets -> (P,) mean over N and F of MSE, or SmoothL1 (beta 1) where
    the (P,) bool ``smooth_l1`` is set. One Huber expression serves both, so P problems with either loss
    cost one pass (equal to :func:`minigpt.losses.mse_loss` and :func:`minigpt.losses.smooth_l1_loss`)."""
    delta, scale = (t[:, None, None] for t in _huber_scale(smooth_l1, recon.dtype))
    a = (recon - target).abs()
    q = torch.minimum(a, delta)
    return (scale * (0.5 * q * q + delta * (a - q))).flatten(1).mean(1)


def recon_gradient(recon: torch.Tensor, target: torch.Tensor, smooth_l1: torch.Tensor) -> torch.Tensor:
    """The per-element gradient of :func:`reconstruction_loss` (up to the 1/(N F) of the mean) with respect
    to the reconstruction: ``2 r`` for MSE, ``clamp(r, -1, 1)`` for SmoothL1, ``r = recon - target``."""
    r = recon - target
    return torch.where(smooth_l1[:, None, None], r.clamp(-1, 1), 2 * r)


@dataclass(frozen=True)
class Variant:
    """One configuration of the note's loss: weights on the three tasks (the classification weight is 1),
    the reconstruction loss, the gate regulariser's coefficient, the focal exponent (0: cross-entropy),
    and the weighting method (``"fixed"`` uses the weights as they are; see :data:`METHODS`)."""

    name: str
    encoder_weight: float = 0.05
    contrastive_weight: float = 0.2
    recon: str = "mse"
    gate_reg: float = 0.0
    focal_gamma: float = 0.0
    method: str = "fixed"

    def __post_init__(self):
        if self.recon not in ("mse", "smooth_l1"):
            raise ValueError(f"recon must be 'mse' or 'smooth_l1', got {self.recon!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if min(self.encoder_weight, self.contrastive_weight, self.gate_reg, self.focal_gamma) < 0:
            raise ValueError("weights, gate_reg and focal_gamma must be >= 0")


def task_losses(out: FusionOutput, xa: torch.Tensor, xb: torch.Tensor, y: torch.Tensor, *, smooth_l1: torch.Tensor,
                gate_coef: torch.Tensor, focal_gamma: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """(P, 3) losses: classification, contrastive and encoder (see the module's docstring) of each problem.

    ``smooth_l1`` (P,) bool; ``gate_coef`` and ``focal_gamma`` (P,) floats (a focal exponent of 0 is
    cross-entropy, computed as such)."""
    P, N, C = out.logits.shape
    flat, target = out.logits.reshape(P * N, C), y.reshape(P * N)
    # torch's cross-entropy, not minigpt's lean one: GradNorm differentiates through its gradient
    cls = F.cross_entropy(flat, target, reduction="none").view(P, N).mean(1)
    for g in sorted(set(focal_gamma[focal_gamma > 0].tolist())):  # each focal exponent in one call
        rows = torch.nonzero(focal_gamma == g).flatten()
        focal = losses.softmax_focal_loss(out.logits[rows].flatten(0, 1), y[rows].flatten(), gamma=g,
                                          reduction="none").view(len(rows), N).mean(1)
        cls = cls.index_put((rows,), focal)
    con = batched_info_nce(out.z_a, out.z_b, temperature)
    x = torch.cat([xa, xb], dim=-1)
    N = x.shape[1]
    both = reconstruction_loss(torch.cat([out.recon_a, out.recon_b], 1), x.repeat(1, 2, 1), smooth_l1)
    glob, inter = reconstruction_loss(out.recon, x, smooth_l1), both  # inter: the mean of both views' losses
    gate_reg = (out.gate - 0.5).pow(2).flatten(1).mean(1)
    return torch.stack([cls, con, glob + inter + gate_coef * gate_reg], dim=1)


def macro_f1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(P, N, C) scores and (P, N) labels -> (P,) macro F1 of each problem, over the classes present in its
    target or prediction (:func:`minigpt.metrics.f1_score` with ``average="macro"``, P at once)."""
    C = logits.shape[-1]
    pred = F.one_hot(logits.argmax(-1), C).bool()
    true = F.one_hot(target, C).bool()
    tp, fp, fn = ((pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1))  # (P, C)
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp, dtype=torch.float))
    present = (pred | true).any(1)
    return (f1 * present).sum(1) / present.sum(1)


# --- training ----------------------------------------------------------------------------------------


@dataclass
class FusionRun:
    """What :func:`train_fusion` recorded, for V variants x S seeds (problem p = v S + s).

    Per evaluation (``eval_steps``, E of them, the first at step 0): ``f1``, ``val_ce`` (the main task's
    validation cross-entropy) and ``saturated`` (share of validation gates below 0.05 or above 0.95), each
    (V, S, E). Per update (T of them): ``losses`` and ``weights`` (V, S, T, 3), the task losses on the
    batch and the weights that multiplied them; ``encoder_grad`` (V, S, T), the gradient norm reaching the
    encoders. At the end: ``test_f1`` (V, S) and ``outlier_share`` (V, S), the share of the reconstruction
    gradient (L1 mass over validation pixels) from pixels more than 3 standard deviations from their mean.
    Optional: ``cosines`` (V, S, E, 3) between task gradients on the encoders (pairs cls-con, cls-enc,
    con-enc) and ``task_grad_norms`` (V, S, E, 3), the norm on the encoders of each weighted term
    ``w_k * grad L_k`` of the update (classification, contrastive, encoder; see :meth:`gradient_shares`),
    both recorded with ``track_conflict``; ``pcgrad_changed`` (V, S, T) whether PCGrad changed the update. ``seconds_per_step``: wall
    time of one update of all problems."""

    variants: list
    seeds: list
    eval_steps: list
    f1: torch.Tensor
    val_ce: torch.Tensor
    saturated: torch.Tensor
    losses: torch.Tensor
    weights: torch.Tensor
    encoder_grad: torch.Tensor
    test_f1: torch.Tensor
    outlier_share: torch.Tensor
    seconds_per_step: float
    cosines: torch.Tensor | None = None
    pcgrad_changed: torch.Tensor | None = None
    task_grad_norms: torch.Tensor | None = None

    def index(self, name: str) -> int:
        names = [v.name for v in self.variants]
        if name not in names:
            raise KeyError(f"no variant {name!r}; variants: {names}")
        return names.index(name)

    def steps_to_target(self, target: float) -> torch.Tensor:
        """(V, S) first evaluated step with validation F1 >= ``target``; ``nan`` where never reached."""
        reached = self.f1 >= target
        steps = torch.tensor(self.eval_steps, dtype=torch.float64)
        first = reached.double().argmax(-1)
        return torch.where(reached.any(-1), steps[first], torch.full_like(first, float("nan"), dtype=torch.float64))

    def volatility(self, start_fraction: float = 0.2, window: int = 5) -> torch.Tensor:
        """(V, S) root-mean-square deviation of the validation cross-entropy curve from its centred moving
        average over ``window`` evaluations, from ``start_fraction`` of training on: the wobble of the main
        task's curve around its trend."""
        curve = self.val_ce.double()
        kernel = torch.full((1, 1, window), 1.0 / window, dtype=torch.float64)
        trend = F.conv1d(curve.flatten(0, 1)[:, None], kernel).view(*curve.shape[:2], -1)
        half = window // 2
        start = max(half, int(start_fraction * curve.shape[-1]))
        stop = curve.shape[-1] - half
        dev = curve[..., start:stop] - trend[..., start - half:stop - half]
        return dev.pow(2).mean(-1).sqrt()

    def gradient_shares(self) -> torch.Tensor:
        """(V, S, E, 3) each task's share of the gradient on the shared encoders at every tracked
        evaluation: ``|w_k grad L_k| / sum_j |w_j grad L_j|`` (norms over all encoder weights), in the order
        of :data:`TASKS`. A term dominates when its share exceeds one half; the shares sum to 1. Needs a
        run with ``track_conflict``."""
        if self.task_grad_norms is None:
            raise ValueError("no task gradient norms recorded: train with track_conflict=True")
        norms = self.task_grad_norms.double()
        return norms / norms.sum(-1, keepdim=True)

    def grad_variation(self, start_fraction: float = 0.2) -> torch.Tensor:
        """(V, S) coefficient of variation (std / mean) of the encoders' gradient norm over the updates
        from ``start_fraction`` of training on: lower is steadier."""
        g = self.encoder_grad.double()[..., int(start_fraction * self.encoder_grad.shape[-1]):]
        return g.std(-1) / g.mean(-1)


class _Trainee(nn.Module):
    """The network and the learned weightings (uncertainty, GradNorm), so that train's optimizer sees both."""

    def __init__(self, net: GatedFusionNet, weightings: nn.ModuleDict):
        super().__init__()
        self.net, self.weightings = net, weightings


def _scheme(method: str, seed: int):
    if method == "uncertainty (exact)" or method == "uncertainty (common)":
        return mt.UncertaintyWeighting(["classification", "classification", "regression"],
                                       form="exact" if "exact" in method else "common")
    if method == "DWA":
        return mt.DynamicWeightAverage(3)
    if method == "random (RLW)":
        return mt.RandomLossWeighting(3, generator=torch.Generator().manual_seed(seed))
    if method == "difficulty-adaptive":
        return mt.DifficultyAdaptiveWeights()
    if method == "performance-based":
        return mt.PerformanceBasedWeights(3)
    if method == "1/(1+std)":
        return mt.InverseStdWeights(3)
    if method == "GradNorm":
        return mt.GradNorm(3)
    return None


def train_fusion(variants, data: DigitHalves, setup: FusionSetup, *, lr: float | None = None,
                 track_conflict: bool = False, device=None) -> FusionRun:
    """Train every variant at every seed of ``data`` side by side, through :func:`minigpt.train.train`.

    All problems see the same batch indices at a seed (drawn per seed by train's generator) and start from
    that seed's weights. Weighting methods other than ``"fixed"`` and the uncertainty forms are scaled so
    that the weights sum to :data:`WEIGHT_TOTAL`, the note's sum (matched effective learning rate); the
    uncertainty forms learn their own scale. ``"PCGrad"`` combines equal weights' task gradients on the
    encoders by PCGrad; ``"gradient balance"`` weights each task by mean(G) / G_k of its gradient norm on
    the encoders; both need three extra backward passes per update. ``"GradNorm"`` must be the only variant
    (its weights' gradient needs the shared weight of one problem): its problems then run one seed at a time.

    Args:
        variants: :class:`Variant` s (V of them). data: the views, S seeds. setup: sizes, steps, lr.
        lr: overrides ``setup.lr``. track_conflict: record the cosines between task gradients on the
            encoders at every evaluation (three extra backward passes then).
    """
    variants = list(variants)
    if not variants:
        raise ValueError("variants must not be empty")
    if any(v.method == "GradNorm" for v in variants):
        if len(variants) != 1:
            raise ValueError("GradNorm must be the only variant of a run")
        runs = [_train(variants, _subset(data, [i]), setup, lr, track_conflict, device)
                for i in range(data.n_seeds)]
        return _concat_seeds(runs, data.seeds)
    return _train(variants, data, setup, lr, track_conflict, device)


def _subset(data: DigitHalves, idx) -> DigitHalves:
    pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
    return DigitHalves([data.seeds[i] for i in idx], pick(data.a), pick(data.b), pick(data.y))


def _concat_seeds(runs, seeds) -> FusionRun:
    """Runs of one seed each -> one run over all their seeds (per-update costs add up)."""
    def cat(name):
        parts = [getattr(r, name) for r in runs]
        return None if parts[0] is None else torch.cat(parts, 1)

    names = ("f1", "val_ce", "saturated", "losses", "weights", "encoder_grad", "test_f1", "outlier_share")
    return FusionRun(runs[0].variants, list(seeds), runs[0].eval_steps, *(cat(n) for n in names),
                     seconds_per_step=sum(r.seconds_per_step for r in runs), cosines=cat("cosines"),
                     pcgrad_changed=cat("pcgrad_changed"), task_grad_norms=cat("task_grad_norms"))


@dataclass
class _Log:
    losses: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    encoder_grad: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    f1: list = field(default_factory=list)
    val_ce: list = field(default_factory=list)
    saturated: list = field(default_factory=list)
    cosines: list = field(default_factory=list)
    task_grad_norms: list = field(default_factory=list)
    pcgrad_changed: list = field(default_factory=list)


def _cosines(grads) -> torch.Tensor:
    """Three (P, D) task gradients -> (P, 3) cosines of the pairs (0, 1), (0, 2), (1, 2)."""
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=1, eps=1e-30)
                        for i, j in ((0, 1), (0, 2), (1, 2))], dim=1)


def _train(variants, data: DigitHalves, setup: FusionSetup, lr, track_conflict, device) -> FusionRun:
    device = torch.device(device or "cpu")
    V, S = len(variants), data.n_seeds
    P = V * S
    seed_of = torch.arange(P) % S  # problem p = v S + s
    per = lambda attr, dtype=torch.float32: torch.tensor([getattr(variants[p // S], attr) for p in range(P)],  # noqa: E731
                                                         dtype=dtype, device=device)
    smooth = torch.tensor([variants[p // S].recon == "smooth_l1" for p in range(P)], device=device)
    gate_coef, gamma = per("gate_reg"), per("focal_gamma")
    methods = [variants[p // S].method for p in range(P)]
    fixed = torch.tensor([[1.0, v.contrastive_weight, v.encoder_weight] for v in variants for _ in range(S)],
                         device=device)
    net = GatedFusionNet([data.seeds[s] for s in seed_of.tolist()], 32, setup.hidden, 10, setup.proj_dim)
    schemes = {p: _scheme(m, data.seeds[p % S]) for p, m in enumerate(methods)}
    # uncertainty weights learn with the network (train's optimizer); GradNorm's weights have their own
    learned = nn.ModuleDict({str(p): s for p, s in schemes.items() if isinstance(s, mt.UncertaintyWeighting)})
    plain_rows = torch.tensor([p for p in range(P) if str(p) not in learned], dtype=torch.long, device=device)
    trainee = _Trainee(net, learned).to(device)
    views = {k: {split: t.to(device) for split, t in d.items()} for k, d in (("a", data.a), ("b", data.b), ("y", data.y))}
    n_train = views["y"]["train"].shape[1]
    epoch_steps = math.ceil(n_train / setup.batch_size)
    needs_grads = [p for p, m in enumerate(methods) if m in ("PCGrad", "gradient balance")]
    log, state = _Log(), {"step": 0, "epoch": [], "pcgrad": None}

    def expand(t):  # (S, ...) -> (P, ...)
        return t[seed_of.to(t.device)]

    def get_batch(split, generator):
        idx = torch.randint(0, n_train, (S, setup.batch_size), generator=generator).to(device)
        pick = lambda t: torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1])) if t.dim() == 3 \
            else torch.gather(t, 1, idx)  # noqa: E731
        return tuple(expand(pick(views[k][split])) for k in ("a", "b", "y"))

    def evaluate(split):
        with torch.no_grad():
            xa, xb, y = (expand(views[k][split]) for k in ("a", "b", "y"))
            out = net(xa, xb)
            ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none").view(P, -1).mean(1)
            sat = ((out.gate < SATURATED) | (out.gate > 1 - SATURATED)).float().flatten(1).mean(1)
            return out, macro_f1(out.logits, y), ce, sat, xa, xb

    def record_eval(step):
        _, f1, ce, sat, _, _ = evaluate("val")
        log.eval_steps.append(step)
        log.f1.append(f1.cpu()), log.val_ce.append(ce.cpu()), log.saturated.append(sat.cpu())

    def task_grads(L):
        shared = net.encoder_parameters()
        grads = [torch.autograd.grad(L[:, k].sum(), shared, retain_graph=True) for k in range(3)]
        return [torch.cat([g.flatten(1) for g in gs], dim=1) for gs in grads]  # 3 x (P, D)

    def batch_loss(model, batch):
        xa, xb, y = batch
        out = net(xa, xb)
        L = task_losses(out, xa, xb, y, smooth_l1=smooth, gate_coef=gate_coef, focal_gamma=gamma,
                        temperature=setup.temperature)
        W = fixed.clone()
        grads = task_grads(L) if needs_grads or (track_conflict and state["step"] % setup.eval_every == 0) else None
        if track_conflict and grads is not None:
            log.cosines.append(_cosines(grads).detach().cpu())
        totals = []
        for p, m in enumerate(methods):
            if m == "fixed":
                continue
            Lp = L[p]
            scheme = schemes[p]
            if m == "equal" or m == "PCGrad":
                W[p] = WEIGHT_TOTAL / 3
            elif m == "gradient balance":
                w = mt.gradient_balance_weights(torch.stack([g[p].norm() for g in grads]).detach())
                W[p] = WEIGHT_TOTAL * w / w.sum()
            elif m == "GradNorm":
                scheme(Lp, net.w_a)  # updates its weights (one problem per run)
                w = scheme.weights()
                W[p] = WEIGHT_TOTAL * w / w.sum()
            elif isinstance(scheme, mt.UncertaintyWeighting):
                totals.append(scheme(Lp))  # its own total, s terms included: its weights learn
                W[p] = scheme.weights()
            else:
                scheme(Lp.detach())
                w = scheme.weights().to(W)
                W[p] = WEIGHT_TOTAL * w / w.sum()
                if isinstance(scheme, mt._HistoryWeights):
                    scheme.update(Lp.detach())
        if track_conflict and grads is not None:  # each weighted term's gradient norm on the encoders
            log.task_grad_norms.append((W.detach() * torch.stack([g.norm(dim=1) for g in grads], 1)).cpu())
        if "DWA" in methods:
            state["epoch"].append(L.detach())
            if len(state["epoch"]) == epoch_steps:
                mean = torch.stack(state["epoch"]).mean(0)
                for p, m in enumerate(methods):
                    if m == "DWA":
                        schemes[p].update(mean[p])
                state["epoch"] = []
        total = (W[plain_rows] * L[plain_rows]).sum() + (torch.stack(totals).sum() if totals else 0.0)
        pc = [p for p in needs_grads if methods[p] == "PCGrad"]
        if pc:
            gen = torch.Generator().manual_seed(setup.steps * 7919 + state["step"])
            combined, changed = {}, torch.zeros(P, dtype=torch.bool)
            for p in pc:
                g = [WEIGHT_TOTAL / 3 * gk[p].detach() for gk in grads]
                combined[p] = mt.pcgrad(g, generator=gen)
                plain = sum(g)
                changed[p] = bool((combined[p] - plain).norm() > 1e-6 * plain.norm())
            state["pcgrad"] = combined
            log.pcgrad_changed.append(changed)
        log.losses.append(L.detach().cpu())
        log.weights.append(W.detach().cpu())
        state["step"] += 1
        return total, 1

    def grad_hook(step, model):
        shared = net.encoder_parameters()
        if state["pcgrad"]:
            for p, g in state["pcgrad"].items():  # the encoders' gradient becomes PCGrad's combination
                offset = 0
                for param in shared:
                    n = param[p].numel()
                    param.grad[p] = g[offset:offset + n].view_as(param[p])
                    offset += n
            state["pcgrad"] = None
        norms = torch.stack([prm.grad.flatten(1).pow(2).sum(1) for prm in shared]).sum(0).sqrt()
        log.encoder_grad.append(norms.detach().cpu())
        if (step - 1) % setup.eval_every == 0:  # before update `step`: the weights after step - 1 updates
            record_eval(step - 1)

    config = TrainConfig.adam(setup.steps, lr or setup.lr, seed=data.seeds[0], progress=False)
    result = train(trainee, get_batch, config, batch_loss=batch_loss, grad_hook=grad_hook)
    record_eval(setup.steps)
    out, test_f1, _, _, xa, xb = evaluate("test")
    with torch.no_grad():
        val_out, _, _, _, va, vb = evaluate("val")
        x = torch.cat([va, vb], -1)
        grad = recon_gradient(val_out.recon, x, smooth).abs()
        outlier = (x.abs() > 3).float()
        share = (grad * outlier).flatten(1).sum(1) / grad.flatten(1).sum(1)

    def shape(items, per_eval=True):  # list of (P, ...) -> (V, S, T, ...)
        t = torch.stack(items, dim=1)
        return t.view(V, S, *t.shape[1:])

    return FusionRun(variants, list(data.seeds), log.eval_steps, shape(log.f1), shape(log.val_ce),
                     shape(log.saturated), shape(log.losses), shape(log.weights), shape(log.encoder_grad),
                     test_f1.cpu().view(V, S), share.cpu().view(V, S), result.seconds / max(result.steps_done, 1),
                     shape(log.cosines) if log.cosines else None,
                     shape(log.pcgrad_changed) if log.pcgrad_changed else None,
                     shape(log.task_grad_norms) if log.task_grad_norms else None)


# --- judging the note's predictions --------------------------------------------------------------------

OUTCOMES = ("consistent", "exceeded", "unresolved", "contradicted")


def judge_prediction(values, low: float, high: float):
    """A predicted change ``[low, high]`` (e.g. +10 to +20, in the measure's units) against per-seed
    measured changes: ``(outcome, MeanCI)``, the outcome one of

    - ``"consistent"``: the 95% interval overlaps the predicted range and, if the range excludes zero,
      excludes zero too (the effect is established and of the predicted size);
    - ``"exceeded"``: the interval lies beyond the range, in its direction (a larger effect than predicted);
    - ``"unresolved"``: the interval overlaps the range but also reaches zero, which the range excludes;
    - ``"contradicted"``: the interval lies short of the range (a smaller, no, or opposite effect).
    """
    from .experiments import mean_ci

    if not low <= high:
        raise ValueError(f"need low <= high, got {low}, {high}")
    ci = mean_ci(values)
    pointing_up = high > 0 if low >= 0 else not high <= 0 and abs(high) >= abs(low)
    if ci.low > high:
        return ("exceeded" if pointing_up else "contradicted"), ci
    if ci.high < low:
        return ("contradicted" if pointing_up else "exceeded"), ci
    if low <= 0 <= high or ci.low > 0 or ci.high < 0:
        return "consistent", ci
    return "unresolved", ci


def claim_verdict(outcomes) -> str:
    """The claims audit's scale word for a claim made of several predictions, from their outcomes: all
    consistent -> ``"holds"``; some consistent or exceeded -> ``"holds in part"``; otherwise any
    contradicted -> ``"does not hold"``; all unresolved -> ``"not testable here"``."""
    outcomes = list(outcomes)
    if not outcomes or any(o not in OUTCOMES for o in outcomes):
        raise ValueError(f"outcomes must be a non-empty list of {OUTCOMES}, got {outcomes}")
    if all(o == "consistent" for o in outcomes):
        return "holds"
    if any(o in ("consistent", "exceeded") for o in outcomes):
        return "holds in part"
    return "does not hold" if "contradicted" in outcomes else "not testable here"


__all__ = [
    "OUTCOMES", "claim_verdict", "judge_prediction", "DigitHalves", "FusionOutput", "FusionRun", "FusionSetup", "GatedFusionNet", "METHODS", "NOTE_WEIGHTS", "TASKS",
    "Variant", "WEIGHT_TOTAL", "batched_info_nce", "digit_halves", "fusion_setup", "macro_f1", "recon_gradient",
    "reconstruction_loss", "task_losses", "train_fusion",
]
