"""The one training loop every chapter uses: language models, fine-tuning, and small models alike.

AdamW with decay and no-decay parameter groups, linear warmup then cosine decay, gradient clipping that
records the norm before clipping, gradient accumulation normalised by the item count of the whole
update, periodic train/validation evaluation on fixed batches, early stopping that restores the best
weights, NaN/inf detection, a progress bar, and checkpoints that resume to the same numbers.

Two functions describe a task:

- ``get_batch(split, generator) -> batch`` with ``split`` in ``{"train", "val"}``: draws a batch (any
  object) with the CPU generator it is given. :meth:`minigpt.data.CharCorpus.batch_fn` makes one for
  tiny Shakespeare, :func:`minigpt.sft.sft_batch_fn` for the instruction set.
- ``batch_loss(model, batch) -> (loss_sum, n_items)``: the loss *summed* over the batch's items and how
  many items it holds (tokens, sequences, examples: whatever the loss averages over). The default,
  :func:`language_model_loss`, is the next-token loss of an ``(x, y)`` batch over its target tokens.

Every update divides the summed loss of all its micro-batches by their total item count, so k
micro-batches give exactly the gradient of one batch k times the size, for any loss.

Reproducibility: on the CPU a run is bit-identical for a fixed seed and thread count, and resuming from
a checkpoint reproduces the uninterrupted run. On CUDA the same holds only up to floating-point
non-determinism: the attention backward and some reductions use atomics unless
``torch.use_deterministic_algorithms(True)`` is set (slower), so curves agree closely, not bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm  # the plain text bar: tqdm.auto needs ipywidgets in Jupyter and warns without them

from .config import progress_default
from .losses import IGNORE_INDEX
from .model import GPT, GPTConfig, LossFn

BatchFn = Callable[[str, torch.Generator], Any]
# batch_loss(model, batch) -> (loss summed over the batch's items, number of items: int or 0-d tensor)
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, "int | float | torch.Tensor"]]

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
LR_SCHEDULES = ("cosine", "step", "plateau")

EVAL_SEED = 1337  # evaluation batches are the same at every evaluation and for every training seed


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults are nanoGPT's CPU configuration for character-level Shakespeare.

    Steps count optimizer updates; one update sees ``grad_accum_steps`` micro-batches.
    """

    max_iters: int = 2000
    learning_rate: float = 1e-3  # peak, reached at the end of warmup
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # where the cosine reaches min_lr; default max_iters
    weight_decay: float = 0.1  # applied to matrices and embeddings only, never to biases or norms
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float | None = 1.0  # max global L2 norm; None or 0 records the norm without clipping
    grad_accum_steps: int = 1
    eval_interval: int = 250  # evaluate at step 0, every eval_interval steps, and at the end
    eval_iters: int = 20  # batches per evaluation and split; 0 turns evaluation off
    patience: int | None = None  # evaluations without improvement before stopping; None: never stop
    min_delta: float = 0.0  # an improvement must beat the best validation loss by more than this
    checkpoint_path: str | None = None  # may hold "{step}" to keep one file per checkpoint
    checkpoint_interval: int | None = None  # steps between checkpoints; default eval_interval
    seed: int = 0  # seeds batch sampling and dropout
    progress: bool | None = None  # None: minigpt.config.progress_default() (on for readers, off in tests and builds)
    on_nonfinite: str = "raise"  # "raise" TrainingDiverged, or "stop" and return what was done
    # Optimizer and schedule choices (chapter 8). The defaults are the loop described above.
    optimizer: str = "adamw"  # "adamw" (decoupled decay), or "adam", "sgd", "rmsprop" (decay as an L2 gradient term)
    momentum: float = 0.9  # SGD's momentum (Nesterov off)
    lr_schedule: str = "cosine"  # "cosine"; "step": lr * step_gamma ** (step // step_size); "plateau": see below
    step_size: int = 1000  # "step": updates between decays
    step_gamma: float = 0.1  # "step": the factor of each decay
    # "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau's rule (mode "min", relative threshold) applied
    # at every evaluation to the validation loss: the rate is multiplied by plateau_factor (never below
    # min_lr) once more than plateau_patience evaluations in a row fail to beat the best by the threshold
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_threshold: float = 1e-4
    zero_grad: bool = True  # False injects a fault on purpose: gradients are summed over all past updates

    @classmethod
    def adam(cls, steps: int, lr: float, seed: int = 0, **overrides) -> "TrainConfig":
        """Plain Adam at a constant learning rate for ``steps`` updates: no warmup, decay, weight decay,
        clipping or evaluation, and PyTorch's default betas. What a small model on a small synthetic task
        needs (chapter 3's segmentation net and contrastive encoder)."""
        settings = dict(max_iters=steps, learning_rate=lr, min_lr=lr, warmup_iters=0, weight_decay=0.0,
                        beta2=0.999, grad_clip=None, eval_iters=0, seed=seed)
        return cls(**{**settings, **overrides})

    def __post_init__(self):
        positive = ("max_iters", "grad_accum_steps", "eval_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.eval_iters, int) or self.eval_iters < 0:
            raise ValueError(f"eval_iters must be a non-negative int, got {self.eval_iters!r}")
        if self.patience is not None and self.eval_iters == 0:
            raise ValueError("patience needs evaluations: set eval_iters > 0 or patience=None")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr <= self.learning_rate):
            raise ValueError(
                f"need learning_rate > 0 and 0 <= min_lr <= learning_rate, got {self.learning_rate}, {self.min_lr}"
            )
        if self.lr_decay_iters is not None and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) must exceed warmup_iters ({self.warmup_iters})")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be positive, 0 or None, got {self.grad_clip}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive int or None, got {self.patience}")
        if self.on_nonfinite not in ("raise", "stop"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {self.on_nonfinite!r}")
        if self.checkpoint_interval is not None and self.checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be a positive int, got {self.checkpoint_interval}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not isinstance(self.step_size, int) or self.step_size < 1:
            raise ValueError(f"step_size must be a positive int, got {self.step_size!r}")
        if not (0 < self.step_gamma <= 1 and 0 < self.plateau_factor < 1):
            raise ValueError(f"need 0 < step_gamma <= 1 and 0 < plateau_factor < 1, got {self.step_gamma}, "
                             f"{self.plateau_factor}")
        if not isinstance(self.plateau_patience, int) or self.plateau_patience < 0 or self.plateau_threshold < 0:
            raise ValueError(f"plateau_patience must be an int >= 0 and plateau_threshold >= 0, got "
                             f"{self.plateau_patience!r}, {self.plateau_threshold}")
        if self.lr_schedule == "plateau" and self.eval_iters == 0:
            raise ValueError("lr_schedule='plateau' needs evaluations: set eval_iters > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update numbered ``step`` (0-based): linear warmup to ``learning_rate``, then
    a half cosine down to ``min_lr`` at ``lr_decay_iters``, then ``min_lr``. (``min_lr == learning_rate``
    makes it constant.) With ``lr_schedule="step"`` the warmup is followed by
    ``learning_rate * step_gamma ** (step // step_size)``; with ``"plateau"`` by ``learning_rate``, which
    :func:`train` multiplies by the plateau rule's factor."""
    decay_end = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:
        # (step + 1) so that the very first update already moves (a zero learning rate wastes a step)
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    if config.lr_schedule == "step":
        return config.learning_rate * config.step_gamma ** (step // config.step_size)
    if config.lr_schedule == "plateau":
        return config.learning_rate
    if step >= decay_end:
        return config.min_lr
    progress = (step - config.warmup_iters) / (decay_end - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: ``weight_decay`` on every parameter with 2 or more dimensions
    (matrices, embeddings), none on vectors (biases, LayerNorm gains), nor on any parameter the model
    names in ``model.no_weight_decay()`` (a set of names from ``named_parameters``, timm's convention):
    models that hold B networks side by side store a bias as a (B, 1, H) tensor, which only its name
    tells apart from a weight."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once
    unknown = exempt - {n for n, _ in named}
    if unknown:
        raise ValueError(f"no_weight_decay() names parameters the model does not have: {sorted(unknown)}")
    decay = [p for n, p in named if p.dim() >= 2 and n not in exempt]
    no_decay = [p for n, p in named if p.dim() < 2 or n in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model: nn.Module, config: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with the two groups of :func:`decay_groups`: weight decay on matrices and embeddings, none on
    biases and LayerNorm gains, whose decay would only fight the normalisation they implement.

    ``config.optimizer`` picks another algorithm with the same groups: ``"adam"`` (``torch.optim.Adam``,
    whose weight decay adds ``weight_decay * w`` to the gradient: L2 regularisation, rescaled by Adam's
    normaliser), ``"sgd"`` (with ``config.momentum``) or ``"rmsprop"`` (smoothing constant ``beta2``)."""
    groups = decay_groups(model, config.weight_decay)
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.learning_rate, betas=betas)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.learning_rate, alpha=config.beta2, eps=1e-8)
    if not fused:
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas)
    # The fused kernel updates every parameter in one pass instead of several elementwise passes per
    # tensor: about 2 ms of a 43 ms CPU step at the small scale. Same algorithm, same hyperparameters.
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas)


@dataclass
class History:
    """What a run recorded. Per update: ``step`` (1-based count of updates done), training ``loss`` (the
    batch loss's sum over the update's micro-batches divided by their items: the token mean for a
    language model), ``lr``, ``grad_norm`` (global L2 norm before clipping) and ``seconds`` (wall time of
    the update). Per evaluation: ``eval_step``, ``train_loss``, ``val_loss``."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def clip_fraction(self, max_norm: float) -> float:
        """Share of updates whose pre-clip gradient norm exceeded ``max_norm``."""
        if not self.grad_norm:
            return float("nan")
        return sum(g > max_norm for g in self.grad_norm) / len(self.grad_norm)


@dataclass
class TrainResult:
    history: History
    best_val_loss: float
    best_step: int
    steps_done: int
    stop_reason: str  # "max_iters", "early_stopping" or "non-finite ..."
    seconds: float
    tokens: float  # items seen in training: target tokens for a language model (ignored positions excluded)


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; ``step`` says at which update."""

    def __init__(self, message: str, step: int, history: History):
        super().__init__(message)
        self.step = step
        self.history = history


def count_targets(targets: torch.Tensor) -> int | torch.Tensor:
    """Number of positions that take a loss (integer targets equal to ``IGNORE_INDEX`` are ignored).

    An int for CPU tensors; on an accelerator a 0-d tensor, so that counting does not wait for the device.
    """
    if targets.dtype in (torch.int64, torch.int32):
        count = (targets != IGNORE_INDEX).sum()
        return int(count) if count.device.type == "cpu" else count
    return targets.numel()


def language_model_loss(loss_fn: LossFn | None = None) -> BatchLoss:
    """The next-token batch loss for ``(x, y)`` batches: ``model(x, y, loss_fn=loss_fn, reduction="sum")``
    summed over target tokens, and the number of target tokens.

    ``loss_fn`` is a token-level loss with ``torch.nn.functional``'s convention (the model's own if None),
    e.g. ``functools.partial(minigpt.losses.cross_entropy, label_smoothing=0.1)``.
    """

    def batch_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int | torch.Tensor]:
        x, y = batch
        _, loss_sum = model(x, y, loss_fn=loss_fn, reduction="sum")
        return loss_sum, count_targets(y)

    return batch_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    get_batch: BatchFn,
    split: str,
    iters: int = 20,
    seed: int = EVAL_SEED,
    batch_loss: BatchLoss | None = None,
) -> float:
    """Mean loss per item over ``iters`` batches of ``split``, in eval mode, on batches fixed by ``seed``.

    Fixed batches make successive evaluations comparable (the curve moves because the model changes, not
    the sample) and leave the training batch stream untouched, so evaluating more often does not change
    what the model trains on. ``batch_loss`` as in :func:`train` (default :func:`language_model_loss`).
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    batch_loss = batch_loss or language_model_loss()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0.0
    for _ in range(iters):
        loss_sum, n_items = batch_loss(model, get_batch(split, gen))
        total = total + loss_sum.detach().double()
        count = count + n_items
    model.train(was_training)
    if float(count) == 0:
        raise ValueError(f"get_batch returned {iters} batches of split {split!r} with no items to evaluate")
    return float(total) / float(count)


def _rng_state(train_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "train_gen": train_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, train_gen: torch.Generator, reseed: int) -> None:
    """Restore the RNG states of a checkpoint. A checkpoint may come from a machine with more GPUs (only
    the devices present are restored) or from one without CUDA; then CUDA's generators, which draw this
    run's dropout masks on the GPU, are seeded from ``reseed`` rather than left at whatever they were."""
    torch.set_rng_state(state["torch"])
    train_gen.set_state(state["train_gen"])
    if not torch.cuda.is_available():
        return
    saved = state.get("cuda") or []
    for index in range(torch.cuda.device_count()):
        if index < len(saved):
            torch.cuda.set_rng_state(saved[index], device=index)
        else:
            torch.cuda.default_generators[index].manual_seed(reseed + index)


def save_checkpoint(path: str | os.PathLike, **payload) -> None:
    """Write a checkpoint atomically (to a temporary file, then renamed), so a crash never leaves a
    half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only, never pickled
    code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPT:
    """A :class:`GPT` with the weights of a checkpoint written by :func:`train`."""
    ckpt = load_checkpoint(path, map_location)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def _clone_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    get_batch: BatchFn,
    config: TrainConfig | None = None,
    *,
    batch_loss: BatchLoss | None = None,
    resume_from: str | os.PathLike | None = None,
    grad_hook: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` on batches from ``get_batch``; return the history and where it stopped.

    Args:
        model: any ``nn.Module``; ``batch_loss`` says how it is called.
        get_batch: ``get_batch(split, generator) -> batch``, the batch on the model's device.
        config: see :class:`TrainConfig`.
        batch_loss: ``batch_loss(model, batch) -> (loss_sum, n_items)``, the loss summed over the batch's
            items and their number; each update minimises the sum over its micro-batches divided by their
            total items. Default :func:`language_model_loss`: next-token loss of ``(x, y)`` batches.
        resume_from: a checkpoint written by an earlier run with the same configuration; training goes on
            from its step and reproduces the uninterrupted run's numbers (on the CPU bit for bit).
        grad_hook: called as ``grad_hook(step, model)`` after the backward pass, before clipping, for
            gradient diagnostics.
    """
    cfg = config or TrainConfig()
    batch_loss = batch_loss or language_model_loss()
    train_gen = torch.Generator()
    optimizer = configure_optimizer(model, cfg)
    history = History()
    best_val, best_step, best_state, evals_since_best = math.inf, -1, None, 0
    step = 0
    plateau = {"scale": 1.0, "best": math.inf, "bad": 0}  # ReduceLROnPlateau's state
    carried: list[torch.Tensor] | None = None  # zero_grad=False: the gradient sum of all past updates

    if resume_from is not None:
        # Loaded on the CPU: RNG states must stay CPU tensors, and load_state_dict copies weights and
        # optimizer moments onto the parameters' device anyway.
        ckpt = load_checkpoint(resume_from)
        model_config = getattr(model, "config", None)
        if model_config is not None and ckpt.get("model_config") != asdict(model_config):
            raise ValueError(
                f"resume_from holds a model with config {ckpt.get('model_config')}, "
                f"but model has {asdict(model_config)}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], train_gen, reseed=cfg.seed + ckpt["step"])
        history = History(**ckpt["history"])
        step = ckpt["step"]
        best = ckpt["best"]
        best_val, best_step, evals_since_best = best["val_loss"], best["step"], best["evals_since"]
        best_state = best["state"]
        plateau = ckpt.get("plateau", plateau)
        carried = ckpt.get("carried")
    else:
        torch.manual_seed(cfg.seed)  # dropout (this seeds every CUDA device too)
        train_gen.manual_seed(cfg.seed)  # batch sampling

    checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
    restore_best = cfg.patience is not None
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def run_eval() -> None:
        nonlocal best_val, best_step, best_state, evals_since_best
        if cfg.eval_iters == 0:
            return
        tr = evaluate(model, get_batch, "train", cfg.eval_iters, batch_loss=batch_loss)
        va = evaluate(model, get_batch, "val", cfg.eval_iters, batch_loss=batch_loss)
        history.eval_step.append(step)
        history.train_loss.append(tr)
        history.val_loss.append(va)
        if va < best_val - cfg.min_delta:
            best_val, best_step, evals_since_best = va, step, 0
            if restore_best:
                best_state = _clone_state(model)
        else:
            evals_since_best += 1
        if cfg.lr_schedule == "plateau":  # PyTorch's mode="min", threshold_mode="rel", cooldown=0
            if va < plateau["best"] * (1 - cfg.plateau_threshold):
                plateau["best"], plateau["bad"] = va, 0
            else:
                plateau["bad"] += 1
            if plateau["bad"] > cfg.plateau_patience:
                plateau["scale"] *= cfg.plateau_factor
                plateau["bad"] = 0

    def checkpoint() -> None:
        if cfg.checkpoint_path is None:
            return
        save_checkpoint(
            str(cfg.checkpoint_path).format(step=step),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            step=step,
            model_config=asdict(model.config) if hasattr(model, "config") else None,
            train_config=asdict(cfg),
            history=history.as_dict(),
            rng=_rng_state(train_gen),
            best={"val_loss": best_val, "step": best_step, "evals_since": evals_since_best, "state": best_state},
            plateau=plateau,
            carried=carried,
        )

    if resume_from is None:
        run_eval()  # step 0: the loss at initialisation

    stop_reason = "max_iters"
    tokens = 0.0
    start_time = time.perf_counter()
    show = progress_default() if cfg.progress is None else cfg.progress
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not show, desc="train", unit="step",
               dynamic_ncols=True, mininterval=0.5)
    try:
        while step < cfg.max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            if cfg.lr_schedule == "plateau" and step >= cfg.warmup_iters:
                lr = max(lr * plateau["scale"], cfg.min_lr) if plateau["scale"] < 1 else lr
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Gradient accumulation done right: the update minimises (sum of the micro-batches' summed
            # losses) / (their total item count), so its gradient equals that of one big batch even when
            # micro-batches hold different numbers of items (a mean of micro-batch means does not). Each
            # micro-batch's graph is freed after its backward; the gradients, a plain sum so far, are
            # divided by the item count once it is known.
            loss_sum, n_items = 0.0, 0
            for _ in range(cfg.grad_accum_steps):
                micro_loss, micro_items = batch_loss(model, get_batch("train", train_gen))
                micro_loss.backward()
                loss_sum = loss_sum + micro_loss.detach()
                n_items = n_items + micro_items
            grads = [p.grad for p in params if p.grad is not None]
            scale = 1.0 / n_items if isinstance(n_items, (int, float)) and n_items else None
            if isinstance(n_items, torch.Tensor):
                scale = 1.0 / n_items.clamp(min=1).to(torch.float64)
            if scale is not None and grads:
                torch._foreach_mul_(grads, scale)
            if not cfg.zero_grad:  # the forgotten zero_grad: this update's mean gradient plus all earlier ones
                if carried is not None:
                    for p, old in zip(params, carried):
                        if p.grad is not None and old is not None:
                            p.grad.add_(old)
                carried = [None if p.grad is None else p.grad.detach().clone() for p in params]
            if grad_hook is not None:
                grad_hook(step + 1, model)
            if cfg.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            # the one host-device synchronisation of the update: loss, norm and item count read together
            loss_total, grad_norm, n_items = torch.stack([
                torch.as_tensor(loss_sum, dtype=torch.float64, device=grad_norm.device).reshape(()),
                grad_norm.detach().double().reshape(()),
                torch.as_tensor(n_items, dtype=torch.float64, device=grad_norm.device).reshape(()),
            ]).tolist()
            if n_items == 0:
                optimizer.zero_grad(set_to_none=True)
                raise ValueError(f"get_batch returned only batches without items (e.g. every target "
                                 f"ignored) for update {step + 1}")
            loss = loss_total / n_items

            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                message = (f"training diverged at update {step + 1}: loss={loss}, gradient norm={grad_norm} "
                           f"(lr={lr:.3g}); the weights are those after update {step}")
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nonfinite == "raise":
                    raise TrainingDiverged(message, step + 1, history)
                stop_reason = f"non-finite at update {step + 1}"
                tqdm.write(message)
                break

            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += n_items
            history.step.append(step)
            history.loss.append(loss)
            history.lr.append(lr)
            history.grad_norm.append(grad_norm)
            history.seconds.append(time.perf_counter() - t0)
            bar.update(1)

            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                run_eval()
                if history.val_loss:
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{history.val_loss[-1]:.4f}")
            if step % checkpoint_every == 0 or step == cfg.max_iters:
                checkpoint()
            if cfg.patience is not None and evals_since_best >= cfg.patience:
                stop_reason = "early_stopping"
                break
    finally:
        bar.close()

    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    tokens = int(tokens) if float(tokens).is_integer() else tokens
    return TrainResult(history, best_val, best_step, step, stop_reason,
                       time.perf_counter() - start_time, tokens)
