"""The book: built with warnings as errors from the chapters this run executed, then read in a real
browser with the network cut off, as an offline reader would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.book_build


def toc_pages() -> list[str]:
    """Document names in _toc.yml, e.g. 'book/intro', 'notebooks/01_foundations'."""
    return re.findall(r"(?:root|file):\s*(\S+)", (ROOT / "_toc.yml").read_text())


def chapter_pages() -> list[str]:
    return [p for p in toc_pages() if p.startswith("notebooks/")]


@pytest.fixture(scope="session")
def built_book(executed_chapters):
    failed = sorted(name for name, ok in executed_chapters.items() if ok is False)
    if failed:
        pytest.fail(f"chapters failed under nbval, so the book is not built: {failed} (see their cells above)")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    log = ROOT / "_build" / "book-build.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        # --all: Sphinx re-reads only pages whose source changed, so without it a chapter re-executed
        # because minigpt changed would keep the glued values of its previous build
        proc = subprocess.run([str(jupyter_book), "build", "--all", "-W", "--keep-going", str(ROOT)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=60 * 60)
    text = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"jupyter-book build -W failed (exit {proc.returncode}); last lines of {log}:\n{text[-6000:]}")
    return text


def test_book_builds_with_warnings_as_errors(built_book):
    assert (HTML / "index.html").exists()
    for page in toc_pages():
        assert (HTML / f"{page}.html").exists(), f"{page} is in _toc.yml but was not built"


def test_chapters_executed_once(built_book, executed_chapters):
    """Chapters that ran under nbval in this session are taken from the cache, not executed again."""
    for name, ok in executed_chapters.items():
        if ok:
            assert f"notebooks/{name}.md: Using cached notebook" in built_book, f"{name} was executed twice"


def test_no_cdn_left(built_book):
    cdn = re.compile(r"https?://(cdn\.jsdelivr\.net|unpkg\.com|cdnjs\.cloudflare\.com)")
    offenders = [str(p.relative_to(HTML)) for p in HTML.rglob("*.html") if cdn.search(p.read_text(errors="replace"))]
    assert offenders == []
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").exists()


def page_links(page_name: str) -> list[Path]:
    """Files under the built site that a page's links point to (local links only, anchors dropped)."""

    hrefs: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href")
            if tag == "a" and href and "://" not in href and not href.startswith(("#", "mailto:", "javascript:")):
                hrefs.append(href)

    Links().feed((HTML / f"{page_name}.html").read_text(encoding="utf-8"))
    return [HTML / unquote(urljoin(f"{page_name}.html", href).split("#")[0]) for href in hrefs]


