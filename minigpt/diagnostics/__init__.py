"""Diagnostics of training runs, importable from here:

- ``curves``: overfitting (the two-curve check and the notes' slope rule), steps to a target, trend and
  volatility of a loss curve (:func:`convergence_summary`).
- ``gradients``: per-parameter gradient and weight statistics, a recorder to pass to ``train`` as
  ``grad_hook``, loss-component tracking, and a readable text report with flags.
- ``lr_range``: the learning-rate range test (Smith 2017), weights restored afterwards.
- ``landscape``: 1-D and 2-D loss landscapes along filter-normalised directions (Li et al. 2018).
- ``latent``: posterior collapse in a VAE (active units and KL per latent dimension).
- ``label_noise``: confidently wrong examples from out-of-fold scores, with fixed or per-class thresholds.
"""

from .curves import (
    ConvergenceSummary, OverfittingReport, convergence_summary, detect_overfitting, running_mean, steps_to_target,
    val_slope_rule,
)
from .gradients import (
    ComponentSummary, GradientRecorder, GradientStats, LossTracker, ParameterStats, diagnostic_report,
    gradient_stats, group_name, group_norms, parameter_stats,
)
from .latent import CollapseCheck, posterior_collapse
from .label_noise import SuspectLabels, confident_wrong, out_of_fold_logits
from .landscape import Landscape, filter_normalized_direction, loss_landscape
from .lr_range import LRRangeResult, lr_range_test, next_batch_loss

__all__ = [
    "ConvergenceSummary", "OverfittingReport", "convergence_summary", "detect_overfitting", "running_mean",
    "steps_to_target", "val_slope_rule",
    "ComponentSummary", "GradientRecorder", "GradientStats", "LossTracker", "ParameterStats", "diagnostic_report",
    "gradient_stats", "group_name", "group_norms", "parameter_stats",
    "CollapseCheck", "posterior_collapse",
    "SuspectLabels", "confident_wrong", "out_of_fold_logits",
    "Landscape", "filter_normalized_direction", "loss_landscape",
    "LRRangeResult", "lr_range_test", "next_batch_loss",
]
