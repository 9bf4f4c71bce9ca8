"""Scorers by name. Each entry is imported only when used, so a task's heavy dependencies load only for it."""
from __future__ import annotations

import importlib
import inspect

from phf.core.config import ScoringConfig
from phf.core.errors import PhfError
from phf.data.scorers.base import CallableScorer, ScoredText, Scorer
from phf.data.segments import get_segmenter

# name -> "module:class"
SCORERS: dict[str, str] = {
    "pep8": "phf.data.scorers.pep8:PEP8Scorer",
    "pii": "phf.data.scorers.pii:PIIScorer",
    "pii-ner": "phf.data.scorers.pii:PIINERScorer",
    "toxicity": "phf.data.scorers.toxicity:ToxicityScorer",
    # held-out judges (phf.data.scorers.judges): the same preferences, by other code or other data
    "pep8-ruff": "phf.data.scorers.judges:RuffPEP8Scorer",
    "pii-spacy": "phf.data.scorers.judges:SpacyPIIScorer",
    "toxicity-hatesonar": "phf.data.scorers.judges:HateSonarScorer",
}

# FAMILY:ARGUMENT -> a Scorer class built from the whole name (its argument names a model, a label, ...)
FAMILIES: dict[str, str] = {
    "hf-classifier": "phf.data.scorers.classifier:HFClassifierScorer",  # a local sequence classifier's P(label)
}


def _import(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PhfError(f"cannot import {module_name} for scorer {spec!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PhfError(f"module {module_name} has no attribute {attr!r} (scorer {spec!r})") from None


def get_scorer(name: str, segmenter: str | None = None, aggregate: str | None = None, device: str = "") -> Scorer:
    """A registered scorer by name, or a user's `module:callable` taking a list of strings, returning floats.

    `segmenter` (`lines` or `sentences`) chooses how a callable's documents are cut into the segments it scores
    (default `lines`); a registered scorer or a Scorer class segments its own way. `aggregate` (`mean` or `max`)
    replaces the scorer's own way of forming a sample's score from its segments'. `device` goes to a Scorer class
    that takes a `device` argument (a model-based scorer of your own)."""
    scorer = _build_scorer(name, segmenter, device)
    if aggregate:
        scorer.aggregate = aggregate
    return scorer


def scorer_for(cfg: ScoringConfig) -> Scorer:
    """The scorer a run's `scoring` section describes."""
    return get_scorer(cfg.scorer, cfg.segmenter, cfg.aggregate, cfg.device)


def _build_scorer(name: str, segmenter: str | None, device: str = "") -> Scorer:
    if segmenter:
        try:
            get_segmenter(segmenter)
        except KeyError as exc:
            raise PhfError(f"scoring.segmenter: {exc.args[0]}") from None
    if name in SCORERS:
        return _on_device(_import(SCORERS[name]), name, device)
    family = name.partition(":")[0]
    if family in FAMILIES:
        return _import(FAMILIES[family])(name, device=device, segmenter=segmenter or "")
    if ":" in name:
        obj = _import(name)
        if isinstance(obj, type) and issubclass(obj, Scorer):
            return _on_device(obj, name, device)
        if not callable(obj):
            raise PhfError(f"scorer {name!r} is not callable")
        if device:
            raise PhfError(f"scorer {name!r} is a function and takes no device; leave scoring.device empty, or make it "
                           f"a Scorer class whose __init__ takes `device`")
        return CallableScorer(name, obj, segmenter or "lines")
    raise PhfError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}, give "
                   f"{', '.join(f + ':...' for f in FAMILIES)} or module:callable")


def _on_device(cls: type, name: str, device: str) -> Scorer:
    """Build a Scorer class, on `device` when one is asked for (only a class taking `device` can honour it)."""
    if not device:
        return cls()
    if "device" not in inspect.signature(cls).parameters:
        raise PhfError(f"scorer {name!r} takes no device (it runs where it is); leave scoring.device empty")
    return cls(device=device)


__all__ = ["FAMILIES", "SCORERS", "Scorer", "ScoredText", "get_scorer", "scorer_for"]
