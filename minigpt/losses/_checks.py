"""Argument checks shared by the losses: clear errors instead of silent broadcasting or NaN."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100  # the label of a position that takes no loss, as in torch.nn.functional


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_float_pair(input: torch.Tensor, target: torch.Tensor) -> None:
    """``input`` and ``target`` must be floating tensors of one shape (no broadcasting)."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if input.shape != target.shape:
        # torch's own losses broadcast here with only a warning, which silently compares every
        # prediction with every target (a (N, 1) input against an (N,) target gives N x N terms)
        raise ValueError(f"target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}")


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
