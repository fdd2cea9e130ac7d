"""The claims audit: ``book/claims.md`` generated from the list ``book/claims.yml``, and its counts.

Run as a script, this writes the page (``--check``: exit 1 if the committed page differs)::

    python book/_ext/claims_audit.py [--check]

Every row pastes the chapter's glued measurement and verdict; nothing on the page is typed but the
claims, and the reasons of the "not testable here" entries. A claim whose chapter has no notebook yet is
listed under "Awaiting their chapter" without glue, so the build stays green until the chapter is in
the book (its notebook listed in ``_toc.yml``); then the page must be regenerated
(tests/test_claims_page.py fails until it is).

As a Sphinx extension (``_config.yml``: ``local_extensions``), it adds the ``{claims-summary}``
directive: a table of the verdicts per note and per scale word, counted when the book is built from
the verdicts the chapters glued in that build (myst-nb's ``<page>.glue.json`` files), so the counts
move with the seed like every other glued value. A verdict missing from its chapter's glue is a
warning, which ``-W`` turns into a failed build, as a missing ``{glue:text}`` key is.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "book" / "claims.yml"
PAGE = ROOT / "book" / "claims.md"
NOT_TESTABLE = "not testable here"
PENDING = "awaiting its chapter"
PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def verdict_scale() -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from minigpt.report import VERDICTS

    return VERDICTS


def load(path: Path = LIST) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    ids = [c["id"] for c in data["claims"]]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"claim ids must be unique, repeated: {dup}")
    for c in data["claims"]:
        if not c.get("notes") or any(n not in data["notes"] for n in c["notes"]):
            raise ValueError(f"claim {c['id']!r}: notes must be among {list(data['notes'])}, got {c.get('notes')}")
        if ("verdict" in c) == ("not_testable" in c):
            raise ValueError(f"claim {c['id']!r} needs exactly one of 'verdict' and 'not_testable'")
        if "verdict" in c and not (c.get("chapter") and c.get("section") and c.get("measured")):
            raise ValueError(f"claim {c['id']!r} has a verdict but no chapter, section or measured")
        if c.get("chapter") and c["chapter"] not in data["chapters"]:
            raise ValueError(f"claim {c['id']!r}: chapter must be one of {list(data['chapters'])}")
    return data


def notebook(chapter: str, root: Path = ROOT) -> Path:
    return root / "notebooks" / f"{chapter}.md"


def in_book(chapter: str, root: Path = ROOT) -> bool:
    """Is the chapter in the book: its notebook exists and ``_toc.yml`` lists it (a chapter being written
    is left out until it is integrated, so the build never pastes from an unbuilt page)?"""
    toc = root / "_toc.yml"
    listed = toc.exists() and re.search(rf"file:\s*notebooks/{re.escape(chapter)}\s*$", toc.read_text(), flags=re.M)
    return bool(listed) and notebook(chapter, root).exists()


def is_pending(claim: dict, root: Path = ROOT) -> bool:
    """A claim with a glued verdict whose chapter is not in the book yet."""
    return "verdict" in claim and not in_book(claim["chapter"], root)


def glue_ref(chapter: str, key: str, fmt: str | None = None) -> str:
    return f"{{glue:text}}`../notebooks/{chapter}.md::{key}:{fmt or 's'}`"


def expand(text: str, chapter: str) -> str:
    """``{key}`` / ``{key:fmt}`` in a list entry -> the chapter's glued value."""
    return PLACEHOLDER.sub(lambda m: glue_ref(chapter, m.group(1), m.group(2)), " ".join(text.split()))


def glue_keys(claim: dict) -> list[str]:
    """Every glue key a claim's row pastes from its chapter (measured values and the verdict)."""
    keys = [m.group(1) for m in PLACEHOLDER.finditer(claim.get("measured", ""))]
    return keys + ([claim["verdict"]] if "verdict" in claim else [])


def chapter_number(chapter: str) -> int:
    return int(chapter.split("_")[0])


