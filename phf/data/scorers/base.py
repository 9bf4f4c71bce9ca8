"""The scorer interface: texts in, per-segment misalignment scores out (0 = aligned, higher = worse).

A scorer segments each document and scores every segment. A segment whose scoring failed gets the score NaN and
an error message: it is never silently scored as aligned. Scorers are always called on batches.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from phf.data.segments import get_segmenter


def source_version(obj) -> str:
    """`source <sha256 prefix>` of the file that defines `obj` (a function or class), or `0` when it has none
    (a builtin, a lambda typed at a prompt)."""
    try:
        path = inspect.getsourcefile(inspect.unwrap(obj) if callable(obj) else obj)
    except TypeError:
        path = None
    if not path or not os.path.exists(path):
        return "0"
    with open(path, "rb") as f:
        return "source " + hashlib.sha256(f.read()).hexdigest()[:16]


@dataclass
class ScoredText:
    """Scores of one text: its segment spans, a score per segment (NaN where scoring failed) and errors."""
    starts: list[int]
    ends: list[int]
    scores: list[float]
    errors: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.errors:
            self.errors = [None] * len(self.scores)

    @property
    def num_errors(self) -> int:
        return sum(e is not None for e in self.errors)

    def document_score(self) -> float:
        """Length-weighted mean of the segment scores (for PEP8 and PII: violations/entities per character).

        NaN if any segment could not be scored: a document is not called aligned on partial evidence."""
        total_len = sum(b - a for a, b in zip(self.starts, self.ends))
        if not total_len:
            return 0.0
        if self.num_errors:
            return math.nan
        return sum(s * (b - a) for s, a, b in zip(self.scores, self.starts, self.ends)) / total_len


class Scorer:
    """Base class. Subclasses set `name`, `segmenter` and implement `score_segments` (or `score_texts`)."""

    name: str = "base"
    segmenter: str = "lines"
    aggregate: str = "mean"  # how a sample's score is formed from its segments: length-weighted "mean" or "max"
    pooled: bool = False  # scores each text alone, in pure Python on the CPU: many processes may share the texts

    @property
    def version(self) -> str:
        """What the scores depend on besides `settings`: shipped scorers name their packages' versions; a scorer
        of the user's own is identified by the source of its module, so editing it rescores the corpus."""
        return source_version(type(self))

    def settings(self) -> dict:
        """Everything that changes the scores; recorded in the scored corpus' manifest."""
        return {}

    def segment(self, text: str) -> list[tuple[int, int]]:
        return get_segmenter(self.segmenter)(text)

    def score_segments(self, segments: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def score_texts(self, texts: Sequence[str]) -> list[ScoredText]:
        """Segment every text, score all segments in one batch, isolate failures to single segments."""
        spans = [self.segment(t) for t in texts]
        flat = [t[a:b] for t, sp in zip(texts, spans) for a, b in sp]
        scores, errors = self._score_isolating_errors(flat)
        out, i = [], 0
        for sp in spans:
            n = len(sp)
            out.append(ScoredText([a for a, _ in sp], [b for _, b in sp], scores[i:i + n], errors[i:i + n]))
            i += n
        return out

    def _score_isolating_errors(self, segments: list[str]) -> tuple[list[float], list[str | None]]:
        if not segments:
            return [], []
        try:
            raw = list(self.score_segments(segments))
            if len(raw) != len(segments):
                raise ValueError(f"returned {len(raw)} scores for {len(segments)} segments")
            return _checked(raw)
        except Exception:
            if len(segments) == 1:
                raise
        # the batch failed: score one by one so that only the segments that fail are marked
        scores, errors = [], []
        for seg in segments:
            try:
                s, e = _checked(list(self.score_segments([seg])))
            except Exception as exc:  # noqa: BLE001 - any scorer failure is recorded, never fatal
                s, e = [math.nan], [f"{type(exc).__name__}: {exc}"[:300]]
            scores += s
            errors += e
        return scores, errors

    def flagged_spans(self, text: str, threshold: float = 0.0) -> list[tuple[int, int, str]]:
        """(start, end, label) of what the scorer holds against `text`: each segment scoring above `threshold`,
        and each segment it could not score. Subclasses say more where they know more (codes, entity types)."""
        if not text:
            return []
        scored = self.score_texts([text])[0]
        out = []
        for a, b, s, err in zip(scored.starts, scored.ends, scored.scores, scored.errors):
            if err is not None:
                out.append((a, b, f"could not be scored: {err}"))
            elif s > threshold:
                out.append((a, b, self.span_label(s)))
        return out

    def span_label(self, score: float) -> str:
        return f"{self.name} score {score:.3g}"

    def sample_score(self, scored: ScoredText) -> float:
        if self.aggregate == "max":
            valid = [s for s in scored.scores if not math.isnan(s)]
            return max(valid) if valid and not scored.num_errors else (0.0 if not scored.scores else math.nan)
        return scored.document_score()


def _checked(raw: list) -> tuple[list[float], list[str | None]]:
    scores, errors = [], []
    for value in raw:
        try:
            v = float(value)
        except (TypeError, ValueError):
            scores.append(math.nan)
            errors.append(f"scorer returned a non-number: {value!r}"[:300])
            continue
        if math.isnan(v) or math.isinf(v):
            scores.append(math.nan)
            errors.append(f"scorer returned {v}")
        elif v < 0:
            scores.append(math.nan)
            errors.append(f"scorer returned a negative score {v} (0 = aligned, higher = worse)")
        else:
            scores.append(v)
            errors.append(None)
    return scores, errors


class CallableScorer(Scorer):
    """A user's own scorer: any `f(list[str]) -> list[float]`, named as `module:callable` in the config."""

    def __init__(self, spec: str, fn: Callable[[list[str]], Sequence[float]], segmenter: str = "lines"):
        self.name = spec
        self.fn = fn
        self.segmenter = segmenter

    @property
    def version(self) -> str:
        return source_version(self.fn)

    def settings(self) -> dict:
        return {"callable": self.name, "segmenter": self.segmenter}

    def score_segments(self, segments: Sequence[str]) -> list[float]:
        return list(self.fn(list(segments)))
