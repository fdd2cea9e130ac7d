#!/usr/bin/env bash
# Issue 20: every chapter at MINIGPT_SCALE=full on a CUDA GPU, all at once, in one call of under ~9 minutes.
#
#   bash bench/full_scale.sh [COMMIT] [--bench]
#
# For a machine with the scientific stack (torch with CUDA, numpy, scipy, scikit-learn, matplotlib, tqdm)
# but no network and no Jupyter: nothing is installed. The package is imported from the checkout
# (PYTHONPATH), the corpus is read from .gpudata/tinyshakespeare/input.txt (git-ignored; carry it), and
# each chapter is executed by bench/run_chapter.py, which stands in for nbval and myst_nb (see its
# docstring). Each chapter runs under `timeout`; one still running at the deadline is killed and recorded
# as "timed out after N s, reached cell k of M", with what it glued until then.
#
# Writes to $OUT (or bench/results/full_scale/ when OUT is unset):
#   full_scale.json  GPU, commit, and per chapter: status, wall time, failing cells with traceback tails,
#                    every glued value as text, time per cell, peak CUDA memory
#   logs.txt         every chapter's output, the preflight and the nvidia-smi snapshots
# With --bench, `python -m minigpt.bench --gpu` (nanoGPT's GPU configuration, 5000 updates, with the bare
# reference loop timed before and after) runs beside the chapters; its report goes into full_scale.json
# under "bench_gpu". It shares the GPU with the chapters, so its speed is not a clean measurement.
#
# Knobs (environment): PYTHON (python3), BUDGET_S (515: seconds from start to the chapters' deadline; a
# chapter gets 10 s more to die after SIGTERM, and the collection takes seconds: under 540 s in all),
# CHAPTER_LIMIT_S (cap on a chapter's time, 500), MINIGPT_THREADS (1 per chapter), MINIGPT_SEED (0),
# CHAPTERS (glob of notebooks, default notebooks/0*.md).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
COMMIT=""; BENCH=0
for arg in "$@"; do
  case "$arg" in
    --bench) BENCH=1 ;;  # also run `python -m minigpt.bench --gpu` (nanoGPT's GPU configuration) alongside
    *) COMMIT=$arg ;;
  esac
done
[ -z "$COMMIT" ] && COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
OUTDIR=${OUT:-$REPO/bench/results/full_scale}
WORK=$(mktemp -d /tmp/full_scale.XXXXXX)
mkdir -p "$OUTDIR"
BUDGET_S=${BUDGET_S:-515}
CAP=${CHAPTER_LIMIT_S:-500}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MINIGPT_DATA_DIR=${MINIGPT_DATA_DIR:-$REPO/.gpudata}
export MINIGPT_SCALE=full MINIGPT_SEED=${MINIGPT_SEED:-0} MINIGPT_PROGRESS=0 MPLBACKEND=Agg
export MINIGPT_DEVICE=${MINIGPT_DEVICE:-cuda}  # without CUDA a chapter fails at once instead of running on the CPU
export OMP_NUM_THREADS=${MINIGPT_THREADS:-1} MINIGPT_THREADS=${MINIGPT_THREADS:-1}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# Preflight: GPU, imports, corpus (seconds; its output goes into logs.txt).
{
  echo "commit=$COMMIT start=$(date -u +%FT%TZ) python=$(command -v "$PY") repo=$REPO"
  nvidia-smi 2>&1 | head -30
  "$PY" - <<'EOF' 2>&1
import importlib, pkgutil, time
t = time.time()
import torch, minigpt
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "scale", minigpt.scale(),
      "device", minigpt.device())
for m in pkgutil.walk_packages(minigpt.__path__, "minigpt."):
    try:
        importlib.import_module(m.name)
    except Exception as exc:
        print("IMPORT FAILED", m.name, repr(exc))
from minigpt.data import load_shakespeare
print("corpus chars", len(load_shakespeare().train) + len(load_shakespeare().val), f"preflight {time.time() - t:.1f} s")
EOF
} > "$WORK/preflight.log" 2>&1
cat "$WORK/preflight.log"

( while true; do
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu \
      --format=csv,noheader >> "$WORK/nvidia_smi.csv" 2>&1
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';' \
      | sed 's/^/  apps: /' >> "$WORK/nvidia_smi.csv"; echo >> "$WORK/nvidia_smi.csv"
    sleep 10
  done ) > /dev/null 2>&1 &
SMI=$!

LIMIT=$(( BUDGET_S - SECONDS ))
(( LIMIT > CAP )) && LIMIT=$CAP
echo "chapter limit ${LIMIT} s (${SECONDS} s spent before launch)"
STARTED=$(date +%s.%N)
PIDS=()
for nb in ${CHAPTERS:-notebooks/0*.md}; do
  name=$(basename "$nb" .md)
  (
    t0=$(date +%s.%N)
    timeout -k 10 "$LIMIT" "$PY" bench/run_chapter.py "$nb" --out "$WORK/$name.json" > "$WORK/$name.log" 2>&1
    echo $? > "$WORK/$name.rc"
    awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }" > "$WORK/$name.wall"
  ) &
  PIDS+=($!)
done
if (( BENCH )); then  # BENCH_ARGS: e.g. "--iters 2000 --eval-iters 20" for a shorter run
  ( timeout -k 10 "$LIMIT" "$PY" -m minigpt.bench --gpu ${BENCH_ARGS:-} --out "$WORK/bench_gpu.json" \
      > "$WORK/bench_gpu.log" 2>&1; echo $? > "$WORK/bench_gpu.exit" ) &
  PIDS+=($!)
fi
( sleep 60; nvidia-smi > "$WORK/nvidia_smi_full.txt" 2>&1 ) > /dev/null 2>&1 &  # one full picture with every chapter running
FULL=$!
wait "${PIDS[@]}"
kill "$SMI" "$FULL" 2>/dev/null

"$PY" bench/collect_full_scale.py "$WORK" "$OUTDIR" --commit "$COMMIT" --limit "$LIMIT" --started "$STARTED"
echo "total ${SECONDS} s; wrote $OUTDIR/full_scale.json and $OUTDIR/logs.txt"