@pytest.mark.parametrize("chapter", chapter_pages())
def test_chapter_offers_ipynb_and_source(built_book, chapter):
    """The download menu has the chapter as a notebook (book/_ext/notebook_download.py) and its .md source."""
    import jupytext
    import nbformat

    links = page_links(chapter)
    ipynb = HTML / "_sources" / f"{chapter}.ipynb"
    source = HTML / "_sources" / f"{chapter}.md"
    assert ipynb in links, f"{chapter}.html has no link to {ipynb.relative_to(HTML)}"
    assert source in links, f"{chapter}.html has no source link to {source.relative_to(HTML)}"
    assert source.read_text(encoding="utf-8") == (ROOT / f"{chapter}.md").read_text(encoding="utf-8")

    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    expected = [c.source.strip() for c in jupytext.read(ROOT / f"{chapter}.md").cells if c.cell_type == "code"]
    assert [c.source.strip() for c in code] == expected, "the .ipynb's code cells are not the chapter's"
    # the build executed the chapter, so the download is the executed notebook, outputs included
    assert any(c.outputs for c in code), f"{ipynb.relative_to(HTML)} has no outputs"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        if os.environ.get("MINIGPT_REQUIRE_BROWSER"):
            pytest.fail("MINIGPT_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium installed: apt-get install chromium (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def open_offline(browser, page_name: str):
    """Open a built page with every request that is not a local file refused; return (page, refused)."""
    page = browser.new_page()
    refused: list[str] = []

    def route(r):
        if r.request.url.startswith(("file:", "data:", "blob:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto((HTML / f"{page_name}.html").as_uri(), wait_until="load")
    return page, refused


@pytest.mark.parametrize("page_name", toc_pages())
def test_page_in_offline_browser(built_book, browser, page_name):
    page, refused = open_offline(browser, page_name)
    try:
        n_math = page.evaluate("document.querySelectorAll('.math').length")
        if n_math:
            page.wait_for_function(
                f"document.querySelectorAll('mjx-container').length >= {n_math}", timeout=30_000)
        images = page.evaluate(
            "Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0}))")
        broken = [i["src"] for i in images if not i["ok"]]
        assert broken == [], f"figures that did not load: {broken}"
        errors = page.evaluate(
            "document.querySelectorAll('.output.traceback, .output.error, .output.stderr').length")
        assert errors == 0, "a cell shows an error or writes to stderr"
        main_text = page.inner_text("main")
        assert "{glue" not in main_text
        assert refused == [], f"the page tried to reach the network: {refused}"
    finally:
        page.close()


@pytest.mark.parametrize("chapter", chapter_pages())
def test_chapter_shows_its_glued_numbers(built_book, browser, chapter):
    source = (ROOT / f"{chapter}.md").read_text()
    n_glued = len(re.findall(r"\{glue(?::text)?\}`", source))
    page, _ = open_offline(browser, chapter)
    try:
        pasted = page.evaluate("Array.from(document.querySelectorAll('.pasted-text, .pasted-inline'))"
                               ".map(e => e.innerText.trim())")
    finally:
        page.close()
    assert n_glued > 0, f"{chapter} glues no measured number into its prose"
    assert len(pasted) >= n_glued and all(pasted), f"{chapter}: {n_glued} glue roles, rendered {pasted}"


@pytest.mark.parametrize("chapter", chapter_pages())
def test_chapter_reads_like_a_book(built_book, browser, chapter):
    """Every figure is a numbered figure with a caption and alt text; no output shows raw Markdown table
    text or the repr of an internal object; code cells that only glue or assert are hidden (their
    count is not checked here, but a visible cell printing nothing is fine)."""
    page, _ = open_offline(browser, chapter)
    try:
        figures = page.evaluate(
            "Array.from(document.querySelectorAll('main img')).map(img => {"
            "  const fig = img.closest('figure');"
            "  const cap = fig ? fig.querySelector('figcaption') : null;"
            "  return {src: img.src.split('/').pop(), alt: img.getAttribute('alt') || '',"
            "          caption: cap ? cap.innerText.trim() : '',"
            "          number: cap ? (cap.querySelector('.caption-number') || {innerText: ''}).innerText : ''};"
            "})")
        outputs = page.evaluate(
            "Array.from(document.querySelectorAll('.cell_output, .output')).map(e => e.innerText)")
    finally:
        page.close()
    assert figures, f"{chapter} has no figure"
    for fig in figures:
        assert fig["caption"], f"{chapter}: figure {fig['src']} has no caption"
        assert fig["number"].startswith("Fig"), f"{chapter}: figure {fig['src']} is not numbered"
        assert len(fig["alt"]) > 10 and not re.fullmatch(r"[0-9a-f]{16,}", fig["alt"]), (
            f"{chapter}: figure {fig['src']} has no real alt text: {fig['alt']!r}")
    text = "\n".join(outputs)
    assert "| --- |" not in text and "|---|" not in text, f"{chapter}: an output shows raw table text"
    for repr_start in ("MeanCI(", "PairedComparison(", "ResponseEval(", "TrainResult(", "History("):
        assert repr_start not in text, f"{chapter}: an output prints the repr {repr_start}...)"
