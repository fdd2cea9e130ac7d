"""Time and extra peak memory of token-level losses, forward plus backward, on the CPU.

    python -m minigpt.loss_bench --n 8192 --vocab 50257 --out bench/results/losses.json

Each loss runs in its own process (so that peak memory is its own): the process allocates the (N, V)
float32 logits, resets its peak-RSS counter, and times ``repeats`` forward+backward passes; "extra peak
memory" is the peak resident memory above what the process held with the logits allocated, in units of
the logits' size. ``F.cross_entropy`` is measured in the same run as the reference. Time is the
fastest of the repeats (the median is kept too): large fresh allocations make single repeats noisy.
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


def run_one(name: str, n: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(n, vocab, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    fn = LOSSES[name]
    fn(x, y).backward()  # warm up (and let the allocator settle)
    x.grad = None
    logits_mib = n * vocab * 4 / 2**20
    times, extra = [], []
    for _ in range(repeats):
        base = _rss_kib("VmRSS")
        ok = _reset_peak()
        t0 = time.perf_counter()
        fn(x, y).backward()
        times.append(time.perf_counter() - t0)
        x.grad = None
        if ok:
            extra.append((_rss_kib("VmHWM") - base) / 1024 / logits_mib)
    # The minimum is the robust statistic here: on a VM whose kernel reclaims memory (kdamond), some
    # repeats pay to fault 1.6 GB back in and take twice as long; the median is reported beside it.
    return {"loss": name, "seconds": min(times), "seconds_median": statistics.median(times), "times": times,
            "extra_peak_in_logits": statistics.median(extra) if extra else None, "logits_mib": logits_mib}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names of losses to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/losses.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.n, args.vocab, args.repeats)))
        return
    results = []
    for name in args.only or list(LOSSES):
        cmd = [sys.executable, "-m", "minigpt.loss_bench", "--one", name, "--n", str(args.n),
               "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    ref = next((r for r in results if r["loss"] == "F.cross_entropy"), None)
    for r in results:
        if ref is not None:
            r["time_vs_F.cross_entropy"] = r["seconds"] / ref["seconds"]
            if r["extra_peak_in_logits"] is not None and ref["extra_peak_in_logits"]:
                r["memory_vs_F.cross_entropy"] = r["extra_peak_in_logits"] / ref["extra_peak_in_logits"]
        print(f"{r['loss']:48s} {r['seconds']:.3f} s (median {r['seconds_median']:.3f}) "
              f"({r.get('time_vs_F.cross_entropy', float('nan')):.2f}x)  "
              f"extra peak {r['extra_peak_in_logits'] or float('nan'):.2f}x logits", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "vocab": args.vocab, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
