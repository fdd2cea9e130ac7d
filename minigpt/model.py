"""A GPT language model in one file, after nanoGPT's ``model.py``.

Pre-LayerNorm transformer blocks, causal scaled-dot-product attention, token and learned position
embeddings, the output head tied to the token embedding, GPT-2 initialisation with scaled residual
projections. What this version adds for the book: the training loss is pluggable (chapters swap it), and
per-token losses are one argument away (``reduction="none"``), because length bias and masking are about
how those per-token numbers are combined.

Shapes: B = batch, T = sequence length (<= block_size), C = n_embd, V = vocab_size, nh = heads,
hs = C // nh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import IGNORE_INDEX, REDUCTIONS, cross_entropy, linear_cross_entropy

# A token-level loss with torch.nn.functional's calling convention:
#     loss_fn(input (N, V) logits, target (N,) int64, reduction="mean"|"sum"|"none") -> tensor
LossFn = Callable[..., torch.Tensor]


@dataclass
class GPTConfig:
    """Model size. The defaults are nanoGPT's CPU configuration for character-level Shakespeare."""

    block_size: int = 64  # longest sequence the position embedding covers
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm; without them it is a little faster and no worse
    # Train through losses.linear_cross_entropy: the loss comes from the last hidden states and the
    # output matrix chunk by chunk, and the (B, T, V) logits never exist. Worth it for large vocabularies;
    # for 65 characters the logits are smaller than the hidden states, so it is off by default.
    linear_cross_entropy: bool = False
    # Where each block's LayerNorm sits: "pre" (GPT-2, nanoGPT: x + f(LN(x)), the residual stream never
    # normalised) or "post" (the original Transformer: LN(x + f(x))). Chapter 4 compares the two.
    norm_position: str = "pre"
    # GPT-2's residual-projection init, std 0.02 / sqrt(2 * n_layer); False: std 0.02 like every Linear
    scale_residual_init: bool = True

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")

    @classmethod
    def for_scale(cls, scale: str, vocab_size: int = 65) -> "GPTConfig":
        """``small``: nanoGPT's CPU model (0.8M parameters). ``full``: nanoGPT's GPU model for
        character-level Shakespeare (10.7M parameters, block 256, dropout 0.2)."""
        if scale == "small":
            return cls(vocab_size=vocab_size)
        if scale == "full":
            return cls(block_size=256, vocab_size=vocab_size, n_layer=6, n_head=6, n_embd=384, dropout=0.2)
        raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # is_causal masks the future: position t attends to positions <= t only, which is what makes the
        # next-token loss at every position an honest prediction
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block (the default): normalise, transform, add back. The residual stream itself is
    never normalised, so gradients reach early layers through the identity path. With
    ``norm_position="post"`` the block adds, then normalises (Vaswani et al. 2017): every path back to
    the input passes through a LayerNorm, which Xiong et al. 2020 show makes gradients grow toward the
    output."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        config: sizes, see :class:`GPTConfig`.
        loss_fn: the training loss, called as ``loss_fn(logits (N, V), targets (N,), reduction=...)``
            with N = B*T. Default ``F.cross_entropy`` (``ignore_index=IGNORE_INDEX``). Any loss from
            ``minigpt.losses`` with torch's conventions fits.
    """

    def __init__(self, config: GPTConfig, loss_fn: LossFn | None = None):
        super().__init__()
        self.config = config
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the input embedding and the output projection share one
        # matrix, which saves V*C parameters and trains as well or better.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two projections into the residual stream, so the stream's
        # variance grows with depth; shrinking those projections by 1/sqrt(2 * n_layer) offsets it.
        # (With post-LN the final LayerNorm ln_f is kept: on an already normalised stream it only adds a gain.)
        for name, param in self.named_parameters():
            if config.scale_residual_init and name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token embedding is tied to
        the head, so it counts as the head's weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _check_ids(self, name: str, ids: torch.Tensor, allow_ignore: bool) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype != torch.long:
            raise ValueError(f"{name} must have dtype torch.int64 (token ids), got {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(ids.shape)}")
        if ids.shape[1] > self.config.block_size:
            raise ValueError(
                f"{name} has sequence length {ids.shape[1]}, longer than block_size={self.config.block_size}"
            )
        if ids.shape[1] == 0:
            raise ValueError(f"{name} has sequence length 0")
        if ids.device.type != "cpu":
            # Reading a value check back from an accelerator stalls it once per call. minigpt's batches
            # are checked on the CPU before the copy (the corpus's ids once at load, instruction batches
            # when they are built); on the device an id out of range fails in the embedding instead.
            return
        V = self.config.vocab_size
        out_of_range = (ids < 0) | (ids >= V)
        if allow_ignore:
            out_of_range &= ids != IGNORE_INDEX
        if bool(out_of_range.any()):
            bad = ids[out_of_range][:5].tolist()
            allowed = f"[0, {V}) or {IGNORE_INDEX} (ignored)" if allow_ignore else f"[0, {V})"
            raise ValueError(f"{name} holds ids outside {allowed}: {bad}")

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss_fn: LossFn | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the loss if targets are given.

        Args:
            idx: (B, T) int64 token ids, T <= block_size.
            targets: (B, T) int64 next-token ids; ``IGNORE_INDEX`` marks a position that takes no loss.
                Id values are checked on the CPU only (see ``_check_ids``); shapes and dtypes always.
            loss_fn: overrides the model's loss for this call.
            reduction: ``"mean"`` (over non-ignored tokens), ``"sum"``, or ``"none"``: per-token losses
                of shape (B, T), zero at ignored positions.
        Returns:
            logits (B, T, V) and the loss (a scalar, or (B, T) for ``reduction="none"``), or None.
            With ``config.linear_cross_entropy`` and targets, the logits are never formed: (None, loss).
        """
        self._check_ids("idx", idx, allow_ignore=False)
        if targets is not None:
            self._check_ids("targets", targets, allow_ignore=True)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if targets.device.type == "cpu" and bool((targets == IGNORE_INDEX).all()):
                raise ValueError(f"targets are all ignored ({IGNORE_INDEX}): a fully masked batch has no loss to take")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        fn = loss_fn if loss_fn is not None else self.loss_fn
        if targets is not None and self.config.linear_cross_entropy:
            if fn not in (F.cross_entropy, cross_entropy):
                raise ValueError("GPTConfig.linear_cross_entropy computes cross-entropy from the hidden states; "
                                 f"loss_fn must be F.cross_entropy or minigpt.losses.cross_entropy, got {fn!r}")
            loss = linear_cross_entropy(x, self.lm_head.weight, targets, reduction=reduction)
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = fn(logits.reshape(B * T, -1), targets.reshape(B * T), reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each sequence in ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

        ``temperature`` divides the logits (0 means greedy argmax); ``top_k`` keeps only the k most likely
        tokens; once a row emits ``stop_token`` it is finished and is padded with ``stop_token`` until
        every row has finished, when generation ends early. Returns (B, T + generated) int64.
        Call ``model.eval()`` first if the model has dropout.
        """
        self._check_ids("idx", idx, allow_ignore=False)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must lie in [1, {self.config.vocab_size}], got {top_k}")
        if stop_token is not None and not 0 <= stop_token < self.config.vocab_size:
            raise ValueError(f"stop_token must lie in [0, {self.config.vocab_size}), got {stop_token}")
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # the model sees at most block_size tokens
            logits, _ = self(context)
            logits = logits[:, -1, :]  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                if generator is not None and generator.device != probs.device:
                    next_id = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
                else:
                    next_id = torch.multinomial(probs, 1, generator=generator)
            if stop_token is not None:
                next_id = next_id.masked_fill(finished[:, None], stop_token)
                finished |= next_id[:, 0] == stop_token
            idx = torch.cat([idx, next_id], dim=1)
            if stop_token is not None and bool(finished.all()):
                break
        return idx