def _text(value: str) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _claim_cell(claim: dict) -> str:
    also = [n for n in claim["notes"][1:] if n != "other"]
    return _text(claim["claim"]) + (f" (also note{'s' if len(also) > 1 else ''} {', '.join(also)})" if also else "")


def row(claim: dict, root: Path = ROOT) -> str:
    where = (f"{{ref}}`chapter {chapter_number(claim['chapter'])} <{claim['section']}>`"
             if claim.get("chapter") and in_book(claim["chapter"], root) else "—")
    if "not_testable" in claim:
        return f"| {_claim_cell(claim)} | {where} | — | **{NOT_TESTABLE}**: {_text(claim['not_testable'])} |"
    ch = claim["chapter"]
    return f"| {_claim_cell(claim)} | {where} | {expand(claim['measured'], ch)} | {glue_ref(ch, claim['verdict'])} |"


INTRO = """\
# Claims audit

Every claim in the five source notes that states a measurable effect, with the chapter that tests it,
what the chapter measured and its verdict. The measured values and verdicts are not typed here: each is
pasted from the executed chapter, where an `assert` checks what the verdict says or the verdict's words
are chosen from the measurement, so this page cannot drift from the measurements. Each row links to the
section that measures the claim. The only typed verdicts are "not testable here", each with its reason.
{doc}`source_notes` says what each note claims.

This page is generated from the list `book/claims.yml` (`python book/_ext/claims_audit.py`).
"""


def render(data: dict, root: Path = ROOT) -> str:
    scale = verdict_scale()
    out = [INTRO, "## The verdict scale", "",
           "Every verdict starts with one of four words, followed by what the measurement showed.", ""]
    out += [f"- **{word}**: {definition}" for word, definition in scale.items()]
    out += ["", "## Summary", "",
            "Verdicts per source note, counted when the book is built from the verdicts the chapters glued in",
            "that build (a claim made by several notes counts for each):", "", "```{claims-summary}", "```", "",
            "Verdicts per chapter, as each chapter counts its own:", ""]
    for chapter, title in data["chapters"].items():
        if in_book(chapter, root):
            out.append(f"- {{doc}}`Chapter {chapter_number(chapter)}, {title} <../notebooks/{chapter}>`: "
                       + glue_ref(chapter, "verdict_tally"))
    for note, title in data["notes"].items():
        claims = [c for c in data["claims"] if c["notes"][0] == note]
        listed = [c for c in claims if not is_pending(c, root)]
        pending = [c for c in claims if is_pending(c, root)]
        heading = f"## Note {note}: {title}" if note != "other" else "## Other claims the chapters test"
        out += ["", heading, ""]
        if listed:
            out += ["| claim | measured in | measured | verdict |", "| --- | --- | --- | --- |"]
            out += [row(c, root) for c in listed]
        if pending:
            out += ["", "Awaiting their chapter, which is not in the book yet:", ""]
            out += [f"- {_claim_cell(c)} (chapter {chapter_number(c['chapter'])}, "
                    f"{data['chapters'][c['chapter']]})" for c in pending]
    return "\n".join(out) + "\n"


def scale_word(text: str, words) -> str | None:
    return next((w for w in sorted(words, key=len, reverse=True) if str(text).startswith(w)), None)


def count(data: dict, lookup, root: Path = ROOT) -> tuple[dict[str, Counter], list[str]]:
    """Verdicts per note: ``{note: Counter(scale word or PENDING)}`` plus ``"all"`` (each claim once), and
    the problems found (a verdict missing or not on the scale). ``lookup(chapter, key)`` returns the text
    the chapter glued under ``key``, or None."""
    words = list(verdict_scale())
    per: dict[str, Counter] = {n: Counter() for n in [*data["notes"], "all"]}
    problems = []
    for c in data["claims"]:
        if "not_testable" in c:
            word = NOT_TESTABLE
        elif is_pending(c, root):
            word = PENDING
        else:
            text = lookup(c["chapter"], c["verdict"])
            word = scale_word(text, words) if text is not None else None
            if word is None:
                problems.append(f"claim {c['id']!r}: {c['verdict']!r} in {c['chapter']} is "
                                + ("missing" if text is None else f"not on the verdict scale: {text!r}"))
                continue
        for note in [*dict.fromkeys(c["notes"]), "all"]:
            per[note][word] += 1
    return per, problems


