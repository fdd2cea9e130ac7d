"""The claims audit (book/claims.md) as a reader scans it, and the list it is generated from
(book/claims.yml, rendered by book/_ext/claims_audit.py): the fixed verdict scale defined once, in the
words minigpt.report.verdict produces; every listed claim with a verdict its chapter glues (checked
statically against the chapter's code), pasted as plain text (not code) and linking to the section that
measures it; "not testable here" the only typed verdict, always with its reason; a summary line per
chapter; the page exactly what the list generates. The book pages that paste chapters' numbers
(claims, chooser, landing page) paste only keys the named chapter glues."""

from __future__ import annotations

import importlib.util
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from minigpt.report import VERDICTS

ROOT = Path(__file__).parents[1]
PAGE = (ROOT / "book" / "claims.md").read_text(encoding="utf-8")
ROWS = [line for line in PAGE.splitlines() if line.startswith("| ") and not line.startswith(("| claim", "| ---"))]

_spec = importlib.util.spec_from_file_location("claims_audit", ROOT / "book" / "_ext" / "claims_audit.py")
claims_audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims_audit)
DATA = claims_audit.load()
CLAIMS = DATA["claims"]
GLUE_REF = re.compile(r"\{glue(?::\w+)?\}`\.\./notebooks/([\w.]+)\.md::(\w[\w-]*)(?::[^`]*)?`")


def code_of(chapter: str) -> str:
    """The code cells of a chapter's text notebook, joined."""
    text = (ROOT / "notebooks" / f"{chapter}.md").read_text(encoding="utf-8")
    return "\n".join(re.findall(r"^```\{code-cell\}[^\n]*\n(.*?)^```", text, flags=re.M | re.S))


def glues(chapter: str, key: str) -> bool:
    """Statically: does the chapter's code glue ``key``? Either the name is a string literal in its code
    (``glue_text("key", ...)``, or a key of a dict of verdicts glued in a loop), or an f-string glue
    template matches it and the template's variable part is a string literal there (chapter 7's
    ``glue_text(f"verdict_{key}", ...)`` over ``CLAIMS = {"weight": ...}``)."""
    code = code_of(chapter)
    literals = set(re.findall(r"""["']([^"'\n]+)["']""", code))
    if key in literals:
        return True
    for template in re.findall(r"""glue(?:_text)?\(f["']([^"']+)["']""", code):
        parts = re.split(r"\{[^}]*\}", template)
        pattern = "(.+?)".join(re.escape(p) for p in parts)
        m = re.fullmatch(pattern, key)
        if m and all(g in literals for g in m.groups()):
            return True
    return False


def labels_of(chapter: str) -> set[str]:
    text = (ROOT / "notebooks" / f"{chapter}.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\(([\w-]+)\)=$", text, flags=re.M))


def exists(chapter: str) -> bool:
    """In the book: the notebook exists and _toc.yml lists it."""
    return claims_audit.in_book(chapter)


def test_the_verdict_scale_is_defined_once_with_the_package_words():
    for word, definition in VERDICTS.items():
        assert PAGE.count(f"\n- **{word}**: {definition}\n") == 1, word


def test_the_page_is_what_the_list_generates():
    assert PAGE == claims_audit.render(DATA), "run: python book/_ext/claims_audit.py"


def test_rows_paste_verdicts_as_text_and_link_to_their_section():
    assert len(ROWS) >= 60
    labels = {m for path in (ROOT / "notebooks").glob("*.md")
              for m in re.findall(r"^\(([\w-]+)\)=$", path.read_text(encoding="utf-8"), flags=re.M)}
    typed = 0
    for row in ROWS:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
        assert len(cells) == 4, row
        if cells[3].startswith("**not testable here**: "):
            typed += 1
            assert len(cells[3]) > 60, f"a 'not testable here' needs its reason: {row}"
            assert cells[2] == "—" and "{glue" not in row, row
            if cells[1] != "—":
                ref = re.fullmatch(r"\{ref\}`chapter \d <([\w-]+)>`", cells[1])
                assert ref and ref.group(1) in labels, cells[1]
            continue
        ref = re.fullmatch(r"\{ref\}`chapter \d <([\w-]+)>`", cells[1])
        assert ref and ref.group(1) in labels, f"no section link in: {cells[1]}"
        assert re.fullmatch(r"\{glue:text\}`\.\./notebooks/\w+\.md::verdict_\w+:s`", cells[3]), cells[3]
        assert "{glue}`" not in row  # the bare role renders a repr as code
    assert typed == sum("not_testable" in c for c in CLAIMS)


