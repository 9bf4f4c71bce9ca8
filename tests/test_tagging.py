"""The tagging objective: <|misaligned|> before flagged segments only, deployed with it banned."""
from __future__ import annotations

import math

import numpy as np
import pytest

from phf.core.config import ObjectiveConfig
from phf.core.io import read_json
from phf.core.tokens import ALIGNED, MISALIGNED
from phf.evaluation.sampling import Deployment
from phf.model.lm import load_meta
from phf.recipes.sweep import SWEEP_OBJECTIVES
from phf.tasks import get_task
from phf.training.objectives import get_objective
from phf.training.trainer import run_training


def tagging(task: str = "pep8"):
    objective = get_objective(ObjectiveConfig(name="tagging"), get_task(task))
    objective.fit(np.array([0.0, 0.2, 0.9]))
    return objective


def test_only_segments_above_the_threshold_are_tagged():
    objective, rng = tagging(), np.random.default_rng(0)
    assert objective.threshold == 0.0  # pep8's conditional threshold: a line with any violation
    assert [objective.segment_prefix(s, rng) for s in (0.0, 0.01, 3.0, math.nan)] == [None, MISALIGNED, MISALIGNED,
                                                                                       None]
    assert objective.keep_document(5.0)  # every document stays


@pytest.mark.parametrize("task", ["pep8", "pii", "toxicity", "mine"])
def test_tagging_takes_conditional_trainings_threshold_and_stays_out_of_the_default_sweep(task):
    conditional = get_objective(ObjectiveConfig(name="conditional"), get_task(task))
    assert get_objective(ObjectiveConfig(name="tagging"), get_task(task)).threshold == conditional.threshold
    assert "tagging" not in SWEEP_OBJECTIVES


def test_tagging_writes_its_own_stream_and_is_deployed_without_the_tag():
    tag, conditional = tagging(), get_objective(ObjectiveConfig(name="conditional"), get_task("pep8"))
    conditional.fit(np.array([0.0]))
    assert tag.stream_settings() != conditional.stream_settings()
    deployment = Deployment.from_meta({"objective": tag.describe()})
    assert deployment.banned_tokens == [MISALIGNED] and not deployment.sampling_prefix
    assert not deployment.line_prefix and not deployment.conditional


def test_a_tagging_run_trains_on_a_stream_with_misaligned_tags_only(tiny_cfg_factory, tmp_path):
    cfg = tiny_cfg_factory("tagging", ["train.max_steps=2"])
    result = run_training(cfg, tmp_path / "run", tmp_path / "data", progress=False)
    assert result.steps == 2 and math.isfinite(result.final_val_loss)
    metas = [m for m in (read_json(p) for p in (tmp_path / "data").rglob("*.json"))
             if isinstance(m, dict) and m.get("split") == "train" and "num_tokens" in m]
    assert len(metas) == 1, "one training stream"
    assert metas[0][f"tokens_{MISALIGNED}"] > 0 and metas[0].get(f"tokens_{ALIGNED}", 0) == 0
    deployed = Deployment.from_meta(load_meta(result.checkpoint))  # as the checkpoint records it
    assert deployed.banned_tokens == [MISALIGNED] and not deployed.conditional
