"""Plain-text tables for the terminal: the columns padded to their widest cell, a rule under the header."""
from __future__ import annotations

from typing import Sequence


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table whose first row is the header: cells joined by ` | `, trailing spaces dropped, and a
    `-+-` rule under the header."""
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines
