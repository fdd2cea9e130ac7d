"""Run-time settings read from the environment: scale, seed, device and threads.

Every chapter and test reads its knobs through these functions so that one environment variable changes
the whole book:

``MINIGPT_SCALE``  ``small`` (CPU, CI) or ``full`` (what a reader with a GPU gets). Default: ``full`` when
                   CUDA is available, else ``small``.
``MINIGPT_SEED``   base seed (an integer, default 0). Experiments over several seeds derive theirs from it,
                   so a claim can be re-checked under another base seed.
``MINIGPT_DEVICE`` force a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``). Default: the best available.
``MINIGPT_THREADS`` torch intra-op threads. Default: 1 inside a pytest-xdist worker (parallel notebooks
                   on two cores oversubscribe badly with torch's default), else torch's own default.
``MINIGPT_PROGRESS`` ``1`` or ``0``: progress bars on or off. Default: on for a reader (a terminal, or a
                   Jupyter kernel), off under pytest and while the book build executes the chapters.
``MINIGPT_TF32``   ``0`` keeps float32 matrix products in full float32 on CUDA. Default: TF32 on (about
                   ten bits of mantissa in the product inputs; several times faster on Ampere and later).
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

SCALES = ("small", "full")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def _int_env(name: str, default: int | None, minimum: int) -> int | None:
    """An integer environment variable, ``default`` when unset; a clear error names it otherwise."""
    value = _env(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def scale() -> str:
    """The scale knob: ``"small"`` or ``"full"`` (from ``MINIGPT_SCALE``)."""
    value = _env("MINIGPT_SCALE")
    if value is None:
        return "full" if torch.cuda.is_available() else "small"
    value = value.lower()
    if value not in SCALES:
        raise ValueError(f"MINIGPT_SCALE must be one of {SCALES}, got {value!r}")
    return value


def base_seed() -> int:
    """The base seed from ``MINIGPT_SEED`` (default 0)."""
    return _int_env("MINIGPT_SEED", default=0, minimum=0)


def seeds(n: int, base: int | None = None) -> list[int]:
    """``n`` distinct seeds derived from the base seed: ``[base, base + 1, ..., base + n - 1]``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    start = base_seed() if base is None else base
    return [start + i for i in range(n)]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded the same.

    On the CPU this makes a run bit-reproducible: torch's CPU kernels are deterministic for a fixed
    number of threads. (A different thread count may change the order of floating-point reductions.)
    On CUDA it fixes the random draws but not the order of every floating-point sum: some kernels (the
    attention backward among them) use atomics, so runs agree closely, not bit for bit, unless
    ``torch.use_deterministic_algorithms(True)`` is set.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def device() -> torch.device:
    """The device to run on: ``MINIGPT_DEVICE`` if set, else cuda, then mps, then cpu."""
    value = _env("MINIGPT_DEVICE")
    if value is not None:
        dev = torch.device(value)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"MINIGPT_DEVICE={value!r} but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def configure_threads() -> int:
    """Set torch's intra-op thread count from the environment and return it.

    ``MINIGPT_THREADS`` wins; otherwise one thread inside a pytest-xdist worker (and in the notebook
    kernels it starts, which inherit its environment), because two processes with two threads each on a
    two-core machine run several times slower than with one each.
    """
    threads = _int_env("MINIGPT_THREADS", default=None, minimum=1)
    if threads is None and _env("PYTEST_XDIST_WORKER") is not None:
        threads = 1
    if threads is None:
        return torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def _flag_env(name: str) -> bool | None:
    value = _env(name)
    if value is None:
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


def progress_default() -> bool:
    """Whether training shows a progress bar when its config leaves it open (``progress=None``).

    ``MINIGPT_PROGRESS`` wins. Otherwise off under pytest (``PYTEST_CURRENT_TEST`` or an xdist worker in
    the environment, which the notebook kernels nbval starts inherit) and in the book build (its Sphinx
    extension sets ``MINIGPT_PROGRESS=0`` for the kernels it starts), so no bar text reaches a test log
    or the HTML; on in a Jupyter kernel (a plain text bar, no widgets needed) and in a terminal.
    """
    flag = _flag_env("MINIGPT_PROGRESS")
    if flag is not None:
        return flag
    if _env("PYTEST_CURRENT_TEST") is not None or _env("PYTEST_XDIST_WORKER") is not None:
        return False
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def configure_cuda() -> bool:
    """Let float32 matrix products on CUDA use TF32 unless ``MINIGPT_TF32=0``; returns whether TF32 is on.

    No chapter assert depends on full float32 products: the small models that need precision compute
    in float64, which TF32 does not touch. Does nothing without CUDA.
    """
    if not torch.cuda.is_available():
        return False
    tf32 = _flag_env("MINIGPT_TF32")
    tf32 = True if tf32 is None else tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return tf32
