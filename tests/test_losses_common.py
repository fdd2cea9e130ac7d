"""minigpt.losses.common: the one home of the ignore label and the reduction names (issue 12), and the
package's import discipline: no module reaches for another module's private names."""

import ast
import re
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt import losses
from minigpt.losses import common

PACKAGE = Path(minigpt.__file__).parent
LOSSES = PACKAGE / "losses"


def test_constants_are_public_and_defined_once():
    assert losses.IGNORE_INDEX == common.IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index
    assert losses.REDUCTIONS == common.REDUCTIONS == ("mean", "sum", "none")
    assert losses.SEQUENCE_REDUCTIONS == ("sum", "token_mean", "sequence_mean", "length_normalized")
    for name in ("IGNORE_INDEX", "REDUCTIONS", "SEQUENCE_REDUCTIONS"):
        assert name in losses.__all__


def code_lines(path: Path):
    """Source lines without comments and docstrings (prose may name the value)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if number not in docstrings:
            yield path, number, line.split("#")[0]


def test_the_ignore_label_literal_lives_in_common_only():
    """In the whole package, not only minigpt.losses: the literal appears once, where it is defined."""
    hits = [(str(p.relative_to(PACKAGE)), n) for f in sorted(PACKAGE.rglob("*.py")) for p, n, line in code_lines(f)
            if re.search(r"(?<![\w.])-\s*100(?![\w.])", line)]
    assert hits == [("losses/common.py", next(n for _, n, line in code_lines(LOSSES / "common.py")
                                              if "IGNORE_INDEX = -100" in line))]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):  # every module of minigpt
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if module == "__future__":
                    continue
                if any(part.startswith("_") for part in module.split(".")) \
                        or any(alias.name.startswith("_") for alias in node.names):
                    offenders.append((str(f.relative_to(PACKAGE)), module, [a.name for a in node.names]))
    assert offenders == []


def test_check_float_pair_names_the_callers_arguments():
    with pytest.raises(ValueError, match="logvar must have the shape of mu"):
        common.check_float_pair(torch.zeros(2, 3), torch.zeros(2, 2), names=("mu", "logvar"))
    with pytest.raises(ValueError, match="z2 must be a floating-point tensor"):
        common.check_float_pair(torch.zeros(2), torch.zeros(2, dtype=torch.long), names=("z1", "z2"))
    with pytest.raises(TypeError, match="z1 must be a torch.Tensor"):
        common.check_float_pair([0.0], torch.zeros(1), names=("z1", "z2"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        common.check_reduction("avg")