def test_every_chapter_has_a_summary_line():
    chapters = re.findall(r"file:\s*notebooks/(\d\d_\w+)", (ROOT / "_toc.yml").read_text())
    assert chapters
    for chapter in chapters:
        assert f"{{glue:text}}`../notebooks/{chapter}.md::verdict_tally:s`" in PAGE, chapter
        assert chapter in DATA["chapters"], f"book/claims.yml names no title for {chapter}"


def test_the_page_opens_with_the_counts_per_note_and_verdict():
    summary = PAGE.index("## Summary")
    assert summary < PAGE.index("## Note 000") and PAGE.index("```{claims-summary}") > summary
    assert "claims_audit: book/_ext" in (ROOT / "_config.yml").read_text()


@pytest.mark.parametrize("claim", [c for c in CLAIMS if "verdict" in c], ids=lambda c: c["id"])
def test_every_listed_verdict_is_glued_by_its_chapter(claim):
    """A listed claim with no verdict, or whose verdict (or measured value) its chapter does not glue,
    fails here; a chapter not written yet leaves its claims awaiting it on the page, and a written one
    must resolve them all."""
    chapter = claim["chapter"]
    if not exists(chapter):
        assert f"- {claims_audit._claim_cell(claim)} (chapter" in PAGE
        assert f"notebooks/{chapter}.md::" not in PAGE
        return
    assert claim["verdict"].startswith("verdict_")
    assert claims_audit.row(claim) in ROWS
    assert claim["section"] in labels_of(chapter), f"{claim['section']} is not a section of {chapter}"
    for key in claims_audit.glue_keys(claim):
        assert glues(chapter, key), f"{chapter} glues no {key!r}"
    assert "glue_text(" in code_of(chapter)


@pytest.mark.parametrize("claim", [c for c in CLAIMS if "not_testable" in c], ids=lambda c: c["id"])
def test_not_testable_entries_say_why(claim):
    assert len(claim["not_testable"]) > 40 and "verdict" not in claim and "measured" not in claim
    if claim.get("chapter"):
        assert claim["section"] in labels_of(claim["chapter"])


def test_most_claims_of_the_notes_have_a_measured_verdict():
    notes = [c for c in CLAIMS if c["notes"] != ["other"]]
    measured = [c for c in notes if "verdict" in c]
    assert len(notes) >= 80
    assert len(measured) >= 0.90 * len(notes), f"{len(measured)} of {len(notes)}"  # 91% once chapters 2 and 7 time convergence and gradient shares
    assert {n for c in notes for n in c["notes"]} == {"000", "001", "002", "003", "004"}


def test_counts_per_note_and_verdict_from_the_glued_words(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "a.md").write_text("")
    (tmp_path / "notebooks" / "b.md").write_text("")  # b is being written: not in the toc
    (tmp_path / "_toc.yml").write_text("parts:\n  - chapters:\n      - file: notebooks/a\n")
    glued = {("a", "verdict_x"): "holds: because", ("a", "verdict_y"): "does not hold: no"}
    data = {"notes": {"000": "n0", "001": "n1", "other": "o"}, "chapters": {"a": "A", "b": "B"}, "claims": [
        {"id": "x", "notes": ["000"], "chapter": "a", "verdict": "verdict_x"},
        {"id": "y", "notes": ["000", "001"], "chapter": "a", "verdict": "verdict_y"},
        {"id": "z", "notes": ["001"], "chapter": "b", "verdict": "verdict_z"},  # b: not in the book yet
        {"id": "t", "notes": ["001"], "not_testable": "why"}]}
    per, problems = claims_audit.count(data, lambda ch, key: glued.get((ch, key)), root=tmp_path)
    assert problems == []
    assert per["000"] == Counter({"holds": 1, "does not hold": 1})
    assert per["001"] == Counter({"does not hold": 1, claims_audit.PENDING: 1, "not testable here": 1})
    assert per["all"] == Counter({"holds": 1, "does not hold": 1, claims_audit.PENDING: 1, "not testable here": 1})
    header, rows = claims_audit.summary_rows(data, per)
    assert header == ["note", "claims", *VERDICTS, claims_audit.PENDING, "with a measured verdict"]
    assert rows[-1] == ["all claims", "4", "1", "0", "1", "1", "1", "2 (50%)"]


