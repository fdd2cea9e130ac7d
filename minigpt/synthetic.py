"""Synthetic data with a known, stated ground truth, so that what a loss does can be measured.

- Corruption models, known damage to clean data: :func:`corrupt_targets` (gross one-sided errors in
  regression targets), :func:`flip_labels` (symmetric label noise), :func:`keep_minority` (an imbalanced
  subset).
- :func:`blob_segmentation`: noisy images with one disc or none, and the disc as the mask.
- :func:`digit_view`: a random shifted, noisy view of digit images (positive pairs for contrastive losses).

Random draws use the CPU generator passed in (reproducible on every device); results are moved to the
input's device.
"""

from __future__ import annotations

import torch


def corrupt_targets(y: torch.Tensor, rate: float, generator: torch.Generator, *, low: float = 5.0,
                    high: float = 15.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gross errors in regression targets: a random ``rate`` share of the entries (rounded to the nearest
    count) get an offset drawn uniformly from ``[low, high]`` added, always upward (a one-sided error
    such as a misplaced decimal point or a unit mix-up). In standardized targets the offsets are in
    standard deviations.

    Args:
        y: (N,) or (B, N) floating targets; with B rows, each row is corrupted independently.
    Returns:
        The corrupted copy and a boolean mask of the corrupted entries, both shaped like ``y``.
    """
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() not in (1, 2):
        raise ValueError(f"y must be a floating tensor of shape (N,) or (B, N), got {getattr(y, 'shape', type(y))}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    if not 0.0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    rows = y if y.dim() == 2 else y[None]
    n = rows.shape[1]
    k = int(round(rate * n))
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    offsets = torch.zeros(rows.shape, dtype=y.dtype)
    for b in range(rows.shape[0]):
        idx = torch.randperm(n, generator=generator)[:k]
        mask[b, idx] = True
        offsets[b, idx] = low + (high - low) * torch.rand(k, generator=generator, dtype=y.dtype)
    out = rows + offsets.to(y.device)
    mask = mask.to(y.device)
    return (out, mask) if y.dim() == 2 else (out[0], mask[0])


def flip_labels(y: torch.Tensor, rate: float, generator: torch.Generator, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: a random ``rate`` share of the labels (rounded to the nearest count) is
    replaced by a different class drawn uniformly (for two classes: flipped).

    Args:
        y: (N,) or (B, N) int64 labels in [0, n_classes); with B rows, each row independently.
    Returns:
        The noisy copy and a boolean mask of the changed entries.
    """
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() not in (1, 2):
        raise ValueError(f"y must be an int64 tensor of shape (N,) or (B, N), got {getattr(y, 'dtype', type(y))}")
    if n_classes < 2 or bool((y < 0).any()) or bool((y >= n_classes).any()):
        raise ValueError(f"y must hold labels in [0, {n_classes - 1}] with n_classes >= 2")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    # drawn on the CPU (the generator's device, so the same seed gives the same noise everywhere), then
    # moved to y's device in one copy
    rows = (y if y.dim() == 2 else y[None])
    n = rows.shape[1]
    k = int(round(rate * n))
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    shift = torch.zeros(rows.shape, dtype=torch.int64)
    for b in range(rows.shape[0]):
        idx = torch.randperm(n, generator=generator)[:k]
        shift[b, idx] = torch.randint(1, n_classes, (k,), generator=generator)  # never 0: always another class
        mask[b, idx] = True
    rows = (rows + shift.to(y.device)) % n_classes
    mask = mask.to(y.device)
    return (rows, mask) if y.dim() == 2 else (rows[0], mask[0])


def keep_minority(y: torch.Tensor, minority: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Indices that make a training set imbalanced: every example of the other classes, and of class
    ``minority`` only enough to leave one minority example per ``ratio`` majority examples (at least 1).

    Args:
        y: (N,) int64 labels. ratio: majority examples per minority example, e.g. 20 for 1:20.
    Returns:
        Sorted (M,) int64 indices into ``y``. The count is the same for every generator, so splits of
        equal class counts (stratified) stack into one batch of problems.
    """
    if y.dim() != 1 or y.dtype != torch.int64:
        raise ValueError("y must be a 1-D int64 tensor of labels")
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    minority_idx = torch.nonzero(y == minority).flatten()
    majority_idx = torch.nonzero(y != minority).flatten()
    keep = max(1, int(round(len(majority_idx) / ratio)))
    if keep > len(minority_idx):
        raise ValueError(f"class {minority} has {len(minority_idx)} examples, fewer than the {keep} that ratio {ratio} needs")
    chosen = minority_idx[torch.randperm(len(minority_idx), generator=generator)[:keep]]
    return torch.sort(torch.cat([majority_idx, chosen])).values


def blob_segmentation(n: int, size: int, generator: torch.Generator, *, empty_fraction: float = 0.3,
                      radius=(1.5, 4.0), noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic segmentation task with known ground truth: ``size`` x ``size`` images of Gaussian noise
    (standard deviation ``noise``) plus, in a share ``1 - empty_fraction`` of them, one disc of
    brightness 1 at a random centre with a random radius in ``radius``; the mask is the disc. The other
    images are noise only, with an empty mask.

    Returns:
        images (n, 1, size, size) float32 and masks (n, 1, size, size) float32 in {0, 1}.
    """
    if n < 1 or size < 4:
        raise ValueError(f"need n >= 1 and size >= 4, got n={n}, size={size}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must lie in [0, 1], got {empty_fraction}")
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    centres = torch.rand(n, 2, generator=generator) * (size - 1)
    radii = radius[0] + (radius[1] - radius[0]) * torch.rand(n, generator=generator)
    has_blob = torch.rand(n, generator=generator) >= empty_fraction
    dist2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    masks = ((dist2 <= radii[:, None, None] ** 2) & has_blob[:, None, None]).float()
    images = masks + noise * torch.randn(n, size, size, generator=generator)
    return images[:, None], masks[:, None]


def digit_view(images: torch.Tensor, generator: torch.Generator, *, max_shift: int = 1,
               noise: float = 2.0) -> torch.Tensor:
    """One random augmented view of (N, 8, 8) digit images: each shifted by up to ``max_shift`` pixels in
    each direction (zeros shifted in), plus Gaussian pixel noise of standard deviation ``noise``; returned
    flattened and scaled to (N, 64) with pixel values divided by 16."""
    if images.dim() != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    n, h, w = images.shape
    dev = images.device
    pad = torch.nn.functional.pad(images, (max_shift,) * 4)
    # offsets and noise come from the CPU generator (the same views on every device), then move
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w).to(dev)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w).to(dev)
    shifted = pad[torch.arange(n, device=dev)[:, None, None], rows, cols]
    noise_draw = torch.randn(n, h, w, generator=generator, dtype=images.dtype).to(dev)
    out = shifted + noise * noise_draw
    return (out / 16).reshape(n, h * w)
