"""Each chapter's settings at each scale, in one place.

A chapter reads its setup from here (``foundations_setup(minigpt.scale())``), and
``tests/test_full_scale.py`` builds every chapter's ``full`` setup on the CPU and runs two updates of
each of its trainings, so a crash, a shape error or a device mix-up in a ``full`` code path cannot hide
until a reader with a GPU meets it. Chapter 6's setup is :func:`minigpt.sft.sft_setup`, beside the
fine-tuning code it configures.

``small`` is what CI and a CPU run (minutes per chapter); ``full`` is the default on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SCALES
from .model import GPTConfig
from .train import TrainConfig


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


@dataclass(frozen=True)
class FoundationsSetup:
    """Chapter 1: the character GPT on tiny Shakespeare.

    ``run`` is the main training run; ``overfit`` the runs on the first ``overfit_chars`` characters of
    the training text. At ``full`` the main run stops at 1,500 updates, before the point (about 1,750 in
    nanoGPT's log for this model) where its validation loss turns up: the chapter uses it as a run that
    is still improving.
    """

    scale: str
    model: GPTConfig
    batch_size: int
    run: TrainConfig
    overfit: TrainConfig
    n_seeds: int = 3
    overfit_chars: int = 2000


def foundations_setup(scale: str) -> FoundationsSetup:
    """``small``: nanoGPT's CPU model (0.8M parameters, block 64, batch 12), 600 updates. ``full``:
    nanoGPT's GPU model for character Shakespeare (10.7M parameters, block 256, batch 64, dropout 0.2),
    1,500 updates."""
    _check_scale(scale)
    if scale == "small":
        return FoundationsSetup(
            scale, GPTConfig(vocab_size=65), 12,
            TrainConfig(max_iters=600, eval_interval=50, eval_iters=10, warmup_iters=50),
            TrainConfig(max_iters=300, eval_interval=20, eval_iters=5, warmup_iters=20))
    return FoundationsSetup(
        scale, GPTConfig.for_scale("full", 65), 64,
        TrainConfig(max_iters=1500, eval_interval=100, eval_iters=20, warmup_iters=100),
        TrainConfig(max_iters=600, eval_interval=20, eval_iters=5, warmup_iters=20))


@dataclass(frozen=True)
class RegressionSetup:
    """Chapter 2: linear models on diabetes, ``n_seeds`` splits fitted side by side, ``fit_steps``
    full-batch Adam steps each."""

    scale: str
    n_seeds: int
    fit_steps: int


def regression_setup(scale: str) -> RegressionSetup:
    """``small``: 30 splits, 2,000 steps. ``full``: 60 splits, 4,000 steps."""
    _check_scale(scale)
    return RegressionSetup(scale, 30, 2000) if scale == "small" else RegressionSetup(scale, 60, 4000)


@dataclass(frozen=True)
class ClassificationSetup:
    """Chapter 3: ``n_seeds`` splits for the full-batch experiments; the two network experiments
    (segmentation, contrastive) train one network per seed and loss on the first ``n_network_seeds``."""

    scale: str
    n_seeds: int
    n_network_seeds: int = 5
    seg_steps: int = 200
    seg_batch: int = 64
    con_steps: int = 150
    con_batch: int = 128


def classification_setup(scale: str) -> ClassificationSetup:
    """``small``: 8 splits. ``full``: 20 splits (the network experiments are the same size)."""
    _check_scale(scale)
    return ClassificationSetup(scale, 8 if scale == "small" else 20)
