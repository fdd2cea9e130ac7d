"""minigpt: the small PyTorch package behind *Loss Functions, Measured*.

Modules: ``config`` (scale, seeds, device, threads), ``data`` (tiny Shakespeare, scikit-learn sets),
``model`` (the GPT), ``train`` (the shared training loop), ``tabular`` (small models fitted
full-batch on the scikit-learn sets), ``losses`` (loss functions),
``multitask`` (multi-task loss weighting),
``metrics`` (accuracy, F1, PR-AUC, calibration, interval coverage), ``diagnostics`` (loss curves,
gradient and weight statistics, a text report, LR range test, loss landscapes, label noise),
``experiments`` (runs over seeds, intervals, paired comparisons, tables), ``report`` (glued prose for
the chapters),
``bench`` (throughput and quality benchmark against nanoGPT's loop).
"""

from . import config
from .config import base_seed, configure_threads, device, scale, seed_everything, seeds
from .data import CharTokenizer, load_breast_cancer, load_diabetes, load_digits, load_shakespeare
from .model import GPT, GPTConfig
from .train import TrainConfig, TrainingDiverged, TrainResult, evaluate, load_model, lr_at, train

__version__ = "0.1.0"

configure_threads()

__all__ = [
    "config", "base_seed", "configure_threads", "device", "scale", "seed_everything", "seeds",
    "CharTokenizer", "load_breast_cancer", "load_diabetes", "load_digits", "load_shakespeare",
    "GPT", "GPTConfig", "TrainConfig", "TrainingDiverged", "TrainResult", "evaluate", "load_model",
    "lr_at", "train",
]
