"""Following the gradient through a network (chapter 4): a plain deep MLP whose depth, activation,
residual connections and LayerNorm are switches, per-layer and per-block gradient norms, fault
injections for the diagnostics report, and the chapter's setup at each scale.

- :class:`DeepMLP`: ``depth`` linear layers on (N, F) inputs; the hidden layers optionally residual
  (``h + act(W h)``) and pre-normalised (``h + act(W LN(h))``).
- :func:`layer_gradient_norms`: the L2 norm of each linear layer's weight gradient after one backward
  pass of the mean cross-entropy, input layer first.
- :func:`block_gradient_norms`: a GPT's gradient norm per transformer block (all its parameters
  together), averaged over a few batches, at the current weights, without changing them.
- :func:`training_block_gradient_norms`: train a GPT through :func:`minigpt.train.train` and return each
  block's gradient norm averaged over the run and measured again at the trained weights.
- :func:`detach_output` and :func:`nan_in_embedding`: forward hooks that break a model on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SCALES
from .diagnostics import GradientRecorder
from .model import GPTConfig
from .train import TrainConfig, train

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


class DeepMLP(nn.Module):
    """``depth`` linear layers: input (F -> width), ``depth - 2`` hidden (width -> width), output
    (width -> classes), with ``activation`` after every layer but the last.

    Args:
        n_features, width, n_classes: layer sizes.
        depth: number of linear layers, at least 2.
        activation: ``"sigmoid"``, ``"tanh"``, ``"relu"`` or ``"gelu"``.
        residual: hidden layers add their output to their input, ``h + act(W h)``.
        layer_norm: hidden layers normalise their input first, ``act(W LN(h))`` (pre-LN), and the output
            layer reads ``LN(h)``.
        generator: draws the initial weights (``nn.Linear``'s uniform in +-1/sqrt(fan_in)), so a seed
            fixes them.
    """

    def __init__(self, n_features: int, width: int, n_classes: int, depth: int, activation: str = "relu", *,
                 residual: bool = False, layer_norm: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"depth must be an int >= 2, got {depth!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if min(n_features, width, n_classes) < 1:
            raise ValueError(f"n_features, width and n_classes must be positive, got {n_features}, {width}, {n_classes}")
        self.act, self.residual, self.use_norm = ACTIVATIONS[activation], residual, layer_norm
        sizes = [n_features] + [width] * (depth - 1) + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth - 1)) if layer_norm else None
        with torch.no_grad():
            for layer in self.layers:  # nn.Linear's own init, drawn from the generator
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.layers[0](x))  # (N, width)
        for i, layer in enumerate(self.layers[1:-1]):
            inner = self.norms[i](h) if self.use_norm else h
            out = self.act(layer(inner))
            h = h + out if self.residual else out
        if self.use_norm:
            h = self.norms[-1](h)
        return self.layers[-1](h)  # (N, classes) logits


def layer_gradient_norms(model: DeepMLP, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The L2 norm of each linear layer's weight gradient (input layer first) for the mean cross-entropy
    of ``model(X)`` against class ids ``y``; the model's gradients are left cleared."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), y).backward()
    norms = [float(layer.weight.grad.norm()) for layer in model.layers]
    model.zero_grad(set_to_none=True)
    return norms


def block_gradient_norms(model: nn.Module, batches) -> list[float]:
    """A GPT's gradient norm per transformer block (the L2 norm over all the block's parameters) for the
    model's mean loss, averaged over ``batches`` of ``(x, y)``; block 0 first. Weights do not change and
    the gradients are left cleared."""
    blocks = list(model.transformer.h)
    sums = [0.0] * len(blocks)
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one (x, y) batch")
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        for i, block in enumerate(blocks):
            sums[i] += math.sqrt(sum(float(p.grad.norm()) ** 2 for p in block.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return [s / len(batches) for s in sums]


def training_block_gradient_norms(model: nn.Module, get_batch, config: TrainConfig, batches, *,
                                  every: int = 5) -> tuple[list[float], list[float]]:
    """Train a GPT with :func:`minigpt.train.train` and follow each transformer block's gradient norm.

    Args:
        model: a :class:`minigpt.model.GPT` (its blocks are ``model.transformer.h``); it is trained in place.
        get_batch, config: passed to :func:`minigpt.train.train`.
        batches: ``(x, y)`` batches for the measurement at the trained weights (as in
            :func:`block_gradient_norms`).
        every: record the blocks' gradient norms (before clipping) every ``every`` updates.

    Returns:
        ``(during, after)``, block 0 first: ``during[b]`` is block ``b``'s gradient norm (all its parameters
        together) averaged over the recorded updates; ``after[b]`` is :func:`block_gradient_norms` at the
        weights the run ends with.
    """
    recorder = GradientRecorder(every=every)
    train(model, get_batch, config, grad_hook=recorder)
    series = recorder.group_series(depth=3)
    n_blocks = len(model.transformer.h)
    during = [float(np.mean(series[f"transformer.h.{b}"])) for b in range(n_blocks)]
    return during, block_gradient_norms(model, batches)


def detach_output(module: nn.Module):
    """Cut the graph at ``module``'s output (a forward hook returns it detached): everything before it
    stops receiving gradients. Returns the hook's handle; ``handle.remove()`` repairs the model."""
    return module.register_forward_hook(lambda _m, _inputs, output: output.detach())


