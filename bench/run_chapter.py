"""Run one chapter (a Jupytext MyST-markdown notebook) without Jupyter, and record what it glued.

For a machine that has the book's package and its scientific stack but no Jupyter (no jupytext, nbval,
myst_nb or kernel), such as the GPU machine of issue 20. It does what ``pytest --nbval-lax`` does with a
chapter, in one plain Python process:

- reads the ```` ```{code-cell} ```` blocks in order (option lines ``:key: value`` and a ``---`` YAML
  option block at the top of a cell are skipped; IPython magics ``%...``/``!...`` are dropped, and
  listed in the result);
- executes them in one namespace (``__name__ == "__main__"``), with the notebook's folder as the working
  directory and matplotlib's Agg backend, as the book's kernels do;
- like nbval, a failing cell does not stop the run: later cells still execute (they may fail in turn
  for want of what the failed cell would have defined; the first failure is the one to read);
- replaces ``myst_nb`` with a stub whose ``glue(name, value, display=True)`` records a text form of the
  value: a ``str`` as itself, a number as its ``repr``, a matplotlib figure as ``<figure>``, anything
  with a Markdown form (``_repr_markdown_``, as :func:`minigpt.report.glue_text` glues) as that text,
  anything else as its ``repr``.

The result JSON is rewritten after every cell and every glue call, so a run that is killed (``timeout``)
still leaves the cell it had reached, the time per finished cell and everything glued so far; its
``status`` then stays ``"running"``, which the caller reads as killed.

    python bench/run_chapter.py notebooks/01_foundations.md --out /tmp/ch1.json
"""

from __future__ import annotations

import argparse
import json
import linecache
import math
import os
import signal
import sys
import time
import traceback
import types
from pathlib import Path

MAX_TEXT = 20_000  # a glued value longer than this is cut (tables are a few kB)


def parse_cells(text: str) -> tuple[list[str], list[str]]:
    """The code cells of a MyST-markdown notebook, in order, and the magic lines that were dropped."""
    lines = text.splitlines()
    i = 0
    if lines and lines[0].strip() == "---":  # the notebook's YAML front matter
        end = next((j for j in range(1, len(lines)) if lines[j].strip() == "---"), None)
        if end is None:
            raise ValueError("front matter opened with '---' is never closed")
        i = end + 1
    cells: list[str] = []
    dropped: list[str] = []
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip("`")
        fence = line[: len(line) - len(stripped)]
        if len(fence) >= 3 and stripped.startswith("{code-cell}"):
            i += 1
            body: list[str] = []
            while i < len(lines) and lines[i].rstrip() != fence:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"code cell {len(cells)} is never closed by {fence}")
            cells.append(_cell_source(body, dropped))
        i += 1
    return cells, dropped


def _cell_source(body: list[str], dropped: list[str]) -> str:
    k = 0
    if body and body[0].strip() == "---":  # a YAML option block
        end = next((j for j in range(1, len(body)) if body[j].strip() == "---"), None)
        if end is None:
            raise ValueError("a cell's '---' option block is never closed")
        k = end + 1
    else:
        while k < len(body) and body[k].startswith(":") and ":" in body[k][1:]:
            k += 1  # ':tags: [remove-input]' and the like
    source = []
    for line in body[k:]:
        if line.lstrip().startswith(("%", "!")):
            dropped.append(line.strip())
            source.append("")  # keep the line numbers of the tracebacks
        else:
            source.append(line)
    return "\n".join(source) + "\n"


def text_form(value) -> tuple[str, str]:
    """``(kind, text)`` for a glued value."""
    if isinstance(value, str):
        return "str", value
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return "number", repr(value)
    module = type(value).__module__ or ""
    if module.startswith("numpy") and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return "number", repr(value.item())
    if module.startswith("matplotlib") and hasattr(value, "savefig"):
        return "figure", "<figure>"
    markdown = getattr(value, "_repr_markdown_", None)
    if callable(markdown):
        out = markdown()
        if isinstance(out, tuple):
            out = out[0]
        if out is not None:
            return "markdown", str(out)
    bundle = getattr(value, "_repr_mimebundle_", None)
    if callable(bundle):
        data = bundle()
        data = data[0] if isinstance(data, tuple) else data
        for mime in ("text/markdown", "text/plain"):
            if isinstance(data, dict) and mime in data:
                return mime, str(data[mime])
    return "repr", repr(value)


