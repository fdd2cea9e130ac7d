"""What the losses share: the ignore label, the reduction names, and the argument checks that turn silent
broadcasting, integer arithmetic or NaN into a clear ``ValueError`` naming the argument.

Every module of ``minigpt`` that needs one of these imports it from here (or from ``minigpt.losses``);
the ignore label is written as a number in this file only.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position that takes no loss, as in torch.nn.functional
REDUCTIONS = ("mean", "sum", "none")  # torch.nn.functional's reductions of an elementwise loss


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which row statistics (maximum, log-sum-exp) of ``dtype`` logits are accumulated:
    float32 for float16 and bfloat16, as torch's own softmax kernels do; the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    """``reduction`` must be one of ``allowed``."""
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_tensor(value, name: str) -> None:
    """A ``TypeError`` for a non-tensor (a list or a number where a tensor belongs), as torch raises."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_floating(value, name: str) -> None:
    """``value`` must be a floating tensor: integer arithmetic would round the loss or its weights."""
    check_tensor(value, name)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_float_pair(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str] = ("input", "target")) -> None:
    """``first`` and ``second`` must be floating tensors of one shape (no broadcasting); errors use
    ``names``, the arguments' names in the caller's signature."""
    for name, t in zip(names, (first, second)):
        check_floating(t, name)
    if first.shape != second.shape:
        # torch's own losses broadcast here with only a warning, which silently compares every
        # prediction with every target (a (N, 1) input against an (N,) target gives N x N terms)
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {tuple(first.shape)}, "
                         f"got {tuple(second.shape)}")


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply one of :data:`REDUCTIONS` to an elementwise loss."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
