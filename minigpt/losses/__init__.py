"""Loss functions with ``torch.nn.functional``'s conventions (``input, target, ..., reduction="mean"``).

Modules by family; everything is importable from here:

- ``regression``: MSE, MAE, Huber, SmoothL1, log-cosh (stable), quantile and multi-quantile.
"""

from .regression import (
    huber_loss, log_cosh_loss, mae_loss, mse_loss, multi_quantile_loss, quantile_loss, smooth_l1_loss,
)

__all__ = [
    "huber_loss", "log_cosh_loss", "mae_loss", "mse_loss", "multi_quantile_loss", "quantile_loss",
    "smooth_l1_loss",
]
