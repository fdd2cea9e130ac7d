"""Chapters as tests: pytest runs every Jupytext notebook in ``notebooks/`` through nbval, cell by cell.

nbval 0.11 collects only ``.ipynb`` files; this collector reads the MyST-markdown text notebooks with
jupytext and hands them to nbval, so a failing cell is reported as ``notebooks/NN_name.md::Cell K``.
Text notebooks store no outputs, so ``--nbval-lax`` is the mode: a cell passes when it runs, and a
chapter's claims are its ``assert`` statements.

Each chapter is executed once per test run. When all of a chapter's cells pass, the executed notebook
(outputs, figures and glued values included) is stored in the book's jupyter-cache, so the book build
that ``tests/test_book.py`` runs at the end of the session reuses it instead of executing it again.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
NOTEBOOK_DIR = ROOT / "notebooks"
BUILD_DIR = ROOT / "_build"
CACHE_DIR = BUILD_DIR / ".jupyter_cache"  # where jupyter-book 1 keeps its execution cache


def is_chapter(path: Path) -> bool:
    if path.suffix != ".md" or path.parent != NOTEBOOK_DIR:
        return False
    head = path.read_text(encoding="utf-8")[:2000]
    return head.startswith("---") and "jupytext" in head and "kernelspec" in head


def run_id(config) -> str:
    """One id per test run, shared by the xdist workers of that run."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return workerinput["testrunuid"]
    if not hasattr(config, "_minigpt_run_id"):
        config._minigpt_run_id = uuid.uuid4().hex
    return config._minigpt_run_id


def status_dir(config) -> Path:
    return BUILD_DIR / ".chapter-status" / run_id(config)


@contextmanager
def _locked(path: Path):
    """Serialise writers of the jupyter-cache database across xdist workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pytest_collect_file(file_path: Path, parent):
    opts = parent.config.option
    if (getattr(opts, "nbval", False) or getattr(opts, "nbval_lax", False)) and is_chapter(file_path):
        return MystNotebook.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    # The book build waits for the chapters: run it last (with xdist, it is then handed out last).
    items.sort(key=lambda item: item.get_closest_marker("book_build") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "book_build: builds the book from the chapters executed in this run")
    # Notebook kernels run in notebooks/: a relative data folder must not change meaning there.
    data_dir = os.environ.get("MINIGPT_DATA_DIR", "").strip()
    if data_dir:
        os.environ["MINIGPT_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())


@pytest.fixture(scope="session")
def executed_chapters(request) -> dict[str, bool | None]:
    """Wait until every chapter collected in this run has finished under nbval; return name -> True
    (passed, cached for the build), False (a cell failed) or None (not fully run here).

    With xdist the chapters run on the other workers; the book build is handed out last, so by the time
    it waits here nothing else is queued and the wait costs no parallelism.
    """
    import time

    chapters = sorted({item.path.stem for item in request.session.items if isinstance(item, MystNotebookCell)})
    folder = status_dir(request.config)
    deadline = time.monotonic() + 45 * 60
    status: dict[str, bool | None] = {}
    outcome = {"passed": True, "failed": False, "skipped": None}
    while len(status) < len(chapters):
        for name in chapters:
            for suffix, value in outcome.items():
                if (folder / f"{name}.{suffix}").exists():
                    status[name] = value
        if len(status) < len(chapters):
            if time.monotonic() > deadline:
                pytest.fail(f"chapters still running after 45 minutes: {sorted(set(chapters) - set(status))}")
            time.sleep(1)
    return status


from nbval.plugin import IPyNbCell, IPyNbFile  # noqa: E402  (after the hooks, which need no nbval)


class MystNotebookCell(IPyNbCell):
    passed = False

    def runtest(self):
        super().runtest()
        self.passed = True


class MystNotebook(IPyNbFile):
    """A Jupytext MyST-markdown notebook, one pytest item per code cell."""

    def collect(self):
        import jupytext

        self.nb = jupytext.read(self.path)
        self.cells = []
        for cell_num, cell in enumerate(c for c in self.nb.cells if c.cell_type == "code"):
            # --nbval-lax: a cell passes when it runs; outputs are not compared (text notebooks store none)
            options = defaultdict(bool, check=False, skip=False, check_exception=False)
            item = MystNotebookCell.from_parent(self, name=f"Cell {cell_num}", cell_num=cell_num, cell=cell,
                                                options=options)
            self.cells.append(item)
            yield item

    def teardown(self):
        super().teardown()
        cells = getattr(self, "cells", [])
        ran = [c for c in cells if hasattr(c, "test_outputs")]  # set by nbval once a cell executes
        if any(not c.passed for c in ran):
            status = "failed"
        elif cells and len(ran) == len(cells):
            status = "passed"
            self._cache_executed_notebook(cells)
        else:
            status = "skipped"  # deselected (-k) or skipped cells: the book build executes it itself
        folder = status_dir(self.config)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.path.stem}.{status}").touch()

    def _cache_executed_notebook(self, cells) -> None:
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn
        from nbformat import NotebookNode

        outputs = {c.cell_num: getattr(c, "test_outputs", []) for c in cells}
        code_cells = [c for c in self.nb.cells if c.cell_type == "code"]
        for num, cell in enumerate(code_cells):
            cell.outputs = [NotebookNode(o) for o in outputs.get(num, [])]
            cell.execution_count = num + 1
        with _locked(BUILD_DIR / ".jupyter_cache.lock"):
            cache = get_cache(str(CACHE_DIR))
            cache.cache_notebook_bundle(CacheBundleIn(self.nb, str(self.path)), check_validity=False,
                                        overwrite=True)
