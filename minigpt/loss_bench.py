"""Time and extra peak memory of token-level losses, forward plus backward, on the CPU.

    python -m minigpt.loss_bench --n 8192 --vocab 50257 --out bench/results/losses.json

The losses run one after another in a child process whose ``malloc`` hands every freed block of 1 MiB
or more back to the system, so that nothing one measurement frees stays resident into the next. For each
loss the process allocates the (N, V) float32 logits, resets its peak-RSS counter, and times ``repeats``
forward+backward passes; "extra peak memory" is the peak resident memory above what the process held
with the logits allocated, in units of the logits' size. ``F.cross_entropy`` is measured in the same run as the reference. Time is the
fastest of the repeats (the median is kept too): large fresh allocations make single repeats noisy.

The output layer's losses (``LINEAR_LOSSES``) start instead from (N, D) hidden states and the (V, D)
output matrix, both requiring gradients, and are measured against ``F.linear`` + ``F.cross_entropy``:

    python -m minigpt.loss_bench --linear --n 8192 --vocab 50257 --hidden 768

Their extra peak memory includes the gradients of the hidden states and the output matrix, which every
method must return; ``gradients_in_logits`` gives that share separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOSSES = {
    "F.cross_entropy": lambda x, y: F.cross_entropy(x, y),
    "minigpt cross_entropy": lambda x, y: _losses().cross_entropy(x, y),
    "F.cross_entropy label_smoothing=0.1": lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
    "minigpt cross_entropy label_smoothing=0.1": lambda x, y: _losses().cross_entropy(x, y, label_smoothing=0.1),
    "naive softmax focal (full probability tensor)": lambda x, y: _losses().naive_softmax_focal_loss(x, y, gamma=2.0),
    "minigpt softmax_focal_loss": lambda x, y: _losses().softmax_focal_loss(x, y, gamma=2.0),
    "minigpt sft_loss token_mean": lambda x, y: _losses().sft_loss(x.view(8, -1, x.shape[1]), y.view(8, -1)),
    "minigpt sft_loss sequence_mean": lambda x, y: _losses().sft_loss(x.view(8, -1, x.shape[1]), y.view(8, -1),
                                                                      reduction="sequence_mean"),
}


# loss(hidden (N, D), weight (V, D), target (N,), chunk_size): the output layer and its loss together
LINEAR_LOSSES = {
    "F.linear + F.cross_entropy": lambda h, w, y, chunk: F.cross_entropy(F.linear(h, w), y),
    "F.linear + minigpt cross_entropy": lambda h, w, y, chunk: _losses().cross_entropy(F.linear(h, w), y),
    "minigpt linear_cross_entropy": lambda h, w, y, chunk: _losses().linear_cross_entropy(h, w, y, chunk_size=chunk),
}


def _losses():
    from . import losses

    return losses


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _measuring_env() -> dict:
    """The environment of a measuring process: glibc's malloc returns every block of 1 MiB or more to the
    system when it is freed. Without it, a block freed during the warm-up stays resident (glibc raises its
    mmap threshold up to 32 MiB after a free), and a loss whose buffers are under 32 MiB would appear to
    use no memory at all."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_TRIM_THRESHOLD_=str(2**20))


def run_one(name: str, n: int, vocab: int, repeats: int, hidden: int = 768, chunk: int | None = None) -> dict:
    torch.manual_seed(0)
    y = torch.randint(0, vocab, (n,))
    if name in LINEAR_LOSSES:
        # hidden states of unit size and a GPT-2-like output matrix: logits of order 1
        inputs = (torch.randn(n, hidden, requires_grad=True),
                  (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_())
        step = lambda: LINEAR_LOSSES[name](*inputs, y, chunk)  # noqa: E731
    else:
        inputs = (torch.randn(n, vocab, dtype=torch.float32, requires_grad=True),)
        step = lambda: LOSSES[name](inputs[0], y)  # noqa: E731
    step().backward()  # warm up (and let the allocator settle)
    for t in inputs:
        t.grad = None
    logits_mib = n * vocab * 4 / 2**20
    times, extra = [], []
    for _ in range(repeats):
        base = _rss_kib("VmRSS")
        ok = _reset_peak()
        t0 = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - t0)
        for t in inputs:
            t.grad = None
        if ok:
            extra.append((_rss_kib("VmHWM") - base) / 1024 / logits_mib)
    # The minimum is the robust statistic here: on a VM whose kernel reclaims memory (kdamond), some
    # repeats pay to fault 1.6 GB back in and take twice as long; the median is reported beside it.
    grads = sum(t.numel() for t in inputs) if name in LINEAR_LOSSES else None
    return {"loss": name, "seconds": min(times), "seconds_median": statistics.median(times), "times": times,
            "extra_peak_in_logits": statistics.median(extra) if extra else None, "logits_mib": logits_mib,
            "n": n, "vocab": vocab, "hidden": hidden if name in LINEAR_LOSSES else None, "chunk": chunk,
            "gradients_in_logits": None if grads is None else grads / (n * vocab)}


