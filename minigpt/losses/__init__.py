"""Loss functions with ``torch.nn.functional``'s conventions (``input, target, ..., reduction="mean"``).

Modules by family; everything is importable from here:

- ``regression``: MSE, MAE, Huber, SmoothL1, log-cosh (stable), quantile and multi-quantile.
- ``classification``: BCE with logits and pos_weight, hinge, squared hinge, exponential, multi-class hinge,
  sigmoid focal, KL divergence, distillation with temperature (a number or one per position),
  Dice, InfoNCE, the confidence penalty, and the source notes' "adaptive" label smoothing.
- ``sequence``: per-token NLL and the SFT reductions (sum, token mean, sequence mean, 1/T^alpha) with
  correct gradient-accumulation normalisation; prompt masking, token weighting, the notes' adaptive
  length penalty.
- ``token``: cross-entropy (every ``F.cross_entropy`` shape, class indices or probabilities, class weights,
  ignore_index, both label-smoothing conventions) and softmax focal loss as lean autograd functions, plus
  the naive focal loss for comparison.
- ``fused``: cross-entropy of a linear layer's output (``linear_cross_entropy``), computed chunk by chunk
  from the hidden states and the output matrix without ever forming the (N, V) logits.
- ``vae``: Gaussian KL, free bits, linear and cyclical beta schedules, active units.
- ``common``: the constants (``IGNORE_INDEX``, ``REDUCTIONS``) and the argument checks the others share.

Constants: ``IGNORE_INDEX`` (defined in ``common``: the label of a position without a loss), ``REDUCTIONS``
(``"mean"``, ``"sum"``, ``"none"``) and ``SEQUENCE_REDUCTIONS`` (the SFT reductions of ``sequence``).
"""

from .common import IGNORE_INDEX, REDUCTIONS

from .regression import (
    huber_loss, log_cosh_loss, mae_loss, mse_loss, multi_quantile_loss, quantile_loss, smooth_l1_loss,
)

from .classification import (
    adaptive_label_smoothing_loss, bce_with_logits, confidence_penalty_loss, dice_loss, distillation_loss,
    exponential_loss, hinge_loss, info_nce_loss, kl_div, multi_margin_loss, neighbour_info_nce_loss,
    neighbour_positive_mask, sigmoid_focal_loss, squared_hinge_loss,
)
from .sequence import (
    SEQUENCE_REDUCTIONS, adaptive_length_penalty_loss, mask_prompt, sequence_loss, sft_loss, token_nll, token_weights,
    weighted_token_mean,
)
from .token import cross_entropy, naive_softmax_focal_loss, softmax_focal_loss
from .fused import linear_cross_entropy
from .vae import FreeBitsKL, active_units, cyclical_beta, free_bits_kl, gaussian_kl, linear_beta

__all__ = [
    "IGNORE_INDEX", "REDUCTIONS", "SEQUENCE_REDUCTIONS",
    "cross_entropy", "naive_softmax_focal_loss", "softmax_focal_loss", "linear_cross_entropy",
    "FreeBitsKL", "active_units", "cyclical_beta", "free_bits_kl", "gaussian_kl", "linear_beta",
    "adaptive_label_smoothing_loss", "bce_with_logits", "confidence_penalty_loss", "dice_loss", "distillation_loss",
    "exponential_loss", "hinge_loss", "info_nce_loss", "kl_div", "multi_margin_loss", "neighbour_info_nce_loss",
    "neighbour_positive_mask", "sigmoid_focal_loss", "squared_hinge_loss",
    "adaptive_length_penalty_loss", "mask_prompt", "sequence_loss", "sft_loss", "token_nll", "token_weights",
    "weighted_token_mean",
    "huber_loss", "log_cosh_loss", "mae_loss", "mse_loss", "multi_quantile_loss", "quantile_loss",
    "smooth_l1_loss",
]
