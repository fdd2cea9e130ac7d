"""Gather the per-chapter results of ``bench/full_scale.sh`` into one JSON file and one log file.

    python bench/collect_full_scale.py WORKDIR OUTDIR --commit SHA --limit SECONDS

WORKDIR holds, per chapter NAME: ``NAME.json`` (written by ``bench/run_chapter.py`` as it goes),
``NAME.log`` (its stdout and stderr), ``NAME.rc`` (its exit status under ``timeout``) and ``NAME.wall``
(seconds from launch to exit, measured by the shell). Writes ``OUTDIR/full_scale.json`` and
``OUTDIR/logs.txt`` (every chapter's log, each cut to its last ``--log-bytes`` bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return ""


def _sha(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def chapter_entry(work: Path, name: str, limit: float, repo: Path) -> dict:
    rc_text = _read(work / f"{name}.rc")
    rc = int(rc_text) if rc_text.lstrip("-").isdigit() else None
    wall = _read(work / f"{name}.wall")
    log = _read(work / f"{name}.log")
    try:
        res = json.loads((work / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        res = None
        missing = repr(exc)
    entry = {"exit_code": rc, "wall_s": float(wall) if wall else None}
    notebook = repo / "notebooks" / f"{name}.md"
    if notebook.exists():
        entry["notebook_sha256_16"] = _sha([notebook])
    if res is None:
        entry.update(status="crashed before its first cell" if rc not in (124, 137) else
                     f"timed out after {limit:.0f} s before its first cell",
                     result_json_missing=missing, log_tail="\n".join(log.splitlines()[-40:]))
        return entry
    n, done, cell = res.get("n_cells"), res.get("cells_done", 0), res.get("cell")
    timed_out = rc in (124, 137) or res.get("status") in ("running", "killed")
    if timed_out:
        status = f"timed out after {limit:.0f} s, reached cell {cell} of {n} ({done} cells finished)"
        if res.get("errors"):
            status += f"; {len(res['errors'])} failing cell(s) before that, first at cell {res['errors'][0]['cell']}"
    elif res.get("status") == "passed" and rc == 0:
        status = "passed"
    elif res.get("status") == "failed":
        first = res["errors"][0]
        status = f"failed: {len(res['errors'])} failing cell(s), first at cell {first['cell']} ({first['type']})"
    else:
        status = f"unclear: result says {res.get('status')!r}, exit code {rc}"
    entry.update(
        status=status, passed=status == "passed", timed_out=timed_out, n_cells=n, cells_done=done,
        reached_cell=cell, elapsed_s=res.get("elapsed_s"), cell_times_s=res.get("cell_times_s"),
        cuda_max_allocated_mib=res.get("cuda_max_allocated_mib"), errors=res.get("errors", []),
        glue={k: v["text"] for k, v in res.get("glue", {}).items()},
        glue_kind={k: v["kind"] for k, v in res.get("glue", {}).items()},
        dropped_magics=res.get("dropped_magics", []), env=res.get("env", {}),
    )
    if not entry["passed"]:
        entry["log_tail"] = "\n".join(log.splitlines()[-30:])
    return entry


def nvidia_summary(path: Path) -> dict:
    """Peak memory used and utilisation over the ``nvidia-smi --query-gpu`` CSV snapshots."""
    used, util = [], []
    for line in _read(path).splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            util.append(float(parts[1].split()[0]))
            used.append(float(parts[2].split()[0]))
        except (ValueError, IndexError):
            continue
    if not used:
        return {"snapshots": 0}
    return {"snapshots": len(used), "peak_memory_used_mib": max(used),
            "mean_utilization_pct": round(sum(util) / len(util), 1), "max_utilization_pct": max(util)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--commit", default="")
    p.add_argument("--limit", type=float, required=True)
    p.add_argument("--started", type=float, default=None, help="unix time the chapters were launched")
    p.add_argument("--log-bytes", type=int, default=1_500_000)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = p.parse_args(argv)

    names = sorted(f.name[:-3] for f in args.work.glob("*.rc"))
    report = {
        "commit": args.commit or None,
        "scale": "full",
        "chapter_timeout_s": args.limit,
        "package_sha256_16": _sha(list((args.repo / "minigpt").rglob("*.py"))),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "wall_s": round(time.time() - args.started, 1) if args.started else None,
    }
    try:
        import torch

        report["machine"].update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
            report["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        else:
            report["gpu"] = None
    except Exception as exc:  # the report must still be written
        report["gpu"] = f"unknown ({exc!r})"
    report["nvidia_smi"] = nvidia_summary(args.work / "nvidia_smi.csv")
    report["chapters"] = {n: chapter_entry(args.work, n, args.limit, args.repo) for n in names}
    if (args.work / "bench_gpu.exit").exists():
        bench = {"exit_code": _read(args.work / "bench_gpu.exit"),
                 "log_tail": "\n".join(_read(args.work / "bench_gpu.log").splitlines()[-20:])}
        try:
            bench["report"] = json.loads((args.work / "bench_gpu.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            bench["report"] = None
            bench["missing"] = f"no report ({exc!r}): killed at the time limit or crashed, see log_tail"
        report["bench_gpu"] = bench
    report["summary"] = {n: c["status"] + (f" in {c['wall_s']:.0f} s" if c.get("wall_s") else "")
                         for n, c in report["chapters"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "full_scale.json").write_text(json.dumps(report, indent=1, default=str))

    with open(args.out / "logs.txt", "w") as fh:
        for n in names:
            data = (args.work / f"{n}.log").read_bytes() if (args.work / f"{n}.log").exists() else b""
            cut = len(data) > args.log_bytes
            fh.write(f"\n{'=' * 30} {n} ({len(data)} bytes{', last part only' if cut else ''}) {'=' * 30}\n")
            fh.write(data[-args.log_bytes:].decode(errors="replace"))
        for extra in ("bench_gpu.log", "preflight.log", "nvidia_smi.csv", "nvidia_smi_full.txt"):
            if (args.work / extra).exists():
                fh.write(f"\n{'=' * 30} {extra} {'=' * 30}\n")
                fh.write((args.work / extra).read_text(errors="replace")[-args.log_bytes:])
    for n, s in report["summary"].items():
        print(f"{n}: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
