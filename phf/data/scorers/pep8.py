"""PEP8: pycodestyle violations per character, per line.

pycodestyle checks a whole file (many checks need context: blank lines, indentation, continuation lines), so
each document is checked once and every violation is attributed to the line it is reported on. A line's score is
its violations divided by its length in characters (newline included); a document's is violations per character.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import pycodestyle

from phf.data.scorers.base import ScoredText, Scorer
from phf.data.segments import line_spans


class _CollectingReport(pycodestyle.BaseReport):
    def __init__(self, options):
        super().__init__(options)
        self.violations: list[tuple[int, str]] = []
        self.texts: list[str] = []  # pycodestyle's text of each violation, e.g. "E225 missing whitespace ..."

    def error(self, line_number, offset, text, check):
        code = super().error(line_number, offset, text, check)
        if code:
            self.violations.append((line_number, code))
            self.texts.append(text)
        return code


class PEP8Scorer(Scorer):
    name = "pep8"
    segmenter = "lines"
    pooled = True  # pycodestyle checks one file at a time, in Python

    def __init__(self, max_line_length: int = 79, ignore: Sequence[str] | None = None):
        self.max_line_length = max_line_length
        self.ignore = list(pycodestyle.DEFAULT_IGNORE.split(",")) if ignore is None else list(ignore)
        self._style = pycodestyle.StyleGuide(quiet=True, max_line_length=max_line_length, ignore=self.ignore,
                                             reporter=_CollectingReport)

    @property
    def version(self) -> str:
        return f"pycodestyle {pycodestyle.__version__}"

    def settings(self) -> dict:
        return {"max_line_length": self.max_line_length, "ignore": sorted(self.ignore)}

    def violations(self, text: str) -> list[tuple[int, str]]:
        """(1-based line number, code) of every violation pycodestyle reports for `text`."""
        return self._check(text).violations

    def _check(self, text: str) -> _CollectingReport:
        lines = [text[a:b] for a, b in line_spans(text)]
        report = _CollectingReport(self._style.options)
        checker = pycodestyle.Checker(filename="<text>", lines=lines, options=self._style.options, report=report)
        checker.check_all()
        return report

    def flagged_spans(self, text: str, threshold: float = 0.0) -> list[tuple[int, int, str]]:
        """Every line with a violation (newline excluded), labelled with pycodestyle's codes and messages.

        `threshold` is on the line's score (violations per character), as for every scorer; a document
        pycodestyle fails on is flagged whole."""
        spans = line_spans(text)
        try:
            report = self._check(text)
        except Exception as exc:  # noqa: BLE001 - shown, never "aligned"
            label = f"pycodestyle failed on this text: {type(exc).__name__}: {exc}"[:300]
            return [(0, len(text), label)] if text else []
        per_line: dict[int, list[str]] = {}
        for (line, _), message in zip(report.violations, report.texts):
            per_line.setdefault(min(max(line, 1), len(spans)) - 1, []).append(message)
        out = []
        for i in sorted(per_line):
            a, b = spans[i]
            if len(per_line[i]) / (b - a) > threshold:
                end = b - 1 if text[b - 1] == "\n" and b - 1 > a else b
                out.append((a, end, "; ".join(per_line[i])))
        return out

    def score_text(self, text: str) -> ScoredText:
        spans = line_spans(text)
        starts, ends = [a for a, _ in spans], [b for _, b in spans]
        try:
            found = self.violations(text)
        except Exception as exc:  # noqa: BLE001 - recorded per segment, never fatal and never "aligned"
            msg = f"pycodestyle failed on this document: {type(exc).__name__}: {exc}"[:300]
            return ScoredText(starts, ends, [math.nan] * len(spans), [msg] * len(spans))
        per_line = Counter(min(max(line, 1), len(spans)) - 1 for line, _ in found) if spans else Counter()
        scores = [per_line.get(i, 0) / (b - a) for i, (a, b) in enumerate(spans)]
        return ScoredText(starts, ends, scores)

    def score_texts(self, texts: Sequence[str]) -> list[ScoredText]:
        return [self.score_text(t) for t in texts]

    def count(self, text: str) -> int:
        return len(self.violations(text))
