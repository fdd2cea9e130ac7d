"""Helpers for the chapters' prose: glued values that read well."""

from __future__ import annotations


class _PlainText:
    """Displays as its text: no quotes (a ``str`` repr has them), and as Markdown where a page pastes
    it with the ``{glue}`` role, so it reads as prose rather than code."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.text


def glue_text(name: str, text: str) -> None:
    """Glue a sentence or phrase for ``{glue:text}`name``` without showing it in the cell's output."""
    from myst_nb import glue

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    glue(name, _PlainText(text), display=False)


def join_words(items) -> str:
    """``[40, 60, 60]`` -> ``"40, 60 and 60"``: a list as prose."""
    words = [str(i) for i in items]
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def percent(fraction: float, digits: int = 0) -> str:
    """``0.2`` -> ``"20%"``: a fraction as a percentage, for labels and glued phrases."""
    return f"{100 * float(fraction):.{digits}f}" + "%"