def nan_in_embedding(embedding: nn.Module, row: int = 0, position: int = 0):
    """Make one input NaN where it first becomes floating point: the embedding vector of token
    ``position`` in sequence ``row`` of every batch (token ids are integers and cannot hold a NaN).
    Returns the hook's handle."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[row, position] = float("nan")
        return output

    return embedding.register_forward_hook(hook)


@dataclass(frozen=True)
class GradientFlowSetup:
    """Chapter 4's settings.

    ``gpt`` is the character GPT for the transformer experiments (its ``n_layer`` is replaced by each of
    ``depths``); ``batch_size`` its batch. ``mlp_depths``, ``mlp_width``: the plain MLPs on digits.
    ``ln_run``: the pre-LN/post-LN runs at a high learning rate (with and without warmup); ``sweep_run``
    and ``lrs``: the learning-rate sweep; ``clip_run`` and ``clips``: the clipping runs; ``short_run``: the
    short runs at the book's learning rate that follow each block's gradient in the deepest model;
    The diagnostics report's healthy and faulty runs use ``sweep_run`` at the base learning rate.
    """

    scale: str
    gpt: GPTConfig
    batch_size: int
    depths: tuple[int, ...]
    ln_depth: int
    ln_run: TrainConfig
    ln_warmup: int
    sweep_run: TrainConfig
    lrs: tuple[float, ...]
    clip_run: TrainConfig
    clips: tuple[float | None, ...]
    short_run: TrainConfig
    n_seeds: int = 5
    n_init_seeds: int = 5
    init_batches: int = 4
    mlp_depths: tuple[int, ...] = (2, 4, 8, 16)
    mlp_width: int = 64


def gradient_flow_setup(scale: str) -> GradientFlowSetup:
    """``small``: a 64-wide character GPT (4 heads, block 32, batch 16), runs of 100 to 120 updates, 5
    seeds for training and at initialisation (every 95% interval rests on at least 5 seeds). ``full``:
    nanoGPT's CPU model width (128, block 64, batch 12), runs three times as long, 5 training seeds (10 at
    initialisation)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    quiet = dict(progress=False)
    if scale == "small":
        gpt, batch, k, seeds = GPTConfig(block_size=32, vocab_size=65, n_layer=4, n_head=4, n_embd=64), 16, 1, 5
    else:
        gpt, batch, k, seeds = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128), 12, 3, 5
    return GradientFlowSetup(
        scale, gpt, batch, depths=(2, 4, 8), ln_depth=4,
        ln_run=TrainConfig(max_iters=120 * k, learning_rate=1e-2, min_lr=1e-3, warmup_iters=0, grad_clip=None,
                           eval_iters=0, on_nonfinite="stop", **quiet),
        ln_warmup=40 * k,
        sweep_run=TrainConfig(max_iters=100 * k, warmup_iters=0, min_lr=1e-9, grad_clip=None, eval_iters=0,
                              weight_decay=0.0, on_nonfinite="stop", **quiet),
        lrs=(1e-3, 1e-2, 1e-1, 1.0),
        clip_run=TrainConfig(max_iters=100 * k, warmup_iters=10 * k, eval_interval=100 * k, eval_iters=10, **quiet),
        clips=(0.2, 0.5, 1.0, None),
        short_run=TrainConfig(max_iters=40 * k, warmup_iters=5 * k, eval_iters=0, **quiet),
        n_seeds=seeds, n_init_seeds=seeds if scale == "small" else 2 * seeds,
    )
