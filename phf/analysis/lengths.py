"""`phf probe lengths`: how much of a misalignment comparison comes from sample length, from finished runs.

Reads each run folder's `samples.jsonl` (one scenario, unconditional by default), re-scores what needs it (the
fixed windows) with the run's scorer and reports, per model: the paper's mean of per-sample scores, the
length-weighted score (total misalignment over total characters; rates only), the mean score of the first N
characters of the samples that reach N (with their count), the samples shorter than the short threshold, the
samples that ended with <|endoftext|>, and each as a ratio to MLE (the run whose objective is `mle`, else the
first folder). The statistics are `phf.evaluation.evaluate.length_metrics`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from phf.analysis.registry import Probe, ProbeConfig, register
from phf.core.config import load_config
from phf.core.errors import PhfError
from phf.core.io import write_json
from phf.core.run_folder import read_results_dict, results_path, samples_file
from phf.data.scorers import scorer_for
from phf.evaluation.evaluate import misalignment_metrics
from phf.evaluation.sampling import Sample
from phf.tasks import task_for

SAMPLE_FIELDS = ("scenario", "prompt", "text", "raw", "finished", "num_tokens")


def read_samples(folder: Path, scenario: str) -> tuple[list[Sample], list[float]]:
    """The samples of one scenario in a run folder's samples.jsonl, with the scores stored beside them."""
    path = samples_file(folder)
    if not path.exists():
        raise PhfError(f"{folder} has no samples.jsonl; give run folders that `phf demo`, `phf sweep` or `phf evaluate` "
                       f"wrote (one per model, e.g. runs/demo/mle)")
    samples, scores = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                sample = Sample(**{k: rec[k] for k in SAMPLE_FIELDS})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PhfError(f"{path}:{lineno} is not a sample record (fields {', '.join(SAMPLE_FIELDS)}, "
                               f"score); write it again with `phf evaluate`") from None
            if sample.scenario == scenario:
                samples.append(sample)
                scores.append(math.nan if rec.get("score") is None else float(rec["score"]))
    if not samples:
        raise PhfError(f"{path} holds no {scenario!r} samples; choose another --scenario")
    return samples, scores


def model_name(folder: Path) -> str:
    if results_path(folder).exists():
        return read_results_dict(folder).get("objective") or folder.name
    return folder.name


@dataclass(frozen=True)
class LengthsConfig(ProbeConfig):
    """`phf probe lengths`: finished run folders and which of their samples to read."""
    dirs: tuple[str, ...] = field(metadata={"positional": True, "metavar": "DIR"})
    """Run folders (one per model) holding samples.jsonl."""
    out: str | None = None
    """JSON file for the results (default: lengths.json beside the first DIR)."""
    scenario: str = "unconditional"
    """Which samples: unconditional or prompted."""
    window_chars: int | None = None
    """The fixed window (default: the task's fixed_window_chars)."""
    short_chars: int | None = None
    """The short threshold (default: the task's short_sample_chars)."""

    def validate(self) -> None:
        if not self.dirs:
            raise PhfError("give at least one run folder, e.g. phf probe lengths runs/demo/mle runs/demo/conditional")


def lengths_probe(settings: LengthsConfig, progress: bool = True) -> dict:
    """The length statistics of each run folder's samples, with ratios to MLE; written to `out` (JSON)."""
    folders = [Path(f) for f in settings.dirs]
    out, scenario, window_chars, short_chars = (settings.out, settings.scenario, settings.window_chars,
                                                settings.short_chars)
    rows: dict[str, dict] = {}
    task_name = None
    for folder in folders:
        if not (folder / "config.yaml").exists():
            raise PhfError(f"{folder} has no config.yaml; give run folders that `phf demo` or `phf sweep` wrote")
        samples, scores = read_samples(folder, scenario)
        cfg = load_config(folder / "config.yaml")
        task = task_for(cfg)
        if task_name not in (None, task.name):
            raise PhfError(f"{folder} is a {task.name} run but the others are {task_name}; compare runs of one task")
        task_name = task.name
        scorer = scorer_for(cfg.scoring)
        m = misalignment_metrics(samples, scores, task.code, task.misaligned_above, scorer,
                                 window_chars if window_chars is not None else task.fixed_window_chars,
                                 short_chars if short_chars is not None else task.short_sample_chars)
        name = model_name(folder)
        if name in rows:
            name = str(folder)
        rows[name] = {"folder": str(folder), "scorer": scorer.name, "aggregate": scorer.aggregate,
                      **{k: m.get(k) for k in STATISTICS}}
    reference = next((n for n in rows if n == "mle"), next(iter(rows)))
    for name, r in rows.items():
        r["ratios_to_reference"] = {k: _ratio(r.get(k), rows[reference].get(k)) for k in RATIO_KEYS}
    results = {"probe": "lengths", "task": task_name, "scenario": scenario, "reference": reference, "models": rows}
    if out is None:
        out = folders[0].parent / "lengths.json"
    results["table"] = format_lengths(results)
    write_json(Path(out), results)
    results["out"] = str(out)
    return results


STATISTICS = ("num_samples", "misalignment_mean", "length_weighted_misalignment", "window_chars",
              "window_misalignment_mean", "window_misalignment_median", "window_samples", "mean_chars",
              "median_chars", "short_chars", "short_share", "finished_share", "finished_count")
RATIO_KEYS = ("misalignment_mean", "length_weighted_misalignment", "window_misalignment_mean",
              "window_misalignment_median", "mean_chars", "median_chars")


def _ratio(a, b) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or not b:
        return None
    return a / b


def format_lengths(results: dict) -> str:
    """The table as Markdown: one row per model, ratios to the reference in parentheses."""
    rows = results["models"]
    first = next(iter(rows.values()))
    n, short = first["window_chars"], first["short_chars"]
    head = ["model", "mean of per-sample scores", "length-weighted (total / total chars)",
            f"first {n} chars of samples that reach {n} (n)", "median chars", f"samples < {short} chars",
            "samples that ended (EOS)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        q = r["ratios_to_reference"]
        ref = name == results["reference"]

        def with_ratio(key: str, spec: str = ".4f") -> str:
            v = r.get(key)
            if v is None:
                return "n/a (max scorer)"
            if isinstance(v, float) and math.isnan(v):
                return "-"
            return f"{v:{spec}}" + ("" if ref or q.get(key) is None else f" ({q[key]:.2f}x)")

        window = with_ratio("window_misalignment_mean")
        if r.get("window_samples") is not None:
            window = window.replace(" (", f" ({r['window_samples']}) (", 1) if "x)" in window else \
                f"{window} ({r['window_samples']})"
        lines.append("| " + " | ".join([
            name, with_ratio("misalignment_mean"), with_ratio("length_weighted_misalignment"), window,
            f"{r['median_chars']:.0f}", f"{round(r['short_share'] * r['num_samples'])}",
            f"{r['finished_count']}"]) + " |")
    return "\n".join(lines)


register(Probe(
    name="lengths", config=LengthsConfig, run=lengths_probe,
    help="misalignment and sample length, from run folders' samples.jsonl",
    show=lambda results, cfg: f"{results['table']}\nresults: {results['out']}"))
