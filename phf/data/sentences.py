"""Sentences with exact character spans, for prose tasks (PII, toxicity).

The boundaries come from sentencex (Wikimedia's rule-based segmenter: compiled, no downloaded data, ~40M chars/s),
which splits at sentence-final punctuation, at paragraph breaks and before list items. Its spans are then made to
tile the text exactly: whitespace between sentences (a paragraph break, the indentation of the next line) is
attached to the sentence before it, so the segments of a document reassemble it character for character and no
segment is whitespace only (unless the whole text is).

    >>> text = "Fix the build. Closes: #1.\\n\\n -- Jane Doe <jane@example.org>  Mon, 02 Jan 2023"
    >>> [text[a:b] for a, b in sentence_spans(text)]
    ['Fix the build. ', 'Closes: #1.\\n\\n', ' -- Jane Doe <jane@example.org>  Mon, 02 Jan 2023']
"""
from __future__ import annotations

import re
from importlib.metadata import version as dist_version

import sentencex

Spans = list[tuple[int, int]]

LANGUAGE = "en"
# a sentence that ends like this is complete; anything else at the end of a cut text is a fragment. Closing quotes
# and brackets may follow the punctuation after whitespace too ('?\v\''), as sentencex keeps them in the sentence
_COMPLETE = re.compile(r"""(?:[.!?…]+(?:["'”’»)\]]|\s)*|\n\s*)$""")


def version() -> str:
    return f"sentencex {dist_version('sentencex')}"


def _raw_spans(text: str) -> Spans:
    return [(b["start_index"], b["end_index"]) for b in sentencex.get_sentence_boundaries(LANGUAGE, text)]


def sentence_spans(text: str) -> Spans:
    """(start, end) of every sentence of `text`; the spans tile the text exactly."""
    if not text:
        return []
    spans: Spans = []
    pos = 0
    for a, b in _raw_spans(text):
        if a < pos or b <= a or b > len(text):  # never trust an external tool's offsets blindly
            continue
        if a > pos:
            spans.append((pos, a))  # a gap the segmenter skipped: kept, as its own segment
        spans.append((a, b))
        pos = b
    if pos < len(text):
        spans.append((pos, len(text)))
    out: Spans = []
    for a, b in spans:
        if out and (text[a:b].isspace() or text[out[-1][0]:out[-1][1]].isspace()):
            out[-1] = (out[-1][0], b)  # whitespace joins the sentence before it (or, at the start, the one after)
        else:
            out.append((a, b))
    return out


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def complete_sentences(text: str) -> str:
    """Drop a trailing unfinished sentence (generation stopped mid-sentence).

    The last sentence is kept if it ends with sentence-final punctuation (closing quotes or brackets allowed) or a
    line break; every earlier sentence ended where the segmenter saw a boundary, so it is complete."""
    spans = sentence_spans(text)
    if not spans:
        return ""
    a, b = spans[-1]
    if _COMPLETE.search(text[a:b]):
        return text
    return text[:a]