class Recorder:
    def __init__(self, out: Path, notebook: Path, n_cells: int, dropped: list[str]):
        self.out = out
        self.t0 = time.perf_counter()
        self.result = {
            "notebook": str(notebook), "status": "running", "n_cells": n_cells, "cell": None,
            "cells_done": 0, "elapsed_s": 0.0, "cell_times_s": [], "errors": [], "glue": {},
            "dropped_magics": dropped, "env": {k: v for k, v in os.environ.items() if k.startswith("MINIGPT_")},
            "started_unix": time.time(), "pid": os.getpid(),
        }
        self.write()

    def write(self) -> None:
        r = self.result
        r["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                r["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        except Exception:  # never let bookkeeping fail the run
            pass
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(r, indent=1, default=str))
        os.replace(tmp, self.out)

    def glue(self, name, value, display=True):
        try:
            kind, text = text_form(value)
        except Exception as exc:  # a value whose repr fails is still evidence of the glue
            kind, text = "error", f"<text form failed: {exc!r}>"
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + f"... <cut, {len(text)} chars>"
        self.result["glue"][str(name)] = {"kind": kind, "text": text, "cell": self.result["cell"]}
        self.write()


def install_stubs(recorder: Recorder) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    stub = types.ModuleType("myst_nb")
    stub.glue = recorder.glue
    stub.__file__ = "<bench/run_chapter.py stub>"
    sys.modules["myst_nb"] = stub


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="result JSON, rewritten as the run goes")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failing cell")
    args = parser.parse_args(argv)

    notebook = args.notebook.resolve()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cells, dropped = parse_cells(notebook.read_text(encoding="utf-8"))
    rec = Recorder(out, notebook, len(cells), dropped)
    install_stubs(rec)

    def on_term(signum, frame):  # timeout's SIGTERM: say so, keep what was recorded
        rec.result["status"] = "killed"
        rec.result["signal"] = signal.Signals(signum).name
        rec.write()
        print(f"\n[run_chapter] {notebook.name}: {rec.result['signal']} in cell {rec.result['cell']} of "
              f"{len(cells)} at {rec.result['elapsed_s']:.1f} s", flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    data_dir = os.environ.get("MINIGPT_DATA_DIR", "").strip()
    if data_dir:  # relative to where we were started, as conftest.py resolves it, before the chdir below
        os.environ["MINIGPT_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    repo = notebook.parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    os.chdir(notebook.parent)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for k, source in enumerate(cells):
        rec.result["cell"] = k
        rec.write()
        filename = f"<{notebook.name} cell {k}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        print(f"[run_chapter] {notebook.name}: cell {k}/{len(cells)} at {rec.result['elapsed_s']:.1f} s", flush=True)
        t = time.perf_counter()
        try:
            exec(compile(source, filename, "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 (an assert, a crash, a KeyboardInterrupt)
            tb = traceback.format_exc()
            print(tb, flush=True)
            rec.result["errors"].append({
                "cell": k, "type": type(exc).__name__, "message": str(exc)[:2000],
                "traceback_tail": "\n".join(tb.rstrip().splitlines()[-40:]),
                "cell_head": "\n".join(source.strip().splitlines()[:6]),
            })
            if isinstance(exc, KeyboardInterrupt) or args.stop_on_error:
                rec.result["cell_times_s"].append(round(time.perf_counter() - t, 3))
                break
        finally:
            try:
                import matplotlib.pyplot as plt

                plt.close("all")
            except Exception:
                pass
        rec.result["cell_times_s"].append(round(time.perf_counter() - t, 3))
        rec.result["cells_done"] = k + 1
    rec.result["status"] = "failed" if rec.result["errors"] else "passed"
    rec.write()
    print(f"[run_chapter] {notebook.name}: {rec.result['status']} in {rec.result['elapsed_s']:.1f} s, "
          f"{len(rec.result['errors'])} failing cell(s), {len(rec.result['glue'])} glued values", flush=True)
    return 0 if rec.result["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
