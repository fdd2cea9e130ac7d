"""Real data: tiny Shakespeare for the GPT, and scikit-learn's bundled sets for the small models.

- Tiny Shakespeare (Karpathy's char-rnn corpus, 1,115,394 characters, 65 distinct): :func:`load_shakespeare`
  gives a :class:`CharCorpus` whose :meth:`~CharCorpus.batch_fn` feeds :func:`minigpt.train.train`.
- scikit-learn's diabetes, breast-cancer and digits sets as standardized :class:`TabularSplits`, and the
  digits as raw 8x8 images (:func:`load_digit_images`).

Synthetic data with a known ground truth lives in :mod:`minigpt.synthetic` (corruption models, blob
images, digit views) and :mod:`minigpt.instructions` (the instruction set of chapter 6).

Tiny Shakespeare is looked up in order:

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
        generator: a CPU generator for the window offsets (reproducible batches on any device).
    Returns:
        x, y: (B, T) int64 each, with ``y[b, t] == data[offset_b + t + 1]``.
    """
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D token ids, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, needs more than block_size={block_size}")
    # offsets from the CPU generator (the same batches on every device), the gather where data lives
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).to(data.device)
    index = starts[:, None] + torch.arange(block_size, device=data.device)  # (B, T)
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
        """A ``get_batch(split, generator) -> (x, y)`` function for :func:`minigpt.train.train`.

        The token streams are copied to ``device`` once (a few MB), so each batch is gathered there
        instead of being built on the CPU and copied every step. Their ids were checked at load.
        """
        dev = torch.device(device)
        splits = {"train": self.train.to(dev), "val": self.val.to(dev)}

        def get_batch(split: str, generator: torch.Generator | None = None):
            if split not in splits:
                raise ValueError(f"split must be 'train' or 'val', got {split!r}")
            return random_blocks(splits[split], batch_size, block_size, generator)

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
    y_mean: float | torch.Tensor = 0.0  # a (B,) tensor for stacked splits
    y_std: float | torch.Tensor = 1.0

    @property
    def n_features(self) -> int:
        return self.X_train.shape[-1]

    @property
    def n_splits(self) -> int | None:
        """B for splits stacked by :func:`stack_splits`; None for a single split."""
        return self.X_train.shape[0] if self.X_train.dim() == 3 else None


def stack_splits(splits: list[TabularSplits]) -> TabularSplits:
    """Several splits of one data set as one :class:`TabularSplits` whose tensors gain a first dimension:
    ``X_train`` (B, N, F), ``y_train`` (B, N), and so on; ``y_mean`` and ``y_std`` become (B,) tensors.
    This is the input of B models fitted side by side (``problems=B`` in :mod:`minigpt.small_models`).
    Splits of one set with the same fractions have equal sizes (stratified ones too), so they stack."""
    if not splits:
        raise ValueError("splits must not be empty")
    first = splits[0]
    if any(s.name != first.name for s in splits):
        raise ValueError(f"splits must all come from one data set, got {sorted({s.name for s in splits})}")
    fields = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
    shapes = {f: {tuple(getattr(s, f).shape) for s in splits} for f in fields}
    uneven = [f for f, found in shapes.items() if len(found) > 1]
    if uneven:
        raise ValueError(f"splits must have equal sizes to stack, but {uneven[0]} has shapes {sorted(shapes[uneven[0]])}")
    tensors = [torch.stack([getattr(s, f) for s in splits]) for f in fields]
    return TabularSplits(first.name, *tensors, first.feature_names, first.task, first.n_classes,
                         torch.tensor([s.y_mean for s in splits], dtype=torch.float64),
                         torch.tensor([s.y_std for s in splits], dtype=torch.float64))


def load_stacked(loader, split_seeds, **kwargs) -> TabularSplits:
    """``loader`` (e.g. :func:`load_diabetes`) once per seed in ``split_seeds``, stacked by
    :func:`stack_splits`: one split per seed, for B side-by-side fits."""
    return stack_splits([loader(split_seed=s, **kwargs) for s in split_seeds])


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


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as raw images: (1797, 8, 8) float32 pixel intensities 0-16, and (1797,)
    int64 labels (for augmentations that move pixels, which standardized features cannot)."""
    from sklearn.datasets import load_digits as _load

    ds = _load()
    return torch.as_tensor(ds.images, dtype=torch.float32), torch.as_tensor(ds.target, dtype=torch.int64)
