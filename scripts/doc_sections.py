"""The measuring scripts own sections of the docs: each rewrites the text between its two markers, no more.

So a page can mix prose written by hand with tables that only a measurement may change, and rerunning one
script leaves the other scripts' sections as they were.
"""
from __future__ import annotations

from pathlib import Path


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with ``block`` (which starts with ``begin`` and ends with ``end``) in place of the old
    section, or appended when there is none yet."""
    if begin in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(doc: Path, block: str, begin: str, end: str, new_page: str = "") -> None:
    """Put ``block`` into ``doc`` between the markers; a missing page starts as ``new_page``."""
    text = doc.read_text() if doc.exists() else new_page
    doc.write_text(replace_between(text, begin, end, block))


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its rule, then one line per row (cells already formatted)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
