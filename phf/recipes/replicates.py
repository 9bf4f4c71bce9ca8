"""Replicates of a recipe: the same arms trained and sampled once per seed, then, per arm, every figure averaged
over seeds with its 95% interval, its ratio to MLE with an interval, and a p-value against MLE
(phf.evaluation.uncertainty). Replicate k trains with `train.seed + k` and samples with `sample.seed + k`, so
replicate 0 is the single-seed run; the scored corpus and the tokenizer are shared.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from phf.core.config import RunConfig, load_config
from phf.core.io import atomic_path
from phf.core.run_folder import (CONFIG_YAML, REFERENCE_ARM, RunFolder, read_results, read_results_dict, samples_file,
                                  write_results)
from phf.evaluation.evaluate import judge_for, judge_metrics, score_samples
from phf.evaluation.sampling import Sample
from phf.evaluation.strength import combine_strengths
from phf.evaluation.uncertainty import compare, seed_interval, seed_ratio_interval
from phf.tasks import task_for

log = logging.getLogger(__name__)

REFERENCE = REFERENCE_ARM
SCENARIOS = ("unconditional", "prompted", "prompted_elsewhere")


def replicate_config(cfg: RunConfig, k: int) -> RunConfig:
    """The config of replicate `k`: its own training and sampling seeds."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed += k
    cfg.sample.seed += k
    return cfg


def run_replicates(out: Path, seeds: list[int], run: Callable[[int, Path], dict],
                   after_seed: Callable[[dict, list[dict]], None] | None = None) -> tuple[dict[str, dict], list[dict]]:
    """A recipe once per seed, then per arm its replicates combined (`combine`): `run(k, where)` runs replicate k
    (seed `seeds[k]`) into `where`, DIR/seed-<seed> (DIR itself for one seed), and returns its results, whose
    `objectives` maps each arm to its results (with the arm's `run_dir`, whose samples are scored). Returns the
    combined arms and each replicate's results; `after_seed(combined, per_seed)` sees them after every seed."""
    per_seed, replicates, scores = [], [], []
    for k, seed in enumerate(seeds):
        where = RunFolder(out).replicate_dir(seed, len(seeds))
        if len(seeds) > 1:
            log.info("==== seed %d (%d of %d)", seed, k + 1, len(seeds))
        res = run(k, where)
        per_seed.append(res)
        replicates.append(res["objectives"])
        scores.append({arm: sample_scores(where / Path(r.get("run_dir") or arm.replace(":", "-")).name)
                       for arm, r in res["objectives"].items()})
        if after_seed is not None or k == len(seeds) - 1:  # combined once per seed it is needed for
            combined = combine(replicates, scores, seeds[:k + 1])
            if after_seed is not None:
                after_seed(combined, per_seed)
    return combined, per_seed


def sample_scores(run_dir: Path) -> dict[str, list[float]]:
    """scenario -> the training scorer's scores of a run's samples (its samples.jsonl), and `judge/<scenario>` ->
    the judge's; NaN for an unscorable sample."""
    out: dict[str, list[float]] = {}
    path = samples_file(run_dir)
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            for key, field in ((r["scenario"], "score"), (f"judge/{r['scenario']}", "judge_score")):
                if field in r:
                    out.setdefault(key, []).append(math.nan if r[field] is None else float(r[field]))
    return out


