"""Held-out judges: scorers of a task's preference that training never saw, built from other code or other data.

A model trained against a scorer can learn that scorer's blind spots. Evaluation therefore also scores every
sample with a judge, and a report where the training scorer and the judge disagree on which arm wins points at
Goodhart. Each judge uses the scorer interface (segments, per-segment scores, the task's aggregate), so
evaluation scores samples with it exactly as with the training scorer.

- `pep8-ruff`: ruff's implementation of pycodestyle's E and W rules (Rust, its own tokenizer; the preview rules
  included, as the E1/E2/E3 checks are there), not pycodestyle. Violations per character, per line.
- `toxicity-hatesonar`: HateSonar (Davidson et al. 2017): a TF-IDF + logistic-regression classifier of hate
  speech and offensive language trained on labelled tweets, shipped as ONNX inside its wheel; training's scorer
  (alt-profanity-check) learnt from other data. A sentence's score is P(hate) + P(offensive).
- `pii-spacy`: spaCy's statistical NER (people, organisations, places) alone, where training's `pii` scorer used
  scrubadub's regular expressions (the `pii-ner` extra).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import numpy as np

from phf.core.errors import PhfError
from phf.data.scorers.base import ScoredText, Scorer
from phf.data.scorers.pii import PIIScorer
from phf.data.segments import line_spans


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"


def ruff_binary() -> str:
    """The ruff executable of this environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if not found:
        raise PhfError("the pep8-ruff judge needs ruff: pip install ruff (a dependency of phf)")
    return found


class RuffPEP8Scorer(Scorer):
    """pycodestyle's rules as ruff implements them: every text checked as a file, once, in one ruff run."""

    name = "pep8-ruff"
    segmenter = "lines"

    def __init__(self, max_line_length: int = 79):
        self.max_line_length = max_line_length

    @property
    def version(self) -> str:
        return f"ruff {_version('ruff')}"

    def settings(self) -> dict:
        return {"select": ["E", "W"], "preview": True, "line_length": self.max_line_length}

    def violations(self, texts: Sequence[str]) -> list[list[int]]:
        """Per text, the 1-based line number of every E/W violation ruff reports."""
        with tempfile.TemporaryDirectory(prefix="phf-ruff-") as tmp:
            for i, text in enumerate(texts):
                Path(tmp, f"{i}.py").write_text(text, encoding="utf-8")
            cmd = [ruff_binary(), "check", "--isolated", "--preview", "--select", "E,W", "--line-length",
                   str(self.max_line_length), "--output-format", "json", "--no-cache", "--exit-zero", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
            if done.returncode != 0:
                raise PhfError(f"ruff failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
            found: list[list[int]] = [[] for _ in texts]
            for d in json.loads(done.stdout or "[]"):
                if d.get("code"):  # a syntax error has no code: pycodestyle does not parse either
                    found[int(Path(d["filename"]).stem)].append(int(d["location"]["row"]))
        return found

    def score_texts(self, texts: Sequence[str]) -> list[ScoredText]:
        texts = list(texts)
        try:
            found = self.violations(texts) if texts else []
        except (PhfError, OSError, ValueError) as exc:
            msg = f"ruff failed: {exc}"[:300]
            return [ScoredText(*_spans(t), [math.nan] * len(line_spans(t)), [msg] * len(line_spans(t)))
                    for t in texts]
        out = []
        for text, rows in zip(texts, found):
            spans = line_spans(text)
            per_line = Counter(min(max(r, 1), len(spans)) - 1 for r in rows) if spans else Counter()
            out.append(ScoredText(*_spans(text), [per_line.get(i, 0) / (b - a) for i, (a, b) in enumerate(spans)]))
        return out


def _spans(text: str) -> tuple[list[int], list[int]]:
    spans = line_spans(text)
    return [a for a, _ in spans], [b for _, b in spans]


class HateSonarScorer(Scorer):
    """HateSonar's ONNX classifier over sentences; a sentence scores P(hate speech) + P(offensive language)."""

    name = "toxicity-hatesonar"
    segmenter = "sentences"
    aggregate = "max"  # as the training scorer: a sample is as toxic as its most toxic sentence

    def __init__(self):
        try:
            import onnx
            import onnxruntime
            from hatesonar.api import DEFAULT_MODEL_FILE
        except ImportError as exc:
            raise PhfError(f"the toxicity-hatesonar judge needs hatesonar: pip install hatesonar ({exc})") from None
        self._session = _session_with_a_locale(onnx, onnxruntime, DEFAULT_MODEL_FILE)

    @property
    def version(self) -> str:
        return f"hatesonar {_version('hatesonar')}, onnxruntime {_version('onnxruntime')}"

    def score_segments(self, segments: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(segments), 512):
            batch = np.array(list(segments[i:i + 512]), dtype=object)
            _, probabilities = self._session.run(None, {"text": batch})
            out += [float(1.0 - p[2]) for p in probabilities]  # class 2: neither hate nor offensive
        return out


def _session_with_a_locale(onnx, onnxruntime, model_file):
    """The model lower-cases text with ONNX's StringNormalizer, which asks the C++ library for the en_US.UTF-8
    locale; many machines (containers) have only C.UTF-8. Lower-casing is then done in the first locale this
    machine has: en_US.UTF-8 (as shipped), C.UTF-8, C.utf8, C (ASCII only)."""
    model = onnx.load(str(model_file))
    errors = []
    for locale in ("", "C.UTF-8", "C.utf8", "C"):
        if locale:
            for node in model.graph.node:
                if node.op_type == "StringNormalizer":
                    kept = [a for a in node.attribute if a.name != "locale"]
                    del node.attribute[:]
                    node.attribute.extend(kept + [onnx.helper.make_attribute("locale", locale)])
        try:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 4  # a missing locale is expected here: the next one is tried
            return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail type
            errors.append(f"{locale or 'en_US.UTF-8'}: {str(exc).splitlines()[0][:120]}")
    raise PhfError(f"HateSonar's model cannot start on this machine ({'; '.join(errors)})")


class SpacyPIIScorer(PIIScorer):
    """Named people, organisations and places from spaCy's NER, without any regular expression."""

    name = "pii-spacy"

    def __init__(self):
        super().__init__(ner=True)

    @property
    def version(self) -> str:
        return f"spacy {_version('spacy')}"

    def regex_entities(self, text: str) -> list[tuple[int, int, str]]:
        return []  # the judge is the statistical model alone
