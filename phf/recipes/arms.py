"""One arm of a recipe, as `phf demo` and `phf sweep` both run it: train its model, evaluate the checkpoint, record
the arm's results.json (the evaluation, then how the model was trained); and the check that lets a rerun reuse an
arm whose results exist for the same config.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from phf.core.config import RunConfig, config_to_yaml
from phf.core.io import read_json
from phf.core.run_folder import (CONFIG_YAML, checkpoint_dir, read_results_dict, results_path, run_json_file,
                                 samples_file, write_results)
from phf.evaluation.evaluate import evaluate_checkpoint
from phf.tasks import task_for
from phf.training.trainer import TrainResult, run_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArmJob:
    """What one arm trains and where it is recorded."""

    cfg: RunConfig
    """The arm's run config."""
    run_dir: Path
    """The arm's run folder: config, metrics, checkpoint, samples, results.json."""
    label: str
    """`run_dir` as the recipe's results.json records it: relative to the recipe's folder."""
    data_dir: Path
    """The shared data folder (scored corpus, tokenizer, token streams)."""
    init_from: Path | None = None
    """Weights to start from (a model folder or a snapshot); None: from scratch."""
    snapshots: tuple[int, ...] = ()
    """Steps after which a copy of the weights is kept (the branch point other arms start from)."""
    tokens_before: int | None = None
    """Tokens the starting weights were trained on, recorded with the arm's own as `tokens_seen_total` (a sweep
    compares its arms at equal total tokens); None: not recorded."""
    fields: dict = field(default_factory=dict)
    """More fields recorded as they are (a sweep's `kind` and `config_hash`)."""
    flat: tuple[str, ...] = ()
    """Fields of the unconditional samples' metrics recorded at the top level too (a sweep's `distinct_2`)."""


def run_arm(job: ArmJob, progress: bool = True) -> tuple[dict, TrainResult]:
    """Train, evaluate and record one arm; its results (as written to its results.json) and the training's."""
    started = time.perf_counter()
    trained = run_training(job.cfg, job.run_dir, job.data_dir, progress=progress, init_from=job.init_from,
                           snapshots=job.snapshots)
    trained_at = time.perf_counter()
    res = evaluate_checkpoint(trained.checkpoint, job.cfg, trained.data.scored, job.run_dir, progress=progress)
    # where an arm's time went: data (scoring, tokenizer, token streams, each reused once made) and the model's
    # setup and checkpoint, then the training loop, then sampling, scoring and held-out bits/char
    stages = {"data_and_setup": trained_at - started - trained.seconds, "train": trained.seconds,
              "evaluate": time.perf_counter() - trained_at}
    res["train_tokens"] = trained.tokens
    if job.tokens_before is not None:
        res["tokens_seen_total"] = trained.tokens + job.tokens_before
    res.update(train_seconds=round(trained.seconds, 1), val_loss=trained.final_val_loss,
               objective_settings=trained.objective.describe(), run_dir=job.label, **job.fields,
               stage_seconds={k: round(v, 1) for k, v in stages.items()})
    res.update({key: res.get("unconditional", {}).get(key) for key in job.flat})
    write_results(job.run_dir, res)
    return res, trained


def finished_arm(job: ArmJob) -> dict | None:
    """The results of an arm an earlier run of the recipe finished with the same config (its config.yaml is this
    config's, from scratch, and its checkpoint, samples and recorded results are there), so that a killed demo
    picks up where it stopped; None: the arm is to be run."""
    run = job.run_dir
    needed = (results_path(run), checkpoint_dir(run), samples_file(run), run / CONFIG_YAML, run_json_file(run))
    if job.init_from is not None or not all(p.exists() for p in needed):
        return None
    if (run / CONFIG_YAML).read_text(encoding="utf-8") != config_to_yaml(job.cfg) or \
            read_json(run_json_file(run)).get("init_from"):
        return None
    res = read_results_dict(run)
    if "train_tokens" not in res:  # evaluated, but the recipe's record of its training was never written
        return None
    log.info("== %s: reusing its finished run (same config)", job.label)
    return res


def corpus_summary(scored, cfg: RunConfig) -> dict:
    """The scored corpus' summary (documents, segments, misaligned share), logged; `cfg` is the run's config, whose
    scoring.misaligned_above_quantile training has resolved."""
    summary = scored.summary(task_for(cfg).misaligned_above)
    log.info("scored corpus: %s", corpus_line(summary))
    return summary


def corpus_line(s: dict) -> str:
    docs = s["documents"]
    return (f"{sum(docs.values())} documents ({docs['train']} train / {docs['validation']} validation / "
            f"{docs['test']} test), {s['chars'] / 1e6:.1f}M chars, {s['segments']:,} segments, "
            f"{100 * s['misaligned_segment_share']:.1f}% misaligned, {s['segment_errors']} scorer errors, "
            f"skipped: {s['skipped'] or 'none'}")


def reusable(previous: dict, name: str, key: str, needed: list[Path]) -> dict | None:
    """An arm's results from an earlier run of the recipe (`previous`, its results.json) when they were made with
    the same config (`key`, the arm's config_hash) and the files a later step reads (`needed`) are still there."""
    old = previous.get("objectives", {}).get(name)
    if old and old.get("config_hash") == key and all(p.exists() for p in needed):
        log.info("== %s: reusing its results (same config)", name)
        return old
    return None
