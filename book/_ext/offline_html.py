"""Make the built HTML work with no network.

- MathJax is served from the build (the ``sphinx-mathjax-offline`` extension copies MathJax 3 into
  ``_static/mathjax``; it comes from PyPI at install time, nothing is committed).
- sphinx-thebe (which jupyter-book always loads) writes thebe's unpkg address into every page, for a
  "launch live code" button that needs a remote kernel anyway; its scripts are dropped here.
- Progress bars are turned off in the chapters the build executes (``MINIGPT_PROGRESS=0``, inherited by
  the kernels it starts), so no bar text ends up in a page; a reader running a chapter sees them.
- After the build, every HTML page is scanned for addresses of script or style CDNs; one left behind is
  a build error, so an offline reader never meets raw TeX or a half-styled page.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx.errors import ExtensionError

CDN_PATTERN = re.compile(r"https?://(?:cdn\.jsdelivr\.net|unpkg\.com|cdnjs\.cloudflare\.com|"
                         r"cdn\.plot\.ly|polyfill\.io|fonts\.googleapis\.com|code\.jquery\.com)[^\"' )]*")


def _drop_thebe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    kept = []
    for script in scripts:
        body = getattr(script, "attributes", {}).get("body", "") or ""
        if "THEBE_JS_URL" in body or str(script).endswith("sphinx-thebe.js"):
            continue
        kept.append(script)
    context["script_files"] = kept


def _check_no_cdn(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    found = {}
    for page in Path(app.outdir).rglob("*.html"):
        hits = set(CDN_PATTERN.findall(page.read_text(encoding="utf-8", errors="replace")))
        if hits:
            found[str(page.relative_to(app.outdir))] = sorted(hits)
    if found:
        raise ExtensionError(f"the built HTML still loads from CDNs, so it will not work offline: {found}")


def setup(app):
    os.environ["MINIGPT_PROGRESS"] = "0"  # before any chapter's kernel starts
    app.connect("html-page-context", _drop_thebe)
    app.connect("build-finished", _check_no_cdn)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