def _mean_fields(entries: list[dict]) -> dict:
    """Numbers averaged over replicates (nested dicts too); anything else taken from the first replicate."""
    out = {}
    for key, first in entries[0].items():
        values = [e.get(key) for e in entries]
        if isinstance(first, dict):
            out[key] = _mean_fields([v for v in values if isinstance(v, dict)])
        elif all(v == first for v in values):  # a setting (window_chars, num_samples): kept as it is
            out[key] = first
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
        for scenario in SCENARIOS[1:]:
            if any(scenario in e for e in entries):
                res["per_seed"][f"{scenario}_misalignment_mean"] = [e.get(scenario, {}).get("misalignment_mean")
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
            _judge_fields(res, arm, scenario, scores, is_reference, rng)
        res.update(_heldout_fields(entries, None if is_reference else
                                   [r[REFERENCE] for r in replicates if REFERENCE in r], rng))
        if all("conditioning_strength" in e for e in entries):  # its interval over seeds, not the first seed's
            res["conditioning_strength"] = combine_strengths([e["conditioning_strength"] for e in entries], rng)
        _unconditioned_fields(res, arm, scores, is_reference, rng)
        combined[arm] = res
    return combined


def _unconditioned_fields(res: dict, arm: str, scores: list[dict], is_reference: bool,
                          rng: np.random.Generator) -> None:
    """A cooldown arm read without control tokens (scenario `unconditioned`): its interval, and its ratio to MLE's
    unconditional samples, by the training scorer and the judge (drawn last: the other fields' intervals stay as
    they were)."""
    block = res.get("unconditioned")
    if not isinstance(block, dict):
        return
    for key, into, prefix in (("unconditioned", block, "misalignment"),
                              ("judge/unconditioned", block.get("judge"), "judge_misalignment")):
        groups = [s[arm].get(key, []) for s in scores if arm in s]
        if not any(groups) or not isinstance(into, dict):
            continue
        reference = None if is_reference else [s[REFERENCE].get(key.replace("unconditioned", "unconditional"), [])
                                                for s in scores]
        into.update(compare(groups, reference, rng, prefix))


def _judge_fields(res: dict, arm: str, scenario: str, scores: list[dict], is_reference: bool,
                  rng: np.random.Generator) -> None:
    """The judge's interval fields, in the arm's `judge` block (per scenario, and flat for unconditional)."""
    key = f"judge/{scenario}"
    groups = [s[arm].get(key, []) for s in scores if arm in s]
    if not any(groups) or not isinstance(res.get("judge"), dict):
        return
    reference = None if is_reference else [s[REFERENCE].get(key, []) for s in scores]
    fields = compare(groups, reference, rng)
    res["judge"].setdefault(scenario, {}).update(fields)
    if scenario == "unconditional":
        res["judge"].update({f"judge_{k}": v for k, v in fields.items()})


def _heldout_fields(entries: list[dict], reference: list[dict] | None, rng: np.random.Generator) -> dict:
    """Held-out bits/char (and a sweep's KL from MLE) is one number per seed: its interval and its ratio's are
    over seeds (None for one)."""
    values = [e.get("heldout_bits_per_char", math.nan) for e in entries]
    out = {"heldout_bits_per_char_ci95": seed_interval(values, rng)}
    kl = [e.get("kl_from_reference_bits") for e in entries]
    if all(isinstance(v, (int, float)) for v in kl):
        out["kl_from_reference_bits_ci95"] = seed_interval(kl, rng)
    if reference is not None:
        ref = [e.get("heldout_bits_per_char", math.nan) for e in reference]
        mean, ref_mean = np.nanmean(values), np.nanmean(ref)
        out["heldout_ratio_to_mle"] = float(mean / ref_mean) if ref_mean else math.nan
        out["heldout_ratio_ci95"] = seed_ratio_interval(values, ref, rng)
        aligned = [e.get("heldout_aligned_bits_per_char") for e in entries]
        ref_aligned = [e.get("heldout_aligned_bits_per_char") for e in reference]
        if all(isinstance(v, float) for v in aligned + ref_aligned):  # runs evaluated before the split have none
            out["heldout_aligned_ratio_to_mle"] = float(np.mean(aligned) / np.mean(ref_aligned))
            out["heldout_aligned_ratio_ci95"] = seed_ratio_interval(aligned, ref_aligned, rng)
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


# -- a demo or sweep folder judged again -------------------------------------------------------------------------
def rejudge(out: str | Path, judge_name: str = "") -> dict:
    """Score the samples of every run of a demo or sweep folder with the held-out judge (`judge_name`, else each
    run's `eval.judge` or its task's), write `judge_score` into their samples.jsonl and the `judge` block into
    their results.json, and recombine the folder's results.json with intervals."""
    out = Path(out)
    folder = read_results(out)
    results = folder.to_dict()
    replicates, scores, seeds = [], [], []
    for seed, folders in RunFolder(out).replicate_run_dirs(folder):
        arms, arm_scores = {}, {}
        for arm, run in folders.items():
            cfg = load_config(run / CONFIG_YAML, [f"eval.judge={judge_name}"] if judge_name else [])
            task = task_for(cfg)
            judge, block = judge_for(cfg, task)
            records = [json.loads(line) for line in samples_file(run).read_text(encoding="utf-8").splitlines()]
            res = read_results_dict(run)
            if judge is not None:
                fields = {f.name for f in Sample.__dataclass_fields__.values()}
                samples = [Sample(**{k: v for k, v in r.items() if k in fields}) for r in records]
                for scenario in dict.fromkeys(s.scenario for s in samples):
                    idx = [i for i, s in enumerate(samples) if s.scenario == scenario]
                    judged = score_samples([samples[i] for i in idx], judge)
                    for i, j in zip(idx, judged):
                        records[i]["judge_score"] = j
                    block[scenario] = judge_metrics(judged, task.misaligned_above)
                if "unconditional" in block:
                    block["judge_misalignment_mean"] = block["unconditional"]["misalignment_mean"]
                with atomic_path(samples_file(run)) as tmp:
                    Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            res["judge"] = block
            write_results(run, res)
            arms[arm], arm_scores[arm] = res, sample_scores(run)
        replicates.append(arms)
        scores.append(arm_scores)
        seeds.append(seed if seed is not None else cfg.train.seed)
    results["objectives"] = combine(replicates, scores, seeds)
    results["seeds"] = seeds
    write_results(out, results)
    return results