def summary_rows(data: dict, per: dict[str, Counter]) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows (counts as text)."""
    words = [*verdict_scale()]
    if per["all"][PENDING]:
        words.append(PENDING)
    header = ["note", "claims", *words, "with a measured verdict"]
    rows = []
    for note in [*data["notes"], "all"]:
        n = sum(per[note].values())
        if not n:
            continue
        decided = n - per[note][NOT_TESTABLE] - per[note][PENDING]
        label = {"all": "all claims", "other": "other"}.get(note, note)
        rows.append([label, str(n), *(str(per[note][w]) for w in words), f"{decided} ({100 * decided / n:.0f}%)"])
    return header, rows


# ---- Sphinx ----------------------------------------------------------------------------------------

from docutils import nodes  # noqa: E402  (Sphinx's own dependency; the page generator does not need it)
from sphinx.transforms.post_transforms import SphinxPostTransform  # noqa: E402
from sphinx.util import logging  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

LOGGER = logging.getLogger(__name__)


class claims_summary(nodes.General, nodes.Element):  # noqa: N801  (docutils names nodes in lower case)
    """Where the summary table goes; replaced once every chapter has been executed."""


class ClaimsSummary(SphinxDirective):
    def run(self):
        node = claims_summary()
        self.set_source_info(node)
        return [node]


def table_node(header: list[str], rows: list[list[str]]) -> nodes.table:
    tgroup = nodes.tgroup(cols=len(header))
    tgroup += [nodes.colspec(colwidth=1) for _ in header]
    thead, tbody = nodes.thead(), nodes.tbody()
    for target, lines in ((thead, [header]), (tbody, rows)):
        for cells in lines:
            row_node = nodes.row()
            for cell in cells:
                entry = nodes.entry()
                entry += nodes.paragraph(text=cell)
                row_node += entry
            target += row_node
    tgroup += [thead, tbody]
    return nodes.table("", tgroup, classes=["claims-summary"])


class ReplaceClaimsSummary(SphinxPostTransform):
    """Count the verdicts the chapters glued in this build (myst-nb's ``<page>.glue.json``, which its
    cross-document glue reads too) and put the table in place of the directive."""

    default_priority = 6  # next to myst-nb's own glue references (5)

    def apply(self, **kwargs):
        found = list(self.document.findall(claims_summary))
        if not found:
            return
        folder = Path(self.env.mystnb_config.output_folder)
        cache: dict[str, dict] = {}

        def lookup(chapter, key):
            if chapter not in cache:
                path = folder / "notebooks" / f"{chapter}.glue.json"
                cache[chapter] = json.loads(path.read_text()) if path.exists() else {}
            output = cache[chapter].get(key)
            return None if output is None else output.get("data", {}).get("text/plain")

        data = load()
        per, problems = count(data, lookup)
        for node in found:
            for problem in problems:
                LOGGER.warning(f"claims audit: {problem}", location=node)
            node.replace_self(table_node(*summary_rows(data, per)))


def setup(app):
    app.add_node(claims_summary)
    app.add_directive("claims-summary", ClaimsSummary)
    app.add_post_transform(ReplaceClaimsSummary)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str]) -> int:
    page = render(load())
    if "--check" in argv:
        if PAGE.read_text(encoding="utf-8") != page:
            print(f"{PAGE.relative_to(ROOT)} is not what {LIST.relative_to(ROOT)} generates: "
                  "run python book/_ext/claims_audit.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
