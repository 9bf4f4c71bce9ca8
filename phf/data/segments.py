"""Documents -> segments: exact character spans, so that the segments of a document reassemble it.

A segmenter maps a text to a list of (start, end) spans that tile the text: the first starts at 0, each starts
where the previous ended, and the last ends at len(text). Nothing is dropped, trimmed or normalised.
"""
from __future__ import annotations

import re
from typing import Callable

from phf.data.sentences import sentence_spans

Spans = list[tuple[int, int]]

_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def line_spans(text: str) -> Spans:
    """Lines, each with its trailing newline; only "\\n" ends a line (as pycodestyle reads source)."""
    return [m.span() for m in _LINE.finditer(text)]


def split_lines(text: str) -> list[str]:
    return [text[a:b] for a, b in line_spans(text)]


SEGMENTERS: dict[str, Callable[[str], Spans]] = {
    "lines": line_spans,
    "sentences": sentence_spans,
}


def get_segmenter(name: str) -> Callable[[str], Spans]:
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise KeyError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}") from None
