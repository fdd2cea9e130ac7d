"""Throughput and quality benchmark on nanoGPT's CPU configuration for character-level Shakespeare
(and, with ``--gpu``, its GPU configuration: :func:`run_gpu`).

    python -m minigpt.bench --threads 1 2 --seeds 4 --reference-seeds 1337 1338 1339 1340 \
        --out bench/results/bench.json

For each thread count, in a fresh process: trains the small GPT (4 layers, 4 heads, 128 wide, block 64,
batch 12) for 2000 updates with :func:`minigpt.train.train` and nanoGPT's hyperparameters, and records

- the median steady-state milliseconds per update (updates 51 onward; evaluation time excluded) and the
  interquartile range, as a measure of noise; tokens per second from the median;
- the validation loss every 250 updates, estimated as nanoGPT does (20 batches of 12 x 64 tokens), and
  at the end over the whole validation split (every token, non-overlapping 64-token windows);
- with ``--seeds N``, the same training for N seeds, and the mean and 95% t-interval of the final
  validation loss (one seed is one sample of a noisy quantity: compare distributions, not draws);
- with ``--reference-seeds``, nanoGPT's own training loop (:func:`nanogpt_reference_run`) for those
  seeds, its mean, and a Welch test of minigpt's full-split loss against it;
- a *bare loop* reference measured before and after the run: forward, backward, clip, AdamW step on the
  same model with nothing else (no checks, history or evaluation), nanoGPT's own loop structure. Run next to
  the trainer on the same machine at the same time, it separates the trainer's overhead from how fast
  the machine happens to be (a shared 2-core VM varies by 10-20% from minute to minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


BATCH_SIZE, BLOCK_SIZE = 12, 64  # nanoGPT's CPU configuration


def _quantiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}


def bare_loop_ms(model, get_batch, iters: int, warmup: int = 20, seed: int = 12345, fused: bool = False) -> dict:
    """Milliseconds per update of a minimal loop (nanoGPT's: forward, mean cross-entropy, backward, clip,
    AdamW step), on a copy of the optimizer state so that ``model``'s weights come out unchanged.
    ``fused``: the fused AdamW kernel, as nanoGPT uses on CUDA."""
    import copy

    model = copy.deepcopy(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99),  # nanoGPT's CPU default
                            **({"fused": True} if fused else {}))
    gen = torch.Generator().manual_seed(seed)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        x, y = get_batch("train", gen)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return _quantiles(times)


@torch.no_grad()
def full_val_loss(model, tokens: torch.Tensor, block_size: int, batch: int = 256) -> float:
    """Token-mean cross-entropy over a whole split, in non-overlapping windows of ``block_size``."""
    model.eval()
    n = (len(tokens) - 1) // block_size
    x_all = tokens[: n * block_size].view(n, block_size)
    y_all = tokens[1 : n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch):
        _, loss_sum = model(x_all[i : i + batch], y_all[i : i + batch], reduction="sum")
        total += float(loss_sum)
    model.train()
    return total / (n * block_size)


def nanogpt_reference_run(seed: int, iters: int = 2000) -> dict:
    """nanoGPT's training loop on the same model, for a like-for-like quality comparison.

    What makes it nanoGPT's rather than minigpt's: one global RNG seeded once before the model is built,
    from which training *and* evaluation batches are drawn in nanoGPT's order (the first batch before the
    loop, the next one right after each forward pass); plain (unfused) AdamW; and evaluation on 20 fresh
    random batches per split. With seed 1337, nanoGPT's, it reproduces nanoGPT's reported validation
    loss at 2000 updates (1.8857) to every printed digit, so its numbers stand in for nanoGPT's own.
    """
    from .data import load_shakespeare, random_blocks
    from .model import GPT, GPTConfig
    from .train import TrainConfig, configure_optimizer, lr_at

    corpus = load_shakespeare()
    cfg = TrainConfig(max_iters=iters)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size))
    opt = configure_optimizer(model, cfg, fused=False)  # nanoGPT fuses AdamW on CUDA only
    splits = {"train": corpus.train, "val": corpus.val}

    def batch(split):  # generator=None: the global RNG, as nanoGPT's get_batch
        return random_blocks(splits[split], BATCH_SIZE, BLOCK_SIZE)

    @torch.no_grad()
    def estimate(split):
        model.eval()
        loss = sum(model(*batch(split))[1].item() for _ in range(20)) / 20
        model.train()
        return loss

    val_every_250 = {}
    x, y = batch("train")
    for it in range(iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg)
        if it % 250 == 0 or it == iters:
            estimate("train")  # nanoGPT evaluates both splits; the train draws move the RNG
            val_every_250[it] = estimate("val")
        if it == iters:
            break
        _, loss = model(x, y)
        x, y = batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "seed": seed,
        "val_loss_every_250": val_every_250,
        "final_val_loss_20_batches": val_every_250[iters],
        "final_val_loss_full_split": full_val_loss(model, corpus.val, BLOCK_SIZE),
    }


def run_one(threads: int, iters: int, seed: int, bare_iters: int) -> dict:
    """One benchmark in this process with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    from .data import load_shakespeare
    from .model import GPT, GPTConfig
    from .train import TrainConfig, train

    corpus = load_shakespeare()
    model_cfg = GPTConfig(vocab_size=corpus.vocab_size)
    train_cfg = TrainConfig(max_iters=iters, eval_interval=250, eval_iters=20,
                            seed=seed, progress=False)
    get_batch = corpus.batch_fn(batch_size=BATCH_SIZE, block_size=model_cfg.block_size)
    torch.manual_seed(seed)
    model = GPT(model_cfg)

    bare_before = bare_loop_ms(model, get_batch, bare_iters) if bare_iters else None
    result = train(model, get_batch, train_cfg)
    bare_after = bare_loop_ms(model, get_batch, bare_iters) if bare_iters else None

    steady = [1000 * s for s in result.history.seconds[50:]]
    ms = _quantiles(steady)
    tokens_per_update = BATCH_SIZE * model_cfg.block_size
    # Time relative to nanoGPT's bare loop measured alongside: the machine's speed cancels out.
    ratio = (ms["median"] / ((bare_before["median"] + bare_after["median"]) / 2)) if bare_iters else None
    return {
        "threads": threads,
        "seed": seed,
        "iters": iters,
        "parameters": model.num_parameters(),
        "ms_per_iter": ms,
        "tokens_per_s": tokens_per_update / (ms["median"] / 1000),
        "bare_loop_ms_per_iter_before": bare_before,
        "bare_loop_ms_per_iter_after": bare_after,
        "time_vs_bare_loop": ratio,
        "val_loss_every_250": dict(zip(result.history.eval_step, result.history.val_loss)),
        "train_loss_every_250": dict(zip(result.history.eval_step, result.history.train_loss)),
        "final_val_loss_20_batches": result.history.val_loss[-1],
        "final_val_loss_full_split": full_val_loss(model, corpus.val, model_cfg.block_size),
        "train_seconds": result.seconds,
    }


