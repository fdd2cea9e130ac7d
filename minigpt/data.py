"""Data: tiny Shakespeare for the GPT, and scikit-learn's bundled tabular sets for the small models.

Tiny Shakespeare (Karpathy's char-rnn corpus, 1,115,394 characters, 65 distinct) is looked up in order:

1. ``$MINIGPT_DATA_DIR/tinyshakespeare/input.txt`` when ``MINIGPT_DATA_DIR`` is set (CI points it at a
   copy, as it has no network; if the file is missing there it is downloaded into that folder);
2. the user cache, ``$XDG_CACHE_HOME/minigpt`` or ``~/.cache/minigpt``;
3. downloaded from the canonical char-rnn address into the cache.

Whatever the route, the file must match its SHA-256, so every reader trains on the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_RELPATH = Path("tinyshakespeare") / "input.txt"


class DataError(RuntimeError):
    """The corpus could not be found, fetched or verified; the message says what to do."""


def data_dir() -> Path:
    """Where the corpus lives: ``MINIGPT_DATA_DIR`` if set, else the user cache folder."""
    explicit = os.environ.get("MINIGPT_DATA_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser().resolve()  # relative to the current directory
    cache_root = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(cache_root) / "minigpt"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise DataError(
            f"{path} has SHA-256 {actual}, expected {expected}. The file is corrupt or not tiny "
            f"Shakespeare: delete it and run again to download it afresh, or put the right file there "
            f"(from {SHAKESPEARE_URL})."
        )


def _download(url: str, dest: Path, expected: str, timeout: float = 30.0) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary file in the same folder and rename it only once verified, so an
    # interrupted or corrupt download never leaves a bad corpus behind.
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as exc:
                raise DataError(
                    f"could not download tiny Shakespeare from {url} ({exc}). Without network access, "
                    f"copy input.txt (SHA-256 {expected}) to {dest}, or set MINIGPT_DATA_DIR to a folder "
                    f"that holds {SHAKESPEARE_RELPATH}."
                ) from exc
        _verify(tmp, expected)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def shakespeare_path(url: str = SHAKESPEARE_URL, sha256: str = SHAKESPEARE_SHA256) -> Path:
    """Path of a verified copy of tiny Shakespeare, downloading it once if needed."""
    path = data_dir() / SHAKESPEARE_RELPATH
    if not path.exists():
        _download(url, path, sha256)
    _verify(path, sha256)
    return path


class CharTokenizer:
    """Characters to integer ids and back; the vocabulary is the sorted set of characters seen."""

    def __init__(self, chars: str | list[str]):
        vocab = sorted(set(chars))
        if not vocab:
            raise ValueError("chars must hold at least one character")
        self.chars = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(list(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"text holds the character {exc.args[0]!r}, which is not in the vocabulary") from None

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return "".join(self.chars[int(i)] for i in ids)


def random_blocks(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows of ``data``, and the same windows shifted one token to the right.

    Args:
        data: (N,) int64 token ids.
        batch_size, block_size: B and T.
        generator: a CPU generator for the window offsets (reproducible batches).
    Returns:
        x, y: (B, T) int64 each, with ``y[b, t] == data[offset_b + t + 1]``.
    """
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D token ids, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, needs more than block_size={block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(block_size)  # (B, T)
    return data[index], data[index + 1]


@dataclass
class CharCorpus:
    """A character corpus split into train and validation token streams."""

    tokenizer: CharTokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch_fn(self, batch_size: int, block_size: int, device: torch.device | str = "cpu"):
        """A ``get_batch(split, generator) -> (x, y)`` function for :func:`minigpt.train.train`."""
        splits = {"train": self.train, "val": self.val}
        dev = torch.device(device)

        def get_batch(split: str, generator: torch.Generator | None = None):
            if split not in splits:
                raise ValueError(f"split must be 'train' or 'val', got {split!r}")
            x, y = random_blocks(splits[split], batch_size, block_size, generator)
            if dev.type != "cpu":
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            return x, y

        return get_batch


def load_shakespeare(train_fraction: float = 0.9) -> CharCorpus:
    """Tiny Shakespeare as a :class:`CharCorpus`: 65-character vocabulary, first 90% train, last 10% val
    (nanoGPT's split)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    text = shakespeare_path().read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_train = int(len(ids) * train_fraction)
    return CharCorpus(tokenizer, ids[:n_train], ids[n_train:])


# ----------------------------------------------------------------------------------------------------
# scikit-learn's bundled data sets (shipped inside the package: no download)


@dataclass
class TabularSplits:
    """Standardized tensors with fixed train/val/test splits.

    Features are standardized with the training split's mean and standard deviation. Regression targets
    are standardized the same way (``y_mean``/``y_std`` turn predictions back into the original units);
    class labels are int64.
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    task: str  # "regression" or "classification"
    n_classes: int | None = None
    y_mean: float = 0.0
    y_std: float = 1.0

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


def _split_indices(n: int, fractions: tuple[float, float, float], labels, seed: int):
    from sklearn.model_selection import train_test_split

    train_f, val_f, test_f = fractions
    if min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    idx = np.arange(n)
    idx_train, idx_rest = train_test_split(
        idx, test_size=val_f + test_f, random_state=seed, stratify=labels
    )
    rest_labels = None if labels is None else labels[idx_rest]
    idx_val, idx_test = train_test_split(
        idx_rest, test_size=test_f / (val_f + test_f), random_state=seed, stratify=rest_labels
    )
    return idx_train, idx_val, idx_test


def _tabular(name: str, X: np.ndarray, y: np.ndarray, feature_names, task: str,
             fractions, split_seed: int, dtype: torch.dtype) -> TabularSplits:
    labels = y if task == "classification" else None
    tr, va, te = _split_indices(len(X), fractions, labels, split_seed)
    mean, std = X[tr].mean(axis=0), X[tr].std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant features (digits' blank pixels) stay at zero
    Xs = (X - mean) / std

    def feats(i):
        return torch.as_tensor(Xs[i], dtype=dtype)

    if task == "regression":
        y_mean, y_std = float(y[tr].mean()), float(y[tr].std())
        ys = (y - y_mean) / y_std

        def targ(i):
            return torch.as_tensor(ys[i], dtype=dtype)

        n_classes = None
    else:
        y_mean, y_std = 0.0, 1.0

        def targ(i):
            return torch.as_tensor(y[i], dtype=torch.long)

        n_classes = int(y.max()) + 1
    return TabularSplits(name, feats(tr), targ(tr), feats(va), targ(va), feats(te), targ(te),
                         list(feature_names), task, n_classes, y_mean, y_std)


def load_diabetes(fractions=(0.6, 0.2, 0.2), split_seed: int = 0, dtype=torch.float32) -> TabularSplits:
    """scikit-learn's diabetes regression set: 442 patients, 10 features, disease progression after a
    year as the (standardized) target."""
    from sklearn.datasets import load_diabetes as _load

    ds = _load()
    return _tabular("diabetes", ds.data, ds.target.astype(np.float64), ds.feature_names, "regression",
                    fractions, split_seed, dtype)


def load_breast_cancer(fractions=(0.6, 0.2, 0.2), split_seed: int = 0, dtype=torch.float32) -> TabularSplits:
    """scikit-learn's Wisconsin breast-cancer set: 569 tumours, 30 features, label 1 = benign (357),
    0 = malignant (212). Splits are stratified."""
    from sklearn.datasets import load_breast_cancer as _load

    ds = _load()
    return _tabular("breast_cancer", ds.data, ds.target, ds.feature_names, "classification",
                    fractions, split_seed, dtype)


def load_digits(fractions=(0.6, 0.2, 0.2), split_seed: int = 0, dtype=torch.float32) -> TabularSplits:
    """scikit-learn's 8x8 handwritten digits: 1,797 images, 64 pixel features, 10 classes. Splits are
    stratified."""
    from sklearn.datasets import load_digits as _load

    ds = _load()
    return _tabular("digits", ds.data, ds.target, ds.feature_names, "classification",
                    fractions, split_seed, dtype)


# ----------------------------------------------------------------------------------------------------
# Corruption models: known, stated damage to clean data, so that robustness can be measured


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
    rows = (y if y.dim() == 2 else y[None]).clone()
    n = rows.shape[1]
    k = int(round(rate * n))
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    for b in range(rows.shape[0]):
        idx = torch.randperm(n, generator=generator)[:k]
        shift = torch.randint(1, n_classes, (k,), generator=generator)  # never 0: always another class
        rows[b, idx] = (rows[b, idx] + shift) % n_classes
        mask[b, idx] = True
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


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as raw images: (1797, 8, 8) float32 pixel intensities 0-16, and (1797,)
    int64 labels (for augmentations that move pixels, which standardized features cannot)."""
    from sklearn.datasets import load_digits as _load

    ds = _load()
    return torch.as_tensor(ds.images, dtype=torch.float32), torch.as_tensor(ds.target, dtype=torch.int64)


def digit_view(images: torch.Tensor, generator: torch.Generator, *, max_shift: int = 1,
               noise: float = 2.0) -> torch.Tensor:
    """One random augmented view of (N, 8, 8) digit images: each shifted by up to ``max_shift`` pixels in
    each direction (zeros shifted in), plus Gaussian pixel noise of standard deviation ``noise``; returned
    flattened and scaled to (N, 64) with pixel values divided by 16."""
    if images.dim() != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    n, h, w = images.shape
    pad = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    shifted = pad[torch.arange(n)[:, None, None], rows, cols]
    out = shifted + noise * torch.randn(n, h, w, generator=generator)
    return (out / 16).reshape(n, h * w)


# ----------------------------------------------------------------------------------------------------
# A synthetic instruction data set with known answers and controlled response lengths (for SFT)

INSTRUCTION_TASKS = ("repeat", "count", "reverse")
INSTRUCTION_STOP = "|"  # ends every response; generating it is how a model says "done"
INSTRUCTION_PAD = "_"  # fills a batch row after the stop token; never takes a loss
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
INSTRUCTION_VOCAB = _LETTERS + "0123456789" + "RCV:*>" + INSTRUCTION_STOP + INSTRUCTION_PAD


@dataclass(frozen=True)
class Instruction:
    """One example: ``prompt`` (ends with ``>``), the one correct ``response`` (ends with the stop
    token), the ``task`` it comes from and the response's length in characters, stop token included."""

    task: str
    prompt: str
    response: str

    @property
    def response_length(self) -> int:
        return len(self.response)


def make_instruction(task: str, length: int, generator: torch.Generator) -> Instruction:
    """An instruction whose correct response is ``length`` characters long, stop token included.

    - ``repeat``: ``R:ab*3>`` -> ``ababab|`` (a random pattern of 1-3 letters whose length divides
      ``length - 1``, repeated).
    - ``count``: ``C:7>`` -> ``1234567|`` (digits 1, 2, ..., n written mod 10).
    - ``reverse``: ``V:word>`` -> ``drow|`` (a random word of ``length - 1`` letters, reversed).
    """
    if task not in INSTRUCTION_TASKS:
        raise ValueError(f"task must be one of {INSTRUCTION_TASKS}, got {task!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 (one character and the stop token), got {length!r}")
    n = length - 1  # characters before the stop token

    def letters(k: int) -> str:
        return "".join(_LETTERS[i] for i in torch.randint(0, 26, (k,), generator=generator).tolist())

    if task == "repeat":
        sizes = [k for k in (1, 2, 3) if n % k == 0]
        size = sizes[int(torch.randint(0, len(sizes), (1,), generator=generator))]
        pattern = letters(size)
        return Instruction(task, f"R:{pattern}*{n // size}>", pattern * (n // size) + INSTRUCTION_STOP)
    if task == "count":
        return Instruction(task, f"C:{n}>", "".join(str(i % 10) for i in range(1, n + 1)) + INSTRUCTION_STOP)
    word = letters(n)
    return Instruction(task, f"V:{word}>", word[::-1] + INSTRUCTION_STOP)


def make_instructions(n: int, generator: torch.Generator, *, lengths: tuple[int, int] = (2, 49),
                      tasks=INSTRUCTION_TASKS) -> list[Instruction]:
    """``n`` instructions with tasks drawn uniformly from ``tasks`` and response lengths drawn uniformly
    from ``lengths[0]`` to ``lengths[1]`` inclusive (stop token included)."""
    lo, hi = lengths
    if not 2 <= lo <= hi:
        raise ValueError(f"lengths must satisfy 2 <= low <= high, got {lengths}")
    if n < 1 or not tasks or any(t not in INSTRUCTION_TASKS for t in tasks):
        raise ValueError(f"need n >= 1 and tasks from {INSTRUCTION_TASKS}, got n={n}, tasks={tasks}")
    out = []
    for _ in range(n):
        task = tasks[int(torch.randint(0, len(tasks), (1,), generator=generator))]
        length = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        out.append(make_instruction(task, length, generator))
    return out


def instruction_batch(examples: list[Instruction], tokenizer: CharTokenizer | None = None, *,
                      mask_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids for next-token training on prompt + response, one row per example, padded.

    Returns ``x`` (B, T) inputs, ``y`` (B, T) targets (``x`` shifted by one; padding, and with
    ``mask_prompt`` the positions that predict prompt characters, set to -100) and ``response_mask``
    (B, T) True where ``y`` is a response character or the stop token. T is the longest example's
    length minus one.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    tok = tokenizer or CharTokenizer(INSTRUCTION_VOCAB)
    seqs = [tok.encode(e.prompt + e.response) for e in examples]
    T = max(len(s) for s in seqs) - 1
    pad = tok.stoi[INSTRUCTION_PAD]
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    response = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids = torch.tensor(s, dtype=torch.long)
        x[i, : len(s) - 1] = ids[:-1]
        y[i, : len(s) - 1] = ids[1:]
        first = len(e.prompt) - 1  # the position whose target is the response's first character
        response[i, first : len(s) - 1] = True
    if mask_prompt:
        y = y.masked_fill(~response, -100)
    return x, y, response