def measure(names, n, vocab: int, *, repeats: int = 3, hidden: int = 768, chunk=None,
            reference: str | None = None) -> list[dict]:
    """Run each loss in ``names`` at each ``n`` (an int or a sequence of them) and each ``chunk`` (None, an
    int, or a sequence), one after another in one child process (see the module's docstring), and return
    one dict per run: ``loss``, ``n``, ``chunk``, ``seconds`` (fastest forward+backward),
    ``seconds_median``, ``extra_peak_in_logits`` (peak resident memory above the inputs, in units of the
    (N, V) float32 logits' size; None where the kernel does not let a process reset its peak),
    ``gradients_in_logits`` (for ``LINEAR_LOSSES``: the size of the gradients they return, same unit),
    and, if ``reference`` is one of ``names``, ``time_vs_reference`` and ``memory_vs_reference``: ratios
    to the reference's run at the same ``n`` and ``chunk``. ``hidden`` and ``chunk`` apply to
    ``LINEAR_LOSSES``."""
    names = list(names)
    for name in names:
        if name not in LOSSES and name not in LINEAR_LOSSES:
            raise ValueError(f"names holds an unknown loss {name!r}; known: {sorted(LOSSES) + sorted(LINEAR_LOSSES)}")
    sizes = [n] if isinstance(n, int) else list(n)
    chunks = [chunk] if chunk is None or isinstance(chunk, int) else list(chunk)
    specs = [{"loss": name, "n": size, "chunk": c} for size in sizes for c in chunks for name in names]
    cmd = [sys.executable, "-m", "minigpt.loss_bench", "--one", json.dumps(specs), "--vocab", str(vocab),
           "--repeats", str(repeats), "--hidden", str(hidden)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_measuring_env()).stdout
    results = json.loads(out.strip().splitlines()[-1])
    refs = {(r["n"], r["chunk"]): r for r in results if r["loss"] == reference}
    for r in results:
        ref = refs.get((r["n"], r["chunk"]))
        if ref is not None:
            r["time_vs_reference"] = r["seconds"] / ref["seconds"]
            if r["extra_peak_in_logits"] is not None and ref["extra_peak_in_logits"]:
                r["memory_vs_reference"] = r["extra_peak_in_logits"] / ref["extra_peak_in_logits"]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768, help="D of the output layer's losses (--linear)")
    parser.add_argument("--chunk", type=int, default=None, help="linear_cross_entropy's chunk_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linear", action="store_true", help="measure the output layer's losses instead")
    parser.add_argument("--only", nargs="*", default=None, help="names of losses to run (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps([run_one(spec["loss"], spec["n"], args.vocab, args.repeats, args.hidden, spec["chunk"])
                          for spec in json.loads(args.one)]))
        return
    table = LINEAR_LOSSES if args.linear else LOSSES
    reference = "F.linear + F.cross_entropy" if args.linear else "F.cross_entropy"
    results = measure(args.only or list(table), args.n, args.vocab, repeats=args.repeats, hidden=args.hidden,
                      chunk=args.chunk, reference=reference)
    for r in results:
        print(f"{r['loss']:48s} {r['seconds']:.3f} s (median {r['seconds_median']:.3f}) "
              f"({r.get('time_vs_reference', float('nan')):.2f}x)  "
              f"extra peak {r['extra_peak_in_logits'] or float('nan'):.3f}x logits", flush=True)
    out = args.out or Path("bench/results") / ("linear_losses.json" if args.linear else "losses.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "vocab": args.vocab, "hidden": args.hidden if args.linear else None,
                               "reference": reference, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
