"""Tasks: one home per preference. `task_for(cfg)` is the task a run's config describes; `get_task(name)` a task
by name (a name that is not shipped is a task of your own, defined by its config)."""
from __future__ import annotations

from pathlib import Path

from phf.core.config import RunConfig
from phf.data.scoring import ScoredCorpus, quantile_threshold, score_corpus
from phf.tasks import pep8, pii, toxicity
from phf.tasks.base import Task, configured, user_task

SHIPPED: dict[str, Task] = {t.name: t for t in (pep8.TASK, pii.TASK, toxicity.TASK)}


def get_task(name: str) -> Task:
    """A shipped task, or a task of your own with the generic defaults (`phf.tasks.base.user_task`)."""
    return SHIPPED.get(name) or user_task(name)


def task_for(cfg: RunConfig) -> Task:
    """The task of a run: the shipped one its name picks, or one built from its config, as the config refines it."""
    task = SHIPPED.get(cfg.task)
    if task is None:
        task = user_task(cfg.task, cfg.scoring.misaligned_above or 0.0, cfg.scoring.segmenter, cfg.scoring.aggregate)
    return configured(task, cfg)


def all_sources() -> dict:
    """Every named corpus source the shipped tasks bring (a config may read any of them)."""
    return {name: lister for t in SHIPPED.values() for name, lister in t.corpus_sources.items()}


def score_run_corpus(cfg: RunConfig, data_dir: str | Path, progress: bool = True,
                     rescore: bool = False) -> ScoredCorpus:
    """The scored corpus of a run's config, in `data_dir` (reused when already scored, unless `rescore`). A
    `scoring.misaligned_above_quantile` is resolved against it here, into the config's `misaligned_above` (so the
    run's config.yaml, written after, records the value every later stage reads)."""
    scored = score_corpus(cfg.corpus, cfg.scoring, Path(data_dir), progress=progress, sources=all_sources(),
                          rescore=rescore)
    if cfg.scoring.misaligned_above is None and cfg.scoring.misaligned_above_quantile is not None:
        cfg.scoring.misaligned_above = quantile_threshold(scored, cfg.scoring.misaligned_above_quantile)
    return scored


__all__ = ["SHIPPED", "Task", "get_task", "task_for", "all_sources", "score_run_corpus"]
