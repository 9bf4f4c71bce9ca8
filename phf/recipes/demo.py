"""`phf demo`: the whole flow on an embedded default, one model per objective on the same token budget.

    corpus -> segments -> scores -> tokenizer -> token stream per objective -> model -> samples -> scores -> table
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from phf.core.config import load_config
from phf.evaluation.evaluate import evaluate_checkpoint, misaligned_threshold
from phf.core.errors import PhfError
from phf.core.io import write_json
from phf.training.trainer import run_training, versions

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEMO_OBJECTIVES = {task: ["mle", "filtering", "conditional"] for task in ("pep8", "pii", "toxicity")}


def config_path(task: str, objective: str) -> Path:
    path = CONFIG_DIR / task / f"{objective}.yaml"
    if not path.exists():
        tasks = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()) if CONFIG_DIR.exists() else []
        raise PhfError(f"no shipped config {path}; tasks with configs: {', '.join(tasks) or 'none'}")
    return path


def run_demo(task: str = "pep8", out: str | Path = "runs/demo", overrides: list[str] | None = None,
             objectives: list[str] | None = None, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    objectives = objectives or DEMO_OBJECTIVES.get(task) or ["mle", "filtering", "conditional"]
    configs = {name: load_config(config_path(task, name), overrides) for name in objectives}  # fail fast on errors
    results: dict = {"task": task, "objectives": {}, "wall_seconds": None}
    corpus_summary = None
    for name, cfg in configs.items():
        log.info("== %s: training on %s tokens", name, f"{cfg.train.max_tokens:,}")
        trained = run_training(cfg, out / name, data_dir, progress=progress)
        if corpus_summary is None:
            corpus_summary = trained.data.scored.summary(misaligned_threshold(task))
            log.info("scored corpus: %s", _corpus_line(corpus_summary))
        res = evaluate_checkpoint(trained.checkpoint, cfg, trained.data.scored, out / name, progress=progress)
        res.update(train_tokens=trained.tokens, train_seconds=round(trained.seconds, 1),
                   val_loss=trained.final_val_loss, objective_settings=trained.objective.describe())
        write_json(out / name / "results.json", res)
        results["objectives"][name] = res
    results["corpus"] = corpus_summary
    results["versions"] = versions()
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", results)
    return results


def _corpus_line(s: dict) -> str:
    docs = s["documents"]
    return (f"{sum(docs.values())} documents ({docs['train']} train / {docs['validation']} validation / "
            f"{docs['test']} test), {s['chars'] / 1e6:.1f}M chars, {s['segments']:,} segments, "
            f"{100 * s['misaligned_segment_share']:.1f}% misaligned, {s['segment_errors']} scorer errors, "
            f"skipped: {s['skipped'] or 'none'}")


def format_table(results: dict) -> str:
    rows = [("objective", "misalignment mean", "score_max@25", "misaligned share", "held-out bits/char",
             "parse rate", "prompted mean", "mean chars")]
    sweep = any("kl_from_reference_bits" in r for r in results["objectives"].values())
    if sweep:  # `phf sweep` adds capability as KL from the MLE model, and diversity
        rows[0] += ("KL from MLE bits/char", "distinct-2")
    for name, r in results["objectives"].items():
        row = (name, _fmt(r.get("misalignment_mean"), ".5f"), _fmt(r.get("score_max_at_25"), ".4f"),
               _fmt(r.get("misaligned_share"), ".2f"), _fmt(r.get("heldout_bits_per_char"), ".4f"),
               _fmt(r.get("parse_rate"), ".2f"), _fmt(r.get("prompted", {}).get("misalignment_mean"), ".5f"),
               _fmt(r.get("unconditional", {}).get("mean_chars"), ".0f"))
        if sweep:
            row += (_fmt(r.get("kl_from_reference_bits"), ".4f"), _fmt(r.get("distinct_2"), ".3f"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    mle = results["objectives"].get("mle")
    notes = []
    if mle:
        for name, r in results["objectives"].items():
            if name == "mle" or not mle.get("misalignment_mean"):
                continue
            ratio = r["misalignment_mean"] / mle["misalignment_mean"]
            dloss = r["heldout_bits_per_char"] / mle["heldout_bits_per_char"] - 1
            notes.append(f"{name}: {ratio:.2f}x MLE's misalignment, held-out bits/char {100 * dloss:+.1f}% vs MLE")
    wall = results.get("wall_seconds")
    tail = [f"wall time: {wall:.0f} s"] if wall else []
    return "\n".join(lines + [""] + notes + tail)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)
