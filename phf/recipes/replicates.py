"""Replicates of a recipe: the same arms trained and sampled once per seed, then, per arm, every figure averaged
over seeds with its 95% interval, its ratio to MLE with an interval, and a p-value against MLE
(phf.evaluation.uncertainty). Replicate k trains with `train.seed + k` and samples with `sample.seed + k`, so
replicate 0 is the single-seed run; the scored corpus and the tokenizer are shared.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

from phf.core.config import RunConfig
from phf.evaluation.uncertainty import compare, seed_interval, seed_ratio_interval

REFERENCE = "mle"
SCENARIOS = ("unconditional", "prompted")


def replicate_config(cfg: RunConfig, k: int) -> RunConfig:
    """The config of replicate `k`: its own training and sampling seeds."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed += k
    cfg.sample.seed += k
    return cfg


def sample_scores(run_dir: Path) -> dict[str, list[float]]:
    """scenario -> the scores of a run's samples (its samples.jsonl); NaN for an unscorable sample."""
    out: dict[str, list[float]] = {}
    path = Path(run_dir) / "samples.jsonl"
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            score = r.get("score")
            out.setdefault(r["scenario"], []).append(math.nan if score is None else float(score))
    return out


def _mean_fields(entries: list[dict]) -> dict:
    """Numbers averaged over replicates (nested dicts too); anything else taken from the first replicate."""
    out = {}
    for key, first in entries[0].items():
        values = [e.get(key) for e in entries]
        if isinstance(first, dict):
            out[key] = _mean_fields([v for v in values if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            finite = [float(v) for v in values if not math.isnan(v)]
            out[key] = float(np.mean(finite)) if finite else math.nan
        else:
            out[key] = first
    return out


def combine(replicates: list[dict[str, dict]], scores: list[dict[str, dict[str, list[float]]]],
            seeds: list[int]) -> dict[str, dict]:
    """Per arm: the replicates' results averaged, with `seeds`, `per_seed` values and the interval fields.

    `replicates[k][arm]` is replicate k's results of an arm; `scores[k][arm][scenario]` its sample scores."""
    combined = {}
    arms = list(replicates[0])
    for arm in arms:
        rng = np.random.default_rng(0)  # the same intervals on every rerun of the same results
        entries = [r[arm] for r in replicates if arm in r]
        res = _mean_fields(entries)
        res["seeds"] = seeds[:len(entries)]
        res["per_seed"] = {"misalignment_mean": [e.get("misalignment_mean") for e in entries],
                           "heldout_bits_per_char": [e.get("heldout_bits_per_char") for e in entries]}
        if any("prompted" in e for e in entries):
            res["per_seed"]["prompted_misalignment_mean"] = [e.get("prompted", {}).get("misalignment_mean")
                                                             for e in entries]
        is_reference = arm == REFERENCE or REFERENCE not in arms
        for scenario in SCENARIOS:
            groups = [s[arm].get(scenario, []) for s in scores if arm in s]
            if not any(groups):
                continue
            reference = None if is_reference else [s[REFERENCE].get(scenario, []) for s in scores]
            fields = compare(groups, reference, rng)
            if scenario == "unconditional":
                res.update(fields)
            if isinstance(res.get(scenario), dict):
                res[scenario].update(fields)
        res.update(_heldout_fields(entries, None if is_reference else
                                   [r[REFERENCE] for r in replicates if REFERENCE in r], rng))
        combined[arm] = res
    return combined


def _heldout_fields(entries: list[dict], reference: list[dict] | None, rng: np.random.Generator) -> dict:
    """Held-out bits/char is one number per seed: its interval and its ratio's are over seeds (None for one)."""
    values = [e.get("heldout_bits_per_char", math.nan) for e in entries]
    out = {"heldout_bits_per_char_ci95": seed_interval(values, rng)}
    if reference is not None:
        ref = [e.get("heldout_bits_per_char", math.nan) for e in reference]
        mean, ref_mean = np.nanmean(values), np.nanmean(ref)
        out["heldout_ratio_to_mle"] = float(mean / ref_mean) if ref_mean else math.nan
        out["heldout_ratio_ci95"] = seed_ratio_interval(values, ref, rng)
    return out


def interval_text(ratio: float | None, interval: list[float] | None) -> str:
    """`0.38x [0.31, 0.46]`, or `0.38x` without an interval."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "-"
    return f"{ratio:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def percent_text(ratio: float | None, interval: list[float] | None) -> str:
    """`+1.8% [+1.2%, +2.4%]` from a ratio and its interval."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "-"
    text = f"{100 * (ratio - 1):+.1f}%"
    return text + (f" [{100 * (interval[0] - 1):+.1f}%, {100 * (interval[1] - 1):+.1f}%]" if interval else "")
