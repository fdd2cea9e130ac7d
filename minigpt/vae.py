"""A sentence VAE with an autoregressive minigpt decoder (chapter 9), after Bowman et al. 2016.

Each example is one line of tiny Shakespeare. The encoder, a small :class:`minigpt.model.GPT` stack read at
the line's last character (causal attention: that position has seen the whole line), gives a diagonal
Gaussian posterior ``q(z|x) = N(mu, exp(logvar))`` over ``latent_dim`` dimensions. The decoder, another
GPT, predicts the line character by character with ``W z`` added to every position's input embedding, so
it can use z at every step, or ignore it and model the line on its own: posterior collapse, which a
strong autoregressive decoder under the full KL weight reaches easily.

Everything trains through :func:`minigpt.train.train`: :class:`VAELoss` is the ``batch_loss`` (the
negative ELBO per line, with a KL weight beta that may follow a schedule over the updates, and free bits),
and it logs the loss components of every update. :func:`latent_stats` measures a trained model on held-out
lines: reconstruction with z and with z shuffled across lines, KL per dimension, active units, and the
negative ELBO at beta = 1.

Shapes: B lines, T = ``max_len + 1`` positions (a newline opens the decoder's input and ends its target),
D latent dimensions. Losses are in nats per line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import CharTokenizer, shakespeare_path
from .diagnostics import LossTracker, convergence_summary
from .losses import IGNORE_INDEX
from .losses.vae import active_units, cyclical_beta, free_bits_kl, gaussian_kl, linear_beta
from .model import GPT, GPTConfig
from .train import TrainConfig, TrainResult, train


# ----------------------------------------------------------------------------------------------------
# data: lines of tiny Shakespeare

@dataclass
class LineBatch:
    """``x``: decoder input (newline + line, padded with newlines); ``y``: decoder target (line + newline,
    padded with ``IGNORE_INDEX``); ``enc``: the encoder's input (line + newline, padded with newlines);
    ``last``: the position of the closing newline (where the encoder is read). All (B, T) but ``last`` (B,)."""

    x: torch.Tensor
    y: torch.Tensor
    enc: torch.Tensor
    last: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def index(self, i: torch.Tensor) -> "LineBatch":
        return LineBatch(self.x[i], self.y[i], self.enc[i], self.last[i])

    def to(self, device) -> "LineBatch":
        return LineBatch(*(t.to(device) for t in (self.x, self.y, self.enc, self.last)))


@dataclass
class ShakespeareLines:
    """The non-empty lines of tiny Shakespeare of ``min_len`` to ``max_len`` characters, those from the
    first 90% of the text for training, the rest for validation (nanoGPT's split, by lines)."""

    tokenizer: CharTokenizer
    train: LineBatch
    val: LineBatch
    max_len: int
    min_len: int = 8

    @classmethod
    def load(cls, max_len: int = 32, min_len: int = 8, train_fraction: float = 0.9) -> "ShakespeareLines":
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        text = shakespeare_path().read_text(encoding="utf-8")
        tokenizer = CharTokenizer.from_text(text)
        cut = int(len(text) * train_fraction)
        splits = [cls._encode(tokenizer, part, min_len, max_len) for part in (text[:cut], text[cut:])]
        return cls(tokenizer, splits[0], splits[1], max_len, min_len)

    @staticmethod
    def _encode(tokenizer: CharTokenizer, text: str, min_len: int, max_len: int) -> LineBatch:
        lines = [s for s in (line.strip() for line in text.split("\n")) if min_len <= len(s) <= max_len]
        nl = tokenizer.encode("\n")[0]
        T = max_len + 1
        x = torch.full((len(lines), T), nl, dtype=torch.long)
        y = torch.full((len(lines), T), IGNORE_INDEX, dtype=torch.long)
        enc = torch.full((len(lines), T), nl, dtype=torch.long)
        last = torch.empty(len(lines), dtype=torch.long)
        for i, line in enumerate(lines):
            ids = torch.tensor(tokenizer.encode(line) + [nl])
            n = len(ids)
            x[i, 1:n] = ids[:-1]
            y[i, :n] = ids
            enc[i, :n] = ids
            last[i] = n - 1
        return LineBatch(x, y, enc, last)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch_fn(self, batch_size: int, device: torch.device | str = "cpu"):
        """``get_batch(split, generator) -> LineBatch`` of ``batch_size`` random lines, for :func:`train`."""
        splits = {"train": self.train.to(device), "val": self.val.to(device)}

        def get_batch(split: str, generator: torch.Generator | None = None) -> LineBatch:
            if split not in splits:
                raise ValueError(f"split must be 'train' or 'val', got {split!r}")
            data = splits[split]
            i = torch.randint(len(data), (batch_size,), generator=generator).to(data.x.device)
            return data.index(i)

        return get_batch


# ----------------------------------------------------------------------------------------------------
# the model

@dataclass(frozen=True)
class VAEConfig:
    """Sizes. ``n_layer`` and ``n_head`` are the decoder's (the transformer that models the sequence,
    like the guide's "transformer layers" above its set encoder); the encoder has ``encoder_layers``
    layers and ``encoder_heads`` heads. The feed-forward width is GPT's 4 * n_embd."""

    vocab_size: int = 65
    max_len: int = 32
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 32
    latent_dim: int = 16
    encoder_layers: int = 1
    encoder_heads: int = 2

    def __post_init__(self):
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {self.latent_dim!r}")
        self.decoder_gpt, self.encoder_gpt  # GPTConfig checks the rest

    @property
    def decoder_gpt(self) -> GPTConfig:
        return GPTConfig(block_size=self.max_len + 1, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    @property
    def encoder_gpt(self) -> GPTConfig:
        return replace(self.decoder_gpt, n_layer=self.encoder_layers, n_head=self.encoder_heads)


def _hidden(gpt: GPT, idx: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The GPT's final hidden states (B, T, C), with ``offset`` (B, 1, C) added to the input embeddings."""
    T = idx.shape[1]
    h = gpt.transformer.wte(idx) + gpt.transformer.wpe(torch.arange(T, device=idx.device))
    if offset is not None:
        h = h + offset
    for block in gpt.transformer.h:
        h = block(h)
    return gpt.transformer.ln_f(h)


class SequenceVAE(nn.Module):
    """Encoder GPT -> (mu, logvar) -> z -> decoder GPT conditioned on z (added to its input embeddings)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = GPT(config.encoder_gpt)
        self.to_posterior = nn.Linear(config.n_embd, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, config.n_embd, bias=False)
        self.decoder = GPT(config.decoder_gpt)
        # the encoder's output head is never used (its weight is tied to its embedding, which is)
        nn.init.normal_(self.to_posterior.weight, std=0.02)
        nn.init.zeros_(self.to_posterior.bias)
        nn.init.normal_(self.from_latent.weight, std=0.02)

    def encode(self, enc: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and (B,) last positions -> mu, logvar, each (B, D)."""
        h = _hidden(self.encoder, enc)  # (B, T, C)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        mu, logvar = self.to_posterior(h_last).chunk(2, dim=-1)
        return mu, logvar

    def reconstruction(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(line | z) per line (B,), in nats: the decoder's cross-entropy summed over the line."""
        h = _hidden(self.decoder, x, self.from_latent(z)[:, None, :])
        logits = self.decoder.lm_head(h)  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return nll.view(y.shape).sum(dim=1)

    def forward(self, batch: LineBatch, generator: torch.Generator | None = None):
        """Reconstruction per line (B,) with z drawn from q(z|x) (the reparameterisation trick), mu, logvar."""
        mu, logvar = self.encode(batch.enc, batch.last)
        eps = torch.randn(mu.shape, generator=generator, device="cpu").to(mu.device) if generator is not None \
            else torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.reconstruction(batch.x, batch.y, z), mu, logvar


# ----------------------------------------------------------------------------------------------------
# the loss, with its schedule and per-update log

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class BetaSchedule:
    """The KL weight at each update: ``"constant"``; ``"linear"``: KL annealing from 0 to ``beta`` over the
    first half of the run (Bowman et al. 2016); ``"cyclical"``: 4 cycles over ``steps``, each ramping over
    its first half (Fu et al. 2019). (A class rather than a closure so that runs can be pickled.)"""

    kind: str
    steps: int
    beta: float = 1.0

    def __post_init__(self):
        if self.kind not in ("constant", "linear", "cyclical"):
            raise ValueError(f"kind must be 'constant', 'linear' or 'cyclical', got {self.kind!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def __call__(self, step: int) -> float:
        if self.kind == "linear":
            return linear_beta(step, max(1, self.steps // 2), self.beta)
        if self.kind == "cyclical":
            return cyclical_beta(step, self.steps, 4, 0.5, self.beta)
        return self.beta


def constant_beta(beta: float) -> Schedule:
    return BetaSchedule("constant", 1, beta)


def beta_schedule(kind: str, steps: int, beta: float = 1.0) -> Schedule:
    """See :class:`BetaSchedule`."""
    return BetaSchedule(kind, steps, beta)


@dataclass
class VAELoss:
    """The ``batch_loss`` of a VAE for :func:`minigpt.train.train`: ``sum over lines of
    recon + beta(step) * KL_term`` and the number of lines, so the loop's mean is per line.

    ``KL_term`` is the Gaussian KL, or with ``free_bits > 0`` Kingma et al.'s free-bits KL: per latent
    dimension, ``max(free_bits, batch-mean KL)``. The update counter advances on every call in training
    mode (one micro-batch per update); evaluation calls (eval mode) use the current beta, z = mu, and are
    not logged. ``log`` holds, per update: ``recon`` and ``kl`` (the plain KL, unweighted, nats per line);
    ``betas`` the weight used, ``kl_per_dim`` the batch-mean KL of each dimension.
    """

    beta: Schedule | float = 1.0
    free_bits: float = 0.0
    step: int = 0
    log: LossTracker = field(default_factory=LossTracker)
    betas: list[float] = field(default_factory=list)
    kl_per_dim: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        if not self.free_bits >= 0:
            raise ValueError(f"free_bits must be >= 0, got {self.free_bits}")
        if not callable(self.beta):
            self.beta = constant_beta(float(self.beta))

    def weighted_log(self) -> LossTracker:
        """The log as the components enter the loss: ``recon`` and ``beta * kl`` (free bits aside)."""
        out = LossTracker()
        for i, step in enumerate(self.log.steps):
            out.update(step, recon=self.log.values["recon"][i], kl=self.betas[i] * self.log.values["kl"][i])
        return out

    def __call__(self, model: SequenceVAE, batch: LineBatch) -> tuple[torch.Tensor, int]:
        B = len(batch)
        if model.training:
            recon, mu, logvar = model(batch)
        else:
            mu, logvar = model.encode(batch.enc, batch.last)
            recon = model.reconstruction(batch.x, batch.y, mu)
        beta = self.beta(self.step)
        if self.free_bits > 0:
            fb = free_bits_kl(mu, logvar, free_bits=self.free_bits)
            kl_term, kl, per_dim = fb.loss, fb.kl, fb.per_group
        else:
            per_dim = gaussian_kl(mu, logvar, reduction="none").mean(dim=0)
            kl = kl_term = per_dim.sum()
        if model.training:
            self.step += 1
            self.log.update(self.step, recon=recon.detach().mean(), kl=kl.detach())
            self.betas.append(beta)
            self.kl_per_dim.append(per_dim.detach().cpu())
        return recon.sum() + beta * B * kl_term, B


# ----------------------------------------------------------------------------------------------------
# measuring a trained VAE

@dataclass
class LatentStats:
    """A VAE measured on held-out lines (nats per line unless stated)."""

    recon: float  # -log p(x | z = mu)
    recon_shuffled: float  # the same with each line's mu given to another line
    kl: float  # KL(q(z|x) || p(z)), mean over lines
    kl_per_dim: torch.Tensor  # (D,)
    active_units: int  # dimensions with Var_x[mu] > 0.01 (Burda et al. 2016)
    neg_elbo: float  # -ELBO at beta = 1: recon with z drawn from q, plus KL (an upper bound on -log p(x))
    chars_per_line: float
    mu: torch.Tensor  # (N, D) posterior means, for minigpt.diagnostics.posterior_collapse
    logvar: torch.Tensor

    @property
    def shuffle_gap(self) -> float:
        """How much worse the decoder does with another line's z: 0 when it ignores z."""
        return self.recon_shuffled - self.recon


@torch.no_grad()
def latent_stats(model: SequenceVAE, lines: LineBatch, *, seed: int = 0, batch_size: int = 512) -> LatentStats:
    """Measure ``model`` on ``lines`` (in eval mode; z drawn with a generator seeded by ``seed``, the
    shuffle a fixed permutation from the same seed)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    perm = torch.randperm(len(lines), generator=gen)
    mus, logvars = [], []
    recon = shuffled = sampled = 0.0
    for start in range(0, len(lines), batch_size):
        b = lines.index(torch.arange(start, min(start + batch_size, len(lines)))).to(device)
        mu, logvar = model.encode(b.enc, b.last)
        mus.append(mu), logvars.append(logvar)
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    for start in range(0, len(lines), batch_size):
        i = torch.arange(start, min(start + batch_size, len(lines)))
        b = lines.index(i).to(device)
        m, lv = mu[i.to(device)], logvar[i.to(device)]
        recon += float(model.reconstruction(b.x, b.y, m).sum())
        shuffled += float(model.reconstruction(b.x, b.y, mu[perm[i].to(device)]).sum())
        eps = torch.randn(m.shape, generator=gen).to(device)
        sampled += float(model.reconstruction(b.x, b.y, m + torch.exp(0.5 * lv) * eps).sum())
    model.train(was_training)
    n = len(lines)
    kl_per_dim = gaussian_kl(mu, logvar, reduction="none").mean(dim=0).cpu()
    kl = float(kl_per_dim.sum())
    chars = float((lines.y != IGNORE_INDEX).sum()) / n
    return LatentStats(recon / n, shuffled / n, kl, kl_per_dim, active_units(mu.cpu()), sampled / n + kl, chars,
                       mu.cpu(), logvar.cpu())


# ----------------------------------------------------------------------------------------------------
# the chapter's setup and runs

@dataclass(frozen=True)
class VAESetup:
    """Chapter 9's sizes. ``model`` is the guide's "after" architecture scaled to our model; the "before"
    has ``deep_layers`` layers and ``deep_heads`` heads (the guide's 4 -> 2 layers, 8 -> 4 heads)."""

    model: VAEConfig
    deep_layers: int
    deep_heads: int
    batch_size: int
    steps: int
    eval_interval: int
    eval_iters: int
    n_seeds: int
    n_eval_lines: int  # held-out lines measured by latent_stats
    lr: float  # our model's "after" rate; the guide's "before" is 5x higher (5e-5 -> 1e-5)

    @property
    def warmup_iters(self) -> int:
        """Linear warmup before the constant rate: a twentieth of the run."""
        return max(1, self.steps // 20)


def vae_setup(scale: str) -> VAESetup:
    """``small``: a 1-layer, 32-wide encoder and decoder, 16 latent dimensions, lines of up to 32
    characters, 5 seeds. ``full``: 2 layers, 128 wide, 32 dimensions, lines up to 64, 1500 updates a run (300
    updates took 4 to 8 seconds on an H200; the chapter trains 80 runs)."""
    if scale == "small":
        return VAESetup(VAEConfig(), deep_layers=2, deep_heads=4, batch_size=32, steps=200, eval_interval=20,
                        eval_iters=2, n_seeds=5, n_eval_lines=512, lr=2e-3)
    if scale == "full":
        return VAESetup(VAEConfig(max_len=64, n_layer=2, n_head=4, n_embd=128, latent_dim=32,
                                          encoder_layers=2, encoder_heads=4), deep_layers=4,
                        deep_heads=8, batch_size=64, steps=1500, eval_interval=50, eval_iters=10, n_seeds=5,
                        n_eval_lines=4096, lr=1e-3)
    raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")


@dataclass(frozen=True)
class VAERecipe:
    """One training configuration: the guide's knobs, in our model's units."""

    lr: float
    beta: float = 1.0
    schedule: str = "constant"  # "constant", "linear" or "cyclical" (beta is then the peak)
    free_bits: float = 0.0
    n_layer: int = 1
    n_head: int = 2
    grad_clip: float | None = 1.0
    weight_decay: float = 0.01
    patience: int | None = None  # evaluations without improvement of the validation objective

    def with_(self, **changes) -> "VAERecipe":
        return replace(self, **changes)


@dataclass
class VAERun:
    recipe: VAERecipe
    seed: int
    result: TrainResult
    loss: VAELoss
    stats: LatentStats
    model: SequenceVAE


def guide_recipes(setup: VAESetup) -> tuple[VAERecipe, VAERecipe]:
    """The guide's "before" and "after" configurations, scaled to our model: lr ``5 * setup.lr`` ->
    ``setup.lr``, beta 0.1 -> 0.01, free bits 0.03 -> 0.1, ``deep_layers``/``deep_heads`` -> the setup's
    model, clip 0.2 -> 1.0, weight decay 0.03 -> 0.01, patience 8 -> 15."""
    after = VAERecipe(lr=setup.lr, beta=0.01, free_bits=0.1, n_layer=setup.model.n_layer,
                      n_head=setup.model.n_head, grad_clip=1.0, weight_decay=0.01, patience=15)
    before = after.with_(lr=5 * setup.lr, beta=0.1, free_bits=0.03, n_layer=setup.deep_layers,
                         n_head=setup.deep_heads, grad_clip=0.2, weight_decay=0.03, patience=8)
    return before, after


def train_vae(setup: VAESetup, lines: ShakespeareLines, recipe: VAERecipe, seed: int, *,
              device: torch.device | str = "cpu", grad_hook=None, **train_overrides) -> VAERun:
    """Train one VAE with ``recipe`` through :func:`minigpt.train.train` (constant rate after a short
    warmup, AdamW) and measure it on the first ``setup.n_eval_lines`` validation lines."""
    torch.manual_seed(seed)  # the weights
    model = SequenceVAE(replace(setup.model, vocab_size=lines.vocab_size, n_layer=recipe.n_layer,
                                n_head=recipe.n_head)).to(device)
    steps = train_overrides.get("max_iters", setup.steps)
    loss = VAELoss(beta_schedule(recipe.schedule, steps, recipe.beta), recipe.free_bits)
    config = TrainConfig(**{**dict(
        max_iters=setup.steps, learning_rate=recipe.lr, min_lr=recipe.lr, warmup_iters=setup.warmup_iters,
        weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip, eval_interval=setup.eval_interval,
        eval_iters=setup.eval_iters, patience=recipe.patience, seed=seed, progress=False), **train_overrides})
    result = train(model, lines.batch_fn(setup.batch_size, device), config, batch_loss=loss, grad_hook=grad_hook)
    held_out = lines.val.index(torch.arange(min(setup.n_eval_lines, len(lines.val))))
    return VAERun(recipe, seed, result, loss, latent_stats(model, held_out, seed=seed), model)


def longest_stall(val_losses: list[float]) -> int:
    """The most evaluations in a row that failed to beat the best validation loss so far (min_delta 0)."""
    best, run, longest = math.inf, 0, 0
    for v in val_losses:
        if v < best:
            best, run = v, 0
        else:
            run += 1
            longest = max(longest, run)
    return longest


class VAERuns:
    """Trains recipes over seeds once and keeps the runs: the guide's "before" is one run per seed shared
    by every single change of the ablation, and a recipe that differs from a finished run only in its
    early-stopping patience, where that run's validation loss never stalled long enough for either
    patience to act, *is* that run (same seed, same updates) and is not trained again.

    ``runs(recipe, seeds)`` -> list of :class:`VAERun`; ``hooks`` maps a (recipe, seed) to the ``grad_hook``
    (a :class:`minigpt.diagnostics.GradientRecorder`, say) of a run that is to be inspected.
    """

    def __init__(self, setup: VAESetup, lines: ShakespeareLines, device: torch.device | str = "cpu"):
        self.setup, self.lines, self.device = setup, lines, device
        self.cache: dict[tuple[VAERecipe, int], VAERun] = {}
        self.reused: list[tuple[VAERecipe, int]] = []  # runs taken from a patience-only twin
        self.hooks: dict[tuple[VAERecipe, int], Callable] = {}
        self.seconds = 0.0  # spent training

    def _twin(self, recipe: VAERecipe, seed: int) -> VAERun | None:
        for (other, s), run in self.cache.items():
            if s != seed or other.with_(patience=recipe.patience) != recipe:
                continue
            patiences = [p for p in (recipe.patience, other.patience) if p is not None]
            if len(patiences) == 2 and longest_stall(run.result.history.val_loss) < min(patiences):
                return run
        return None

    def __call__(self, recipe: VAERecipe, seeds) -> list[VAERun]:
        out = []
        for seed in seeds:
            key = (recipe, seed)
            if key not in self.cache:
                twin = None if key in self.hooks else self._twin(recipe, seed)  # a hooked run must run
                if twin is not None:
                    self.cache[key] = replace(twin, recipe=recipe)
                    self.reused.append(key)
                else:
                    started = time.perf_counter()
                    self.cache[key] = train_vae(self.setup, self.lines, recipe, seed, device=self.device,
                                                grad_hook=self.hooks.get(key))
                    self.seconds += time.perf_counter() - started
            out.append(self.cache[key])
        return out


def summarise(run: VAERun) -> dict[str, float]:
    """One run's numbers, for tables and comparisons over seeds. Held-out (``latent_stats``): ``kl``,
    ``active``, ``recon``, ``gap`` (z-shuffle gap), ``neg_elbo`` (at beta = 1), all nats per line but
    ``active``. Training: ``train_loss``, the training objective's mean over the second half of the run
    (what the guide reads as "the loss"), and ``volatility``, the spread of the per-update objective around
    its trend there, relative to its mean (:func:`minigpt.diagnostics.convergence_summary`); ``clipped``,
    the share of updates whose gradient norm exceeded the clip; ``grad_norm``, the median gradient norm
    before clipping; ``stopped_early`` (0 or 1)."""
    h, s, clip = run.result.history, run.stats, run.recipe.grad_clip
    if len(h.loss) >= 5:
        tail = convergence_summary(h.step, h.loss, window=max(5, len(h.loss) // 2))
        train_loss, volatility = tail.final, tail.volatility
    else:  # too short for a trend
        train_loss, volatility = float(sum(h.loss) / max(1, len(h.loss))), math.nan
    norms = torch.tensor(h.grad_norm)
    return dict(kl=s.kl, active=float(s.active_units), recon=s.recon, gap=s.shuffle_gap, neg_elbo=s.neg_elbo,
                train_loss=train_loss, volatility=volatility,
                clipped=float((norms > clip).float().mean()) if clip else 0.0, grad_norm=float(norms.median()),
                stopped_early=float(run.result.stop_reason == "early_stopping"))
