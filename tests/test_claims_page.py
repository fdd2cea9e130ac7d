"""The claims audit (book/claims.md) as a reader scans it: the fixed verdict scale defined once, in the
words minigpt.report.verdict produces; verdicts pasted as plain text (not code); every row linking to the
section that measures it; a summary line per chapter."""

import re
from pathlib import Path

from minigpt.report import VERDICTS

ROOT = Path(__file__).parents[1]
PAGE = (ROOT / "book" / "claims.md").read_text(encoding="utf-8")
ROWS = [line for line in PAGE.splitlines() if line.startswith("| ") and not line.startswith(("| claim", "| ---"))]


def test_the_verdict_scale_is_defined_once_with_the_package_words():
    for word, definition in VERDICTS.items():
        assert PAGE.count(f"\n- **{word}**: {definition}\n") == 1, word


def test_rows_paste_verdicts_as_text_and_link_to_their_section():
    assert len(ROWS) >= 20
    labels = {m for path in (ROOT / "notebooks").glob("*.md")
              for m in re.findall(r"^\(([\w-]+)\)=$", path.read_text(encoding="utf-8"), flags=re.M)}
    for row in ROWS:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4, row
        ref = re.fullmatch(r"\{ref\}`chapter \d <([\w-]+)>`", cells[1])
        assert ref and ref.group(1) in labels, f"no section link in: {cells[1]}"
        assert re.fullmatch(r"\{glue:text\}`\.\./notebooks/\w+\.md::verdict_\w+:s`", cells[3]), cells[3]
        assert "{glue}`" not in row  # the bare role renders a repr as code


def test_every_chapter_has_a_summary_line():
    chapters = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
    for chapter in chapters:
        assert f"{{glue:text}}`../notebooks/{chapter}.md::verdict_tally:s`" in PAGE, chapter