# nanoGPT's GPU configuration for character Shakespeare (config/train_shakespeare_char.py) and the
# validation loss its README reports for it.
GPU_CONFIG = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, max_iters=5000,
                  learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=200)
NANOGPT_GPU_VAL_LOSS = 1.4697


def run_gpu(iters: int = 5000, seed: int = 0, bare_iters: int = 200, eval_iters: int = 200, *,
            device: torch.device | str | None = None, batch_size: int = 64, bare_warmup: int = 20,
            full_split: bool = True) -> dict:
    """nanoGPT's GPU configuration (:data:`GPU_CONFIG`: 10.7M parameters, block 256, batch 64, dropout
    0.2) trained by :func:`minigpt.train.train` on ``device`` (default :func:`minigpt.device`), with
    nanoGPT's bare loop on the same model timed before and after, as :func:`run_one` does for the CPU
    configuration. The loop runs in float32 (TF32 products on CUDA, see :func:`minigpt.configure_cuda`);
    nanoGPT's own script adds bfloat16 autocast and ``torch.compile``, which neither loop here uses."""
    from .config import configure_cuda
    from .config import device as default_device
    from .data import load_shakespeare
    from .model import GPT, GPTConfig
    from .train import TrainConfig, train

    dev = torch.device(device) if device is not None else default_device()
    tf32 = configure_cuda() if dev.type == "cuda" else False
    c = GPU_CONFIG
    corpus = load_shakespeare()
    model_cfg = GPTConfig(block_size=c["block_size"], vocab_size=corpus.vocab_size, n_layer=c["n_layer"],
                          n_head=c["n_head"], n_embd=c["n_embd"], dropout=c["dropout"])
    train_cfg = TrainConfig(max_iters=iters, learning_rate=c["learning_rate"], min_lr=c["min_lr"],
                            warmup_iters=c["warmup_iters"], beta2=c["beta2"], eval_interval=c["eval_interval"],
                            eval_iters=eval_iters, seed=seed, progress=False)
    get_batch = corpus.batch_fn(batch_size=batch_size, block_size=c["block_size"], device=dev)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(dev)
    fused = dev.type == "cuda"

    bare_before = bare_loop_ms(model, get_batch, bare_iters, bare_warmup, fused=fused) if bare_iters else None
    result = train(model, get_batch, train_cfg)
    bare_after = bare_loop_ms(model, get_batch, bare_iters, bare_warmup, fused=fused) if bare_iters else None

    steady = [1000 * s for s in result.history.seconds[min(50, len(result.history.seconds) - 1):]]
    ms = _quantiles(steady) if len(steady) >= 2 else {"median": steady[0], "q1": steady[0], "q3": steady[0]}
    bare_ms = (bare_before["median"] + bare_after["median"]) / 2 if bare_iters else None
    final = result.history.val_loss[-1]
    return {
        "config": dict(c, max_iters=iters, eval_iters=eval_iters, batch_size=batch_size),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "tf32": tf32,
        "seed": seed,
        "parameters": model.num_parameters(),
        "ms_per_iter": ms,
        "tokens_per_s": batch_size * c["block_size"] / (ms["median"] / 1000),
        "bare_loop_ms_per_iter_before": bare_before,
        "bare_loop_ms_per_iter_after": bare_after,
        "time_vs_bare_loop": ms["median"] / bare_ms if bare_ms else None,
        "train_seconds": result.seconds,  # evaluations included
        "bare_loop_seconds_for_the_run": bare_ms * iters / 1000 if bare_ms else None,
        "val_loss_every_250": dict(zip(result.history.eval_step, result.history.val_loss)),
        "train_loss_every_250": dict(zip(result.history.eval_step, result.history.train_loss)),
        "final_val_loss": final,
        "nanogpt_reported_val_loss": NANOGPT_GPU_VAL_LOSS,
        "at_most_1_47": final <= 1.47,
        "final_val_loss_full_split": (full_val_loss(model, corpus.val.to(dev), c["block_size"])
                                      if full_split else None),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=None, help="updates (default 2000; 5000 with --gpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bare-iters", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train this many seeds (base seed onward) for the quality summary; seeds past "
                             "the first run two at a time with one thread each")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench.json"))
    parser.add_argument("--reference-seeds", type=int, nargs="*", default=[],
                        help="also train nanoGPT's own loop with these seeds (1337 is nanoGPT's) and compare")
    parser.add_argument("--gpu", action="store_true",
                        help="nanoGPT's GPU configuration (GPU_CONFIG) on minigpt.device(), in this process; "
                             "--iters defaults to its 5000 there, --eval-iters to its 200")
    parser.add_argument("--eval-iters", type=int, default=200, help="with --gpu: batches per evaluation")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run in-process
    parser.add_argument("--one-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = GPU_CONFIG["max_iters"] if args.gpu else 2000

    if args.gpu:
        run = run_gpu(args.iters, args.seed, args.bare_iters, args.eval_iters)
        ms = run["ms_per_iter"]
        bare = (f"bare loop {run['bare_loop_ms_per_iter_before']['median']:.2f} / "
                f"{run['bare_loop_ms_per_iter_after']['median']:.2f} ms before/after "
                f"(trainer/bare = {run['time_vs_bare_loop']:.3f})") if args.bare_iters else "no bare loop"
        print(f"{run['device_name']}: {ms['median']:.2f} ms/iter, {run['tokens_per_s']:.0f} tokens/s; {bare}; "
              f"{run['train_seconds']:.1f} s in all; "
              f"val loss {run['final_val_loss']:.4f} (nanoGPT: {NANOGPT_GPU_VAL_LOSS}), "
              f"{run['final_val_loss_full_split']:.4f} (full split)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(run, indent=2))
        print(f"wrote {args.out}")
        return
    if args.one:
        print(json.dumps(run_one(args.threads[0], args.iters, args.seed, args.bare_iters)))
        return
    if args.one_reference:
        torch.set_num_threads(1)
        print(json.dumps(nanogpt_reference_run(args.seed, args.iters)))
        return

    def launch(threads: int, seed: int, bare_iters: int, reference: bool = False) -> subprocess.Popen:
        # A fresh process per run: torch's thread pool is sized once per process.
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MINIGPT_THREADS=str(threads))
        cmd = [sys.executable, "-m", "minigpt.bench", "--one-reference" if reference else "--one",
               "--threads", str(threads), "--iters", str(args.iters), "--seed", str(seed),
               "--bare-iters", str(bare_iters)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    def collect(proc: subprocess.Popen) -> dict:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"benchmark run failed (exit {proc.returncode}): {proc.args}")
        return json.loads(out.strip().splitlines()[-1])

    runs = []
    for threads in args.threads:
        run = collect(launch(threads, args.seed, args.bare_iters))
        runs.append(run)
        ms = run["ms_per_iter"]
        print(f"threads={threads}: {ms['median']:.1f} ms/iter (IQR {ms['q1']:.1f}-{ms['q3']:.1f}), "
              f"{run['tokens_per_s']:.0f} tokens/s; bare loop {run['bare_loop_ms_per_iter_before']['median']:.1f}"
              f" / {run['bare_loop_ms_per_iter_after']['median']:.1f} ms before/after "
              f"(trainer/bare = {run['time_vs_bare_loop']:.2f}); "
              f"val loss {run['final_val_loss_20_batches']:.4f} (20 batches), "
              f"{run['final_val_loss_full_split']:.4f} (full split)", flush=True)

    # Quality over seeds: the speed runs' seed plus args.seeds - 1 more, two processes at a time.
    quality = {args.seed: runs[0]} if runs else {}
    extra = [args.seed + i for i in range(1, args.seeds)]
    for i in range(0, len(extra), 2):
        for seed, proc in [(s, launch(1, s, 0)) for s in extra[i:i + 2]]:
            quality[seed] = collect(proc)
            print(f"seed={seed}: val loss {quality[seed]['final_val_loss_20_batches']:.4f} (20 batches), "
                  f"{quality[seed]['final_val_loss_full_split']:.4f} (full split)", flush=True)
    reference = {}
    seeds = list(args.reference_seeds)
    for i in range(0, len(seeds), 2):
        for seed, proc in [(s, launch(1, s, 0, reference=True)) for s in seeds[i:i + 2]]:
            reference[seed] = collect(proc)
            print(f"nanoGPT loop, seed={seed}: val loss {reference[seed]['final_val_loss_20_batches']:.4f} "
                  f"(20 batches), {reference[seed]['final_val_loss_full_split']:.4f} (full split)", flush=True)

    summary = {}
    for name, group in (("minigpt", quality), ("nanogpt_loop", reference)):
        if len(group) < 2:
            continue
        from .experiments import mean_ci

        for key in ("final_val_loss_full_split", "final_val_loss_20_batches"):
            ci = mean_ci([q[key] for q in group.values()])
            summary.setdefault(name, {})[key] = {"mean": ci.mean, "ci95_low": ci.low, "ci95_high": ci.high, "n": ci.n}
            print(f"{name} {key} over seeds {sorted(group)}: {ci}")
    if len(quality) >= 2 and len(reference) >= 2:
        from scipy import stats

        key = "final_val_loss_full_split"
        a, b = [q[key] for q in quality.values()], [r[key] for r in reference.values()]
        test = stats.ttest_ind(a, b, equal_var=False)
        summary["minigpt_minus_nanogpt_full_split"] = {
            "difference": sum(a) / len(a) - sum(b) / len(b), "welch_t": float(test.statistic),
            "p_value": float(test.pvalue)}
        print(f"minigpt - nanoGPT loop, full split: {summary['minigpt_minus_nanogpt_full_split']['difference']:+.4f} "
              f"(Welch p = {test.pvalue:.2f})")

    report = {
        "config": "nanoGPT CPU: n_layer 4, n_head 4, n_embd 128, block 64, batch 12, lr 1e-3 -> 1e-4, "
                  "warmup 100, beta2 0.99, weight decay 0.1, clip 1.0, dropout 0",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
        "quality_runs": [{k: v for k, v in q.items() if k not in ("bare_loop_ms_per_iter_before",
                          "bare_loop_ms_per_iter_after", "time_vs_bare_loop")} for q in quality.values()],
        "nanogpt_loop_runs": list(reference.values()),
        "quality_summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
