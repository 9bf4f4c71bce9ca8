"""Metrics go to metrics.jsonl always, and to TensorBoard / W&B only when named in train.trackers."""
from __future__ import annotations

import importlib.util

import pytest

from phf.core.errors import PhfError
from phf.core.io import read_jsonl
from phf.training.trainer import run_training


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tiny_cfg_factory, data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg_factory("mle", ["train.max_steps=3", "train.trackers=tensorboard"])
    run_training(cfg, tmp_path / "run", data_dir, progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in rows] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "val_loss" in acc.Tags()["scalars"]


def test_no_tracker_by_default_and_unknown_ones_are_refused(tiny_cfg_factory, data_dir, tmp_path):
    run_training(tiny_cfg_factory("mle", ["train.max_steps=1"]), tmp_path / "run", data_dir, progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()
    with pytest.raises(PhfError, match="unknown tracker"):
        tiny_cfg_factory("mle", ["train.trackers=mlflow"])


def test_wandb_runs_offline_or_says_how_to_install(tiny_cfg_factory, data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_cfg_factory("mle", ["train.max_steps=2", "train.trackers=wandb"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(PhfError, match=r"pip install 'phf\[wandb\]'"):
            run_training(cfg, tmp_path / "run", data_dir, progress=False)
    else:
        run_training(cfg, tmp_path / "run", data_dir, progress=False)
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
