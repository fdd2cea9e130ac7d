"""Supervised fine-tuning on the synthetic instruction set (chapter 6), and what to measure afterwards.

- :func:`sft_model_config`: the model size per scale, with a block long enough for prompt, response and
  the generation cap.
- :func:`sft_batch_loss` / :func:`train_sft`: next-token training where the per-token losses are combined
  by one of the reductions of :mod:`minigpt.losses.sequence`, with the prompt masked, weighted, or taking
  a loss like the response.
- :func:`evaluate_responses`: per held-out example, the response's token losses (content and stop token),
  whether greedy decoding gives exactly the right answer, and the length it generates.
- :func:`bucket_gradient_shares`: how much of one batch's gradient each response-length bucket supplies.
- :func:`accumulated_gradient`: the gradient of an optimizer step split into micro-batches, normalised
  the wrong way (mean of micro-batch means) or the right way (by the step's total token count).

Shapes: B examples, T positions; lengths count characters, the stop token included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm  # the plain bar: tqdm.auto warns in kernels without ipywidgets

from .data import (INSTRUCTION_PAD, INSTRUCTION_STOP, INSTRUCTION_VOCAB, CharTokenizer, Instruction, instruction_batch,
                   make_instructions)
from .losses.sequence import REDUCTIONS, sequence_loss, token_nll, token_weights, weighted_token_mean
from .model import GPT, GPTConfig
from .train import TrainConfig, configure_optimizer, lr_at

TOKENIZER = CharTokenizer(INSTRUCTION_VOCAB)
STOP_ID = TOKENIZER.stoi[INSTRUCTION_STOP]
PAD_ID = TOKENIZER.stoi[INSTRUCTION_PAD]


@dataclass(frozen=True)
class SFTSetup:
    """One fine-tuning experiment's fixed choices (everything but the reduction, the prompt weight and
    the seed). Each seed draws its own training and test examples, initialisation and batch order; runs
    with the same seed differ only in the loss."""

    scale: str
    tasks: tuple[str, ...] = ("count", "repeat")
    lengths: tuple[int, int] = (2, 49)  # response lengths, stop token included, drawn uniformly
    n_train: int = 4000
    n_test: int = 300
    batch_size: int = 16
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_iters=400, learning_rate=3e-3, min_lr=3e-4, warmup_iters=50, weight_decay=0.0, progress=False))
    max_extra: int = 10  # greedy decoding may run this many characters past the longest correct response

    @property
    def block_size(self) -> int:
        """Positions needed: the longest prompt (``R:abc*16>``, ``C:48>`` or ``V:`` + word + ``>``) plus
        the longest response and ``max_extra``."""
        digits = len(str(self.lengths[1] - 1))
        prompt = {"repeat": 2 + 3 + 1 + digits + 1, "count": 2 + digits + 1, "reverse": 2 + self.lengths[1] - 1 + 1}
        longest_prompt = max(prompt[t] for t in self.tasks)
        return longest_prompt + self.lengths[1] + self.max_extra


def sft_setup(scale: str) -> SFTSetup:
    """The chapter's setup. ``small`` (CPU, CI): 2-layer model, 400 updates of 16 examples, 300 test
    examples per seed. ``full`` (GPU): 4-layer model 128 wide, 1500 updates of 32, 600 test examples."""
    if scale == "small":
        return SFTSetup("small")
    if scale == "full":
        return SFTSetup("full", n_test=600, batch_size=32, train=TrainConfig(
            max_iters=1500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.0, progress=None))
    raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")


@dataclass
class SFTRun:
    """A fine-tuned model with its training history and held-out evaluation."""

    model: GPT
    history: SFTHistory
    evaluation: "ResponseEval"
    seconds: float


def sft_data(setup: SFTSetup, seed: int) -> tuple[list[Instruction], list[Instruction]]:
    """The training and test examples of one seed (two independent streams)."""
    train = make_instructions(setup.n_train, torch.Generator().manual_seed(seed), lengths=setup.lengths,
                              tasks=setup.tasks)
    test = make_instructions(setup.n_test, torch.Generator().manual_seed(seed + 1_000_003), lengths=setup.lengths,
                             tasks=setup.tasks)
    return train, test


def run_sft(setup: SFTSetup, seed: int, *, reduction: str = "token_mean", alpha: float = 0.5,
            prompt_weight: float = 0.0, device: torch.device | str = "cpu") -> SFTRun:
    """Fine-tune a fresh model under ``setup`` with one loss and seed, then evaluate it on held-out
    examples."""
    train, test = sft_data(setup, seed)
    torch.manual_seed(seed)
    model = GPT(sft_model_config(setup.scale, setup.block_size)).to(device)
    t0 = time.perf_counter()
    config = TrainConfig(**{**setup.train.__dict__, "seed": seed})
    history = train_sft(model, train, config, batch_size=setup.batch_size, reduction=reduction, alpha=alpha,
                        prompt_weight=prompt_weight)
    evaluation = evaluate_responses(model, test, max_extra=setup.max_extra)
    return SFTRun(model, history, evaluation, time.perf_counter() - t0)


def sft_model_config(scale: str, block_size: int) -> GPTConfig:
    """A model for the instruction set. ``small``: 2 layers, 48 wide (about 60k parameters), which learns
    the count task in a few hundred CPU steps. ``full``: 4 layers, 128 wide (0.8M parameters).
    ``block_size`` must cover the longest prompt plus the generation cap."""
    if scale == "small":
        return GPTConfig(block_size=block_size, vocab_size=len(INSTRUCTION_VOCAB), n_layer=2, n_head=4, n_embd=48)
    if scale == "full":
        return GPTConfig(block_size=block_size, vocab_size=len(INSTRUCTION_VOCAB), n_layer=4, n_head=4, n_embd=128)
    raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sft_batch_loss(model: GPT, examples: list[Instruction], *, reduction: str = "token_mean", alpha: float = 0.5,
                   prompt_weight: float = 0.0, num_items: int | None = None) -> torch.Tensor:
    """The fine-tuning loss of one batch.

    Args:
        model: a :class:`GPT` over :data:`~minigpt.data.INSTRUCTION_VOCAB`.
        examples: the batch.
        reduction: how response tokens' losses combine, one of ``minigpt.losses.sequence.REDUCTIONS``.
        alpha: exponent of ``"length_normalized"`` (the loss divides each sequence's sum by ``T**alpha``).
        prompt_weight: 0 masks the prompt (only the response takes a loss); 1 trains on the whole sequence;
            values between weight prompt tokens against response tokens (the source notes use 0.1).
            Weights other than 0 combine with ``"token_mean"`` only: ``sum w l / sum w``.
        num_items: for gradient accumulation, the count the reduction normalises by over the whole step.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= prompt_weight:
        raise ValueError(f"prompt_weight must be >= 0, got {prompt_weight}")
    if prompt_weight > 0 and reduction != "token_mean":
        raise ValueError(f"prompt_weight > 0 is defined for reduction='token_mean' only, got {reduction!r}")
    device = _device(model)
    x, y, response = (t.to(device) for t in instruction_batch(examples, TOKENIZER, mask_prompt=prompt_weight == 0))
    logits, _ = model(x)
    nll = token_nll(logits, y)
    if prompt_weight == 0:
        return sequence_loss(nll, y != -100, reduction=reduction, alpha=alpha, num_items=num_items)
    weights = torch.where(response, 1.0, prompt_weight) * (y != -100)
    return weighted_token_mean(nll, weights.to(nll.dtype))


@dataclass
class SFTHistory:
    """Per optimizer step: the training loss (under the reduction trained with), the gradient norm before
    clipping, the learning rate and the seconds it took."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train_sft(model: GPT, examples: list[Instruction], config: TrainConfig, *, batch_size: int = 16,
              reduction: str = "token_mean", alpha: float = 0.5, prompt_weight: float = 0.0) -> SFTHistory:
    """Fine-tune ``model`` on batches of ``batch_size`` examples drawn with replacement from ``examples``.

    Optimisation follows ``config`` as :func:`minigpt.train.train` does (AdamW, warmup and cosine,
    clipping, ``config.seed`` for the batch order); ``config.max_iters`` is the number of updates. Its
    evaluation and checkpoint fields are not used. The loss is :func:`sft_batch_loss`.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    sft_batch_loss(model, examples[:1], reduction=reduction, alpha=alpha, prompt_weight=prompt_weight)  # checks
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = configure_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    history = SFTHistory()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(range(config.max_iters), disable=(None if config.progress is None else not config.progress),
               desc=f"sft {reduction}", unit="step", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picks = torch.randint(0, len(examples), (batch_size,), generator=gen).tolist()
        loss = sft_batch_loss(model, [examples[i] for i in picks], reduction=reduction, alpha=alpha,
                              prompt_weight=prompt_weight)
        loss.backward()
        if config.grad_clip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            raise FloatingPointError(f"fine-tuning diverged at update {step + 1}: loss={float(loss)}, "
                                     f"gradient norm={norm} (lr={lr:.3g})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.loss.append(loss.item())
        history.grad_norm.append(norm)
        history.lr.append(lr)
        history.seconds.append(time.perf_counter() - t0)
    model.eval()
    return history


@torch.no_grad()
def greedy_continue(model: GPT, prefixes: list[list[int]], *, max_new_tokens, stop_id: int = STOP_ID,
                    pad_id: int = PAD_ID) -> list[list[int]]:
    """Greedy continuation of each prefix until it emits ``stop_id`` (kept) or has ``max_new_tokens``
    new tokens (an int, or one per prefix).

    Rows of different lengths share one right-padded batch: the causal mask means a row never sees the
    padding after its own last token, so each row's result is what it would get alone.
    Returns the new tokens of each row.
    """
    if not prefixes or any(len(p) == 0 for p in prefixes):
        raise ValueError("prefixes must be a non-empty list of non-empty token lists")
    budgets = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prefixes) or any(not isinstance(b, int) or b < 0 for b in budgets):
        raise ValueError(f"max_new_tokens must be an int >= 0 or one per prefix, got {max_new_tokens!r}")
    needed = max(len(p) + b for p, b in zip(prefixes, budgets)) - 1  # the last new token is never input
    if needed > model.config.block_size:
        raise ValueError(f"a prefix plus its max_new_tokens needs {needed} positions, more than the model's "
                         f"block_size={model.config.block_size}")
    device = _device(model)
    B = len(prefixes)
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    end = lengths + torch.tensor(budgets, device=device)
    buffer = torch.full((B, int(end.max())), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        buffer[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    start = lengths.clone()
    active = lengths < end
    was_training = model.training
    model.eval()
    while bool(active.any()):
        rows = active.nonzero().squeeze(1)
        T = int(lengths[rows].max())
        logits, _ = model(buffer[rows, :T])
        nxt = logits[torch.arange(rows.numel(), device=device), lengths[rows] - 1].argmax(-1)
        buffer[rows, lengths[rows]] = nxt
        lengths[rows] += 1
        active[rows] = (nxt != stop_id) & (lengths[rows] < end[rows])
    model.train(was_training)
    return [buffer[i, int(start[i]): int(lengths[i])].tolist() for i in range(B)]


@dataclass
class ResponseEval:
    """Per held-out example (tensors of shape (N,)):

    - ``length``: the correct response's length, stop token included;
    - ``content_nll``: summed NLL of the response's characters before the stop token (teacher forced);
    - ``stop_nll``: NLL of the stop token at its correct place;
    - ``exact``: greedy decoding gives exactly the correct response;
    - ``generated_length``: length of the greedy response (its stop token included; the cap if none);
    - ``stopped``: the greedy response emitted a stop token within the cap.
    """

    task: list[str]
    length: torch.Tensor
    content_nll: torch.Tensor
    stop_nll: torch.Tensor
    exact: torch.Tensor
    generated_length: torch.Tensor
    stopped: torch.Tensor

    @property
    def token_loss(self) -> torch.Tensor:
        """Mean NLL per response token of each example, stop token included."""
        return (self.content_nll + self.stop_nll) / self.length

    @property
    def length_error(self) -> torch.Tensor:
        """Generated minus correct length: negative means the model stopped too early."""
        return self.generated_length - self.length

    def select(self, keep: torch.Tensor) -> "ResponseEval":
        """The examples where ``keep`` (N,) bool is True."""
        idx = keep.nonzero().squeeze(1).tolist()
        return ResponseEval([self.task[i] for i in idx], *(getattr(self, name)[keep] for name in
                            ("length", "content_nll", "stop_nll", "exact", "generated_length", "stopped")))


@torch.no_grad()
def evaluate_responses(model: GPT, examples: list[Instruction], *, max_extra: int = 10,
                       batch_size: int = 256) -> ResponseEval:
    """Teacher-forced losses and greedy-decoding outcomes of each example's response.

    Greedy decoding follows the correct response for as long as the argmax at each position (given the
    correct prefix) is the correct token, so one teacher-forced pass finds the examples it gets exactly
    right and those it ends early by emitting the stop token. Only the others are decoded, from their
    first error on, up to the longest correct response in ``examples`` plus ``max_extra`` characters.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    device = _device(model)
    was_training = model.training
    model.eval()
    parts = {k: [] for k in ("content", "stop", "exact", "first", "first_is_stop")}
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        x, y, _ = (t.to(device) for t in instruction_batch(chunk, TOKENIZER))
        logits, _ = model(x)
        nll = token_nll(logits, y)
        kept = y != -100
        is_stop = kept & (y == STOP_ID)
        parts["stop"].append((nll * is_stop).sum(1))
        parts["content"].append((nll * (kept & ~is_stop)).sum(1))
        pred = logits.argmax(-1)
        wrong = kept & (pred != y)
        parts["exact"].append(~wrong.any(1))
        first_pos = torch.where(wrong.any(1), wrong.float().argmax(1), torch.zeros_like(wrong[:, 0], dtype=torch.long))
        # response index of the first error: positions count from the one that predicts the first character
        prompt_start = kept.float().argmax(1)
        parts["first"].append(first_pos - prompt_start)
        parts["first_is_stop"].append(pred.gather(1, first_pos[:, None]).squeeze(1) == STOP_ID)
    model.train(was_training)
    content, stop = torch.cat(parts["content"]).cpu(), torch.cat(parts["stop"]).cpu()
    exact, first = torch.cat(parts["exact"]).cpu(), torch.cat(parts["first"]).cpu()
    first_is_stop = torch.cat(parts["first_is_stop"]).cpu() & ~exact
    length = torch.tensor([e.response_length for e in examples])
    generated = length.clone()
    stopped = torch.ones(len(examples), dtype=torch.bool)
    generated[first_is_stop] = first[first_is_stop] + 1  # it emitted the stop token as its (k+1)-th character
    rest = (~exact & ~first_is_stop).nonzero().squeeze(1).tolist()
    if rest:
        cap = int(length.max()) + max_extra
        prefixes, budgets = [], []
        for i in rest:
            e, k = examples[i], int(first[i])
            prefixes.append(TOKENIZER.encode(e.prompt + e.response[:k]))
            budgets.append(cap - k)
        new = greedy_continue(model, prefixes, max_new_tokens=budgets)
        for i, k, tokens in zip(rest, (int(first[i]) for i in rest), new):
            ended = STOP_ID in tokens
            if ended:
                tokens = tokens[: tokens.index(STOP_ID) + 1]
            generated[i] = k + len(tokens)
            stopped[i] = ended
    return ResponseEval([e.task for e in examples], length, content.double(), stop.double(), exact, generated,
                        stopped)


def bucket_gradient_shares(model: GPT, examples: list[Instruction], buckets: torch.Tensor, *,
                           reduction: str = "token_mean", alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each group of examples contributes to one batch's loss weight and gradient.

    ``buckets`` (B,) int holds each example's group 0..K-1. The batch loss is
    ``sum_b L_b`` where ``L_b`` keeps group b's tokens with the weights the reduction gives them in the
    whole batch, so the gradient is ``g = sum_b g_b``. Returns two (K,) tensors that each sum to 1:
    the share of the total token weight, and the gradient share ``<g_b, g> / |g|^2`` (the part of g
    along its own direction that group b supplies; it can be negative if a group pulls against the rest).
    """
    buckets = torch.as_tensor(buckets)
    if buckets.shape != (len(examples),):
        raise ValueError(f"buckets must have shape ({len(examples)},), got {tuple(buckets.shape)}")
    K = int(buckets.max()) + 1
    device = _device(model)
    x, y, _ = (t.to(device) for t in instruction_batch(examples, TOKENIZER))
    mask = y != -100
    weights = token_weights(mask, reduction=reduction, alpha=alpha).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    logits, _ = model(x)
    nll = torch.where(mask, token_nll(logits, y), 0.0)
    grads = []
    for b in range(K):
        w = (weights * (buckets == b).to(device)[:, None]).to(nll.dtype)
        g = torch.autograd.grad((nll * w).sum(), params, retain_graph=b < K - 1)
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    total = torch.stack(grads).sum(0)
    gradient_share = torch.stack([g @ total for g in grads]).cpu() / float(total @ total)
    weight_share = torch.stack([weights[(buckets == b).to(device)].sum() for b in range(K)]).cpu()
    return weight_share / weight_share.sum(), gradient_share


def accumulated_gradient(model: GPT, micro_batches: list[list[Instruction]], *, normalise: str) -> torch.Tensor:
    """The flattened gradient of one optimizer step made of ``micro_batches`` (token-mean loss).

    ``normalise="micro_mean"``: each micro-batch's token mean, averaged over micro-batches (what a loop
    that divides each micro-batch's mean loss by the number of micro-batches computes).
    ``normalise="global"``: each micro-batch's token sum divided by the step's total token count.
    Only ``"global"`` equals the gradient of the token mean over the union of the micro-batches.
    """
    if normalise not in ("micro_mean", "global"):
        raise ValueError(f"normalise must be 'micro_mean' or 'global', got {normalise!r}")
    if not micro_batches or any(len(mb) == 0 for mb in micro_batches):
        raise ValueError("micro_batches must be a non-empty list of non-empty batches")
    total_tokens = sum(e.response_length for mb in micro_batches for e in mb)
    params = [p for p in model.parameters() if p.requires_grad]
    grad = [torch.zeros_like(p) for p in params]
    for mb in micro_batches:
        if normalise == "global":
            loss = sft_batch_loss(model, mb, reduction="token_mean", num_items=total_tokens)
        else:
            loss = sft_batch_loss(model, mb, reduction="token_mean") / len(micro_batches)
        for acc, g in zip(grad, torch.autograd.grad(loss, params)):
            acc += g
    return torch.cat([g.reshape(-1) for g in grad])
