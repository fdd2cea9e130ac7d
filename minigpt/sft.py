"""Supervised fine-tuning on the synthetic instruction set (chapter 6), and what to measure afterwards.

Training goes through :func:`minigpt.train.train` like everything else; this module supplies the task:

- :func:`sft_setup` / :func:`sft_model_config`: the experiment and model size per scale, with a block long
  enough for prompt, response and the generation cap.
- :func:`sft_batch_fn`: batches of instructions drawn with replacement (``get_batch`` for ``train``).
- :func:`sft_batch_loss`: the batch loss for ``train``: :func:`minigpt.losses.sft_loss` under one of the
  sequence reductions with the prompt masked by :func:`minigpt.losses.mask_prompt`, or the prompt
  weighted against the response.
- :func:`run_sft`: a fresh model fine-tuned under one loss and seed, then evaluated.
- :func:`evaluate_responses`: per held-out example, the response's token losses (content and stop token),
  whether greedy decoding gives exactly the right answer, and the length it generates;
  :meth:`ResponseEval.rates` summarises exact answers, early and late stops.
- :func:`bucket_gradient_shares`: how much of one batch's gradient each response-length bucket supplies.
- :func:`accumulated_gradient`: the gradient of an optimizer step split into micro-batches, normalised
  the wrong way (mean of micro-batch means) or the right way (by the step's total token count).

Shapes: B examples, T positions; lengths count characters, the stop token included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from . import losses
from .instructions import (INSTRUCTION_PAD, INSTRUCTION_STOP, INSTRUCTION_VOCAB, CharTokenizer, Instruction,
                           InstructionBatch, instruction_batch, make_instructions)
from .losses import IGNORE_INDEX, SEQUENCE_REDUCTIONS
from .model import GPT, GPTConfig
from .train import BatchFn, BatchLoss, TrainConfig, TrainResult, train

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
        max_iters=400, learning_rate=3e-3, min_lr=3e-4, warmup_iters=50, weight_decay=0.0, eval_iters=0))
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
    examples per seed. ``full`` (GPU): 4-layer model 128 wide, 1,000 updates of 32 (eight passes over the
    4,000 training examples), 600 test examples.

    Why 1,000 at full: the chapter trains 30 such runs (six losses, five seeds). A model this small is
    bound by kernel-launch latency on a GPU, a few milliseconds per update whatever the batch, so the
    chapter's time is about updates x runs: 1,000 keeps it near three minutes on one GPU (an estimate;
    full scale has not been timed on a GPU yet)."""
    if scale == "small":
        return SFTSetup("small")
    if scale == "full":
        return SFTSetup("full", n_test=600, batch_size=32, train=TrainConfig(
            max_iters=1000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.0, eval_iters=0))
    raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")


@dataclass
class SFTRun:
    """A fine-tuned model with its training result (history, time) and held-out evaluation."""

    model: GPT
    result: TrainResult
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
    """Fine-tune a fresh model under ``setup`` with one loss and seed (through :func:`minigpt.train.train`),
    then evaluate it on held-out examples."""
    train_examples, test_examples = sft_data(setup, seed)
    batch_loss = sft_batch_loss(reduction=reduction, alpha=alpha, prompt_weight=prompt_weight)
    torch.manual_seed(seed)
    model = GPT(sft_model_config(setup.scale, setup.block_size)).to(device)
    t0 = time.perf_counter()
    result = train(model, sft_batch_fn(train_examples, setup.batch_size, device=device),
                   replace(setup.train, seed=seed), batch_loss=batch_loss)
    evaluation = evaluate_responses(model, test_examples, max_extra=setup.max_extra)
    return SFTRun(model, result, evaluation, time.perf_counter() - t0)


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


