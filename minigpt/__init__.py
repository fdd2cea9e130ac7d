"""minigpt: the small PyTorch package behind *Loss Functions, Measured*.

Where things are (one module each):

- ``config``: scale, seeds, device, threads, progress bars, TF32 (the ``MINIGPT_*`` knobs).
- ``data``: real data: tiny Shakespeare, and scikit-learn's diabetes, breast-cancer and digits sets
  (one split, or many stacked for side-by-side fits).
- ``synthetic``: data with a known ground truth: corruption models (outliers, label flips, imbalance),
  blob segmentation images, augmented digit views.
- ``instructions``: the synthetic instruction set with known answers (chapter 6).
- ``model``: the GPT. ``small_models``: linear models, MLPs and a small conv net, and full-batch fits of
  many of them side by side.
- ``train``: the one training loop (any model, any batch loss). ``sft``: the fine-tuning task on the
  instruction set and its evaluation.
- ``losses``: loss functions (regression, classification, token-level, sequence, VAE).
- ``multitask``: multi-task loss weighting. ``fusion``: chapter 7's two-view gated-fusion model trained with
  any of those weightings. ``metrics``: accuracy, F1, PR-AUC, calibration, coverage.
- ``diagnostics``: loss curves, gradient and weight statistics, a text report, LR range test, loss
  landscapes, label noise.
- ``experiments``: runs over seeds, intervals, paired comparisons, tables. ``report``: glued prose.
- ``bench``, ``loss_bench``: throughput and quality against nanoGPT's loop; cost of token-level losses.
"""

from . import config
from .config import base_seed, configure_threads, device, scale, seed_everything, seeds
from .data import CharTokenizer, load_breast_cancer, load_diabetes, load_digits, load_shakespeare
from .model import GPT, GPTConfig
from .train import (TrainConfig, TrainingDiverged, TrainResult, evaluate, language_model_loss, load_model, lr_at,
                    train)

__version__ = "0.1.0"

configure_threads()
config.configure_cuda()

__all__ = [
    "config", "base_seed", "configure_threads", "device", "scale", "seed_everything", "seeds",
    "CharTokenizer", "load_breast_cancer", "load_diabetes", "load_digits", "load_shakespeare",
    "GPT", "GPTConfig", "TrainConfig", "TrainingDiverged", "TrainResult", "evaluate", "load_model",
    "language_model_loss", "lr_at", "train",
]
