"""Offer every chapter as a Jupyter notebook (``.ipynb``) in its page's download menu.

The chapters are Jupytext MyST-markdown text notebooks, and for those sphinx-book-theme's download menu
lists only the ``.md`` source. At build time, for each page whose source is a text notebook, this writes
``_sources/<page>.ipynb`` into the HTML output, next to the ``.md`` that Sphinx copies there, and sets the
page context's ``ipynb_source``, which makes the theme add a ".ipynb" entry beside the ".md" one.

The ``.md`` is converted with jupytext, and the outputs of the build's run of it (figures included) are
added when they can be found: first in the execution cache (``_build/.jupyter_cache``, which the builds
of ``execute_notebooks: cache`` and pytest's chapter runs fill; a match means the same code cells), else
in the notebook myst-nb wrote after executing the page (``_build/jupyter_execute/<page>.ipynb``) if its
code cells are the current ones. Otherwise (execution off, nothing cached) the download has no outputs.
Nothing is fetched: it works offline. The ``jupytext`` and myst-nb ``source_map`` metadata are dropped,
so the download is a plain notebook, not tied to the text file it came from.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)


def _is_text_notebook(source: Path) -> bool:
    if source.suffix != ".md" or not source.is_file():
        return False
    head = source.read_text(encoding="utf-8")[:2000]
    return head.startswith("---") and "jupytext:" in head and "kernelspec:" in head


def _code_sources(nb) -> list[str]:
    return [cell.source.strip() for cell in nb.cells if cell.cell_type == "code"]


def _from_cache(nb, cache_path: Path | None):
    """``nb`` with the outputs of its run in the jupyter-cache, or None if the cache has none."""
    if cache_path is None or not cache_path.is_dir():
        return None  # get_cache would create an empty cache
    from jupyter_cache import get_cache

    try:
        return get_cache(str(cache_path)).merge_match_into_notebook(nb)[1]
    except Exception:  # noqa: BLE001  (KeyError: no match; anything else: no usable cache)
        return None


def _from_executed(nb, executed: Path | None):
    """The notebook myst-nb wrote after executing this page, if its code is ``nb``'s and it has outputs."""
    if executed is None or not executed.is_file():
        return None
    try:
        candidate = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001  (an unreadable copy is as good as none)
        return None
    code = [c for c in candidate.cells if c.cell_type == "code"]
    if _code_sources(candidate) != _code_sources(nb) or not any(c.get("outputs") for c in code):
        return None
    return candidate


def chapter_notebook(source: Path, cache_path: Path | None = None,
                     executed: Path | None = None) -> tuple[nbformat.NotebookNode, str]:
    """The notebook for a text-notebook source, and where its outputs came from: "cache", "executed"
    or "none"."""
    text_nb = jupytext.read(source)
    for origin, nb in (("cache", _from_cache(text_nb, cache_path)), ("executed", _from_executed(text_nb, executed))):
        if nb is not None:
            break
    else:
        origin, nb = "none", text_nb
    nb.metadata.pop("jupytext", None)
    nb.metadata.pop("source_map", None)  # myst-nb's line numbers into the .md
    nbformat.validate(nb)
    return nb, origin


def _add_ipynb(app, pagename, templatename, context, doctree):
    if app.builder.format != "html" or doctree is None or not context.get("sourcename"):
        return
    source = Path(app.env.doc2path(pagename))
    if not _is_text_notebook(source):
        return
    nb_config = getattr(app.env, "mystnb_config", None)
    cache = getattr(nb_config, "execution_cache_path", None)
    output_folder = getattr(nb_config, "output_folder", None)
    executed = Path(output_folder, *f"{pagename}.ipynb".split("/")) if output_folder else None
    nb, origin = chapter_notebook(source, Path(cache) if cache else None, executed)
    target = Path(app.outdir, "_sources", *f"{pagename}.ipynb".split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    LOGGER.verbose("%s: wrote _sources/%s.ipynb (outputs: %s)", pagename, pagename, origin)
    context["ipynb_source"] = f"{pagename}.ipynb"  # sphinx-book-theme: ".ipynb" in the download menu


def setup(app):
    # before sphinx-book-theme builds the header buttons (priority 501)
    app.connect("html-page-context", _add_ipynb, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
