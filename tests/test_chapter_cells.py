"""The chapters stay readable: no code cell longer than 30 lines (longer code belongs in minigpt), and no
chapter defines a loss, a model or a training loop of its own (the book's rule: chapters import them)."""

from pathlib import Path

import jupytext
import pytest

# the chapters, and the appendix pages that run code (notebooks/ holds nothing else but its README)
NOTEBOOKS = sorted(p for p in (Path(__file__).parents[1] / "notebooks").glob("*.md") if p.name != "README.md")
MAX_LINES = 30


def code_cells(path: Path):
    notebook = jupytext.read(path)
    return [(i, cell.source) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_code_cell_is_longer_than_30_lines(path):
    long = [(i, len(src.splitlines())) for i, src in code_cells(path) if len(src.splitlines()) > MAX_LINES]
    assert not long, f"{path.name}: code cells (index, lines) longer than {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapters_define_no_model_and_no_training_loop(path):
    for i, src in code_cells(path):
        assert "class " not in src or "(nn.Module)" not in src, f"{path.name} cell {i} defines a model"
        # a backward pass to look at a gradient is fine; stepping an optimizer is training
        assert ".step()" not in src and ".zero_grad(" not in src, (
            f"{path.name} cell {i} runs its own training loop; train through minigpt.train")


BOOKKEEPING = ("glue(", "glue_text(", "assert ", "print(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_bookkeeping_cells_are_hidden(path):
    """A cell whose every statement glues, asserts or prints is bookkeeping: the page hides its input."""
    notebook = jupytext.read(path)
    visible = []
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or "remove-input" in cell.metadata.get("tags", []) \
                or "remove-cell" in cell.metadata.get("tags", []):
            continue
        statements = [line for line in cell.source.splitlines()
                      if line.strip() and not line.startswith((" ", "\t", "#", ")", "]", "}"))]
        if statements and all(line.startswith(BOOKKEEPING) for line in statements):
            visible.append(i)
    assert not visible, f"{path.name}: cells {visible} only glue, assert or print but show their input"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_visible_print_of_internal_objects(path):
    for i, src in code_cells(path):
        assert "print(" not in src, f"{path.name} cell {i} prints; glue the result into the prose instead"