def test_counts_flag_a_missing_or_unscaled_verdict(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "a.md").write_text("")
    (tmp_path / "_toc.yml").write_text("  - file: notebooks/a\n")
    data = {"notes": {"000": "n0"}, "chapters": {"a": "A"}, "claims": [
        {"id": "x", "notes": ["000"], "chapter": "a", "verdict": "verdict_x"},
        {"id": "y", "notes": ["000"], "chapter": "a", "verdict": "verdict_y"},
        {"id": "z", "notes": ["000"], "chapter": "a", "verdict": "verdict_z"}]}
    glued = {"verdict_x": "holds in part: some", "verdict_y": "maybe"}
    per, problems = claims_audit.count(data, lambda ch, key: glued.get(key), root=tmp_path)
    assert per["000"] == Counter({"holds in part": 1}) and len(problems) == 2
    header, rows = claims_audit.summary_rows(data, per)
    assert header[:2] == ["note", "claims"] and rows[0][:2] == ["000", "1"]
    assert rows[-1][0] == "all claims" and rows[-1][-1] == "1 (100%)"


@pytest.mark.parametrize("page", ["claims", "chooser", "intro"])
def test_book_pages_paste_only_what_the_chapters_glue(page):
    path = ROOT / "book" / f"{page}.md"
    if not path.exists():
        pytest.skip(f"no book/{page}.md")
    text = path.read_text(encoding="utf-8")
    refs = GLUE_REF.findall(text)
    assert refs or page == "intro"
    for chapter, key in refs:
        assert exists(chapter), f"book/{page}.md pastes from {chapter}, which has no notebook"
        assert glues(chapter, key), f"book/{page}.md pastes {key!r}, which {chapter} does not glue"
    assert "{glue}`" not in text  # the bare role renders a repr as code
    for label in re.findall(r"\{ref\}`[^`<]*<([\w-]+)>`", text):
        assert any(label in labels_of(p.stem) for p in (ROOT / "notebooks").glob("*.md")), label


def test_the_summary_directive_counts_the_glued_verdicts_in_a_sphinx_build(tmp_path):
    """book/_ext/claims_audit.py as Sphinx runs it: the directive becomes the table of counts, read from
    the glue files myst-nb writes per executed page; a missing verdict fails a build with -W."""
    from sphinx.application import Sphinx

    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\n"
                                 "extensions = ['myst_nb', 'claims_audit']\nnb_execution_mode = 'off'\n")
    (src / "index.md").write_text("# Counts\n\n```{claims-summary}\n```\n")
    glue_dir = tmp_path / "out" / "jupyter_execute" / "notebooks"
    glue_dir.mkdir(parents=True)
    listed = [c for c in CLAIMS if "verdict" in c and exists(c["chapter"])]
    for chapter in {c["chapter"] for c in listed}:
        glued = {c["verdict"]: {"data": {"text/plain": "holds in part: made up"}} for c in listed
                 if c["chapter"] == chapter}
        (glue_dir / f"{chapter}.glue.json").write_text(json.dumps(glued))

    def build():
        warnings = io.StringIO()
        app = Sphinx(str(src), str(src), str(tmp_path / "out" / "html"), str(tmp_path / "out" / "doctrees"),
                     "html", status=None, warning=warnings, freshenv=True)
        app.build(force_all=True)
        return (tmp_path / "out" / "html" / "index.html").read_text(encoding="utf-8"), warnings.getvalue()

    html, warnings = build()
    assert "claims audit" not in warnings
    cells = re.findall(r"<t[dh][^>]*><p>([^<]*)</p>", html)
    assert cells[:2] == ["note", "claims"] and "all claims" in cells
    total = cells[cells.index("all claims") + 1]
    assert total == str(len(CLAIMS))
    assert cells[cells.index("all claims") + 3] == str(len(listed))  # every listed verdict: holds in part
    first = listed[0]
    glued = json.loads((glue_dir / f"{first['chapter']}.glue.json").read_text())
    glued.pop(first["verdict"])
    (glue_dir / f"{first['chapter']}.glue.json").write_text(json.dumps(glued))
    _, warnings = build()  # a warning, so -W fails the book
    assert f"claims audit: claim {first['id']!r}: {first['verdict']!r} in {first['chapter']} is missing" in warnings