def sft_batch_fn(examples: list[Instruction], batch_size: int, *, device: torch.device | str = "cpu",
                 val_examples: list[Instruction] | None = None) -> BatchFn:
    """``get_batch(split, generator)`` for :func:`minigpt.train.train`: ``batch_size`` examples drawn with
    replacement from ``examples`` (``"train"``) or ``val_examples`` (``"val"``), as an
    :class:`~minigpt.instructions.InstructionBatch` on ``device``."""
    if not examples:
        raise ValueError("examples must not be empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pools = {"train": examples, "val": val_examples}

    def get_batch(split: str, generator: torch.Generator) -> InstructionBatch:
        pool = pools.get(split)
        if pool is None:
            allowed = "'train' or 'val'" if val_examples else "'train' (no val_examples were given)"
            raise ValueError(f"split must be {allowed}, got {split!r}")
        picks = torch.randint(0, len(pool), (batch_size,), generator=generator).tolist()
        return instruction_batch([pool[i] for i in picks], TOKENIZER).to(device)

    return get_batch


def sft_item_count(labels: torch.Tensor, reduction: str) -> int | torch.Tensor:
    """What ``reduction`` averages over in a batch with ``labels`` (B, T): target tokens
    (``"token_mean"``), sequences with at least one target (``"sequence_mean"``, ``"length_normalized"``),
    or 1 (``"sum"``: a batch's loss is its sum). An int on the CPU, else a 0-d tensor (no device wait)."""
    kept = labels != IGNORE_INDEX
    if reduction == "sum":
        return 1
    count = kept.sum() if reduction == "token_mean" else kept.any(1).sum()
    return int(count) if count.device.type == "cpu" else count


def sft_batch_loss(*, reduction: str = "token_mean", alpha: float = 0.5, prompt_weight: float = 0.0) -> BatchLoss:
    """The fine-tuning loss as a ``batch_loss(model, batch) -> (loss_sum, n_items)`` for
    :func:`minigpt.train.train` (``loss_sum / n_items`` is the loss of the batch).

    Args:
        reduction: how response tokens' losses combine, one of ``minigpt.losses.SEQUENCE_REDUCTIONS``;
            the loss is :func:`minigpt.losses.sft_loss`.
        alpha: exponent of ``"length_normalized"`` (the loss divides each sequence's sum by ``T**alpha``).
        prompt_weight: 0 masks the prompt with :func:`minigpt.losses.mask_prompt` (only the response takes
            a loss); 1 trains on the whole sequence; values between weight prompt tokens against response
            tokens (the source notes use 0.1), ``sum w l / sum w``. Weights other than 0 combine with
            ``"token_mean"`` only.
    """
    if reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEQUENCE_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= prompt_weight:
        raise ValueError(f"prompt_weight must be >= 0, got {prompt_weight}")
    if prompt_weight > 0 and reduction != "token_mean":
        raise ValueError(f"prompt_weight > 0 is defined for reduction='token_mean' only, got {reduction!r}")

    def batch_loss(model: nn.Module, batch: InstructionBatch) -> tuple[torch.Tensor, int | torch.Tensor]:
        logits, _ = model(batch.x)
        if prompt_weight == 0:
            labels = losses.mask_prompt(batch.y, batch.prompt_lengths)
            # num_items=1: the reduction's sum over the batch; train divides by the update's items
            loss_sum = losses.sft_loss(logits, labels, reduction=reduction, alpha=alpha, num_items=1)
            return loss_sum, sft_item_count(labels, reduction)
        nll = losses.token_nll(logits, batch.y)
        weights = torch.where(batch.response_mask, 1.0, prompt_weight) * (batch.y != IGNORE_INDEX)
        weights = weights.to(nll.dtype)
        return (nll * weights).sum(), weights.sum()

    return batch_loss


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


@dataclass(frozen=True)
class ResponseRates:
    """Fractions (0 to 1) of ``n`` held-out examples: ``exact`` (greedy decoding gives the correct
    response), ``early`` (it stops before the correct length), ``late`` (it runs past it, or never stops)."""

    exact: float
    early: float
    late: float
    n: int


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

    def rates(self) -> "ResponseRates":
        """Shares of the examples answered exactly, stopped too early and run on too long."""
        n = len(self.task)
        return ResponseRates(exact=float(self.exact.double().mean()),
                             early=float((self.length_error < 0).double().mean()),
                             late=float((self.length_error > 0).double().mean()), n=n)

    def by_task(self) -> dict[str, "ResponseRates"]:
        """:meth:`rates` for each task, in the order the tasks first appear."""
        tasks = list(dict.fromkeys(self.task))
        return {t: self.select(torch.tensor([x == t for x in self.task])).rates() for t in tasks}

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
        batch = instruction_batch(chunk, TOKENIZER).to(device)
        y = losses.mask_prompt(batch.y, batch.prompt_lengths)
        logits, _ = model(batch.x)
        nll = losses.token_nll(logits, y)
        kept = y != IGNORE_INDEX
        is_stop = kept & (y == STOP_ID)
        parts["stop"].append((nll * is_stop).sum(1))
        parts["content"].append((nll * (kept & ~is_stop)).sum(1))
        pred = logits.argmax(-1)
        wrong = kept & (pred != y)
        parts["exact"].append(~wrong.any(1))
        first_pos = torch.where(wrong.any(1), wrong.float().argmax(1), torch.zeros_like(wrong[:, 0], dtype=torch.long))
        # response index of the first error: positions count from the one that predicts the first character
        parts["first"].append(first_pos - batch.prompt_lengths)
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
    batch = instruction_batch(examples, TOKENIZER).to(device)
    y = losses.mask_prompt(batch.y, batch.prompt_lengths)
    mask = y != IGNORE_INDEX
    weights = losses.token_weights(mask, reduction=reduction, alpha=alpha).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    logits, _ = model(batch.x)
    nll = torch.where(mask, losses.token_nll(logits, y), 0.0)
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
    ``normalise="global"``: each micro-batch's token sum divided by the step's total token count, which
    is what :func:`minigpt.train.train` does. Only ``"global"`` equals the gradient of the token mean over
    the union of the micro-batches.
    """
    if normalise not in ("micro_mean", "global"):
        raise ValueError(f"normalise must be 'micro_mean' or 'global', got {normalise!r}")
    if not micro_batches or any(len(mb) == 0 for mb in micro_batches):
        raise ValueError("micro_batches must be a non-empty list of non-empty batches")
    device = _device(model)
    batch_loss = sft_batch_loss(reduction="token_mean")
    total_tokens = sum(e.response_length for mb in micro_batches for e in mb)
    params = [p for p in model.parameters() if p.requires_grad]
    grad = [torch.zeros_like(p) for p in params]
    for mb in micro_batches:
        loss_sum, n_tokens = batch_loss(model, instruction_batch(mb, TOKENIZER).to(device))
        loss = loss_sum / total_tokens if normalise == "global" else loss_sum / n_tokens / len(micro_batches)
        for acc, g in zip(grad, torch.autograd.grad(loss, params)):
            acc += g
    return torch.cat([g.reshape(-1) for g in grad])
