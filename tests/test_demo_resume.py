"""A killed demo loses nothing finished: results.json holds the seeds done so far, and a rerun into the same folder
reuses every arm finished with the same config, training only what is missing."""
from __future__ import annotations

import hashlib
import logging

import pytest

import phf.recipes.demo as demo
from phf.core.io import read_json
from phf.recipes.configs import DemoConfig
from tests.conftest import tiny_overrides


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_demo_keeps_its_finished_seeds_and_a_rerun_trains_only_what_is_missing(pycorpus, tmp_path,
                                                                                      monkeypatch, caplog):
    cfg = DemoConfig(out=tmp_path / "demo", overrides=tuple(tiny_overrides(str(pycorpus))),
                     objectives=("mle", "conditional"), seeds=2)
    real_run_arm = demo.run_arm

    def killed_in_the_second_seed(job, progress=True):
        if job.cfg.train.seed != 42 and job.run_dir.name == "conditional":
            raise KeyboardInterrupt
        return real_run_arm(job, progress)

    monkeypatch.setattr(demo, "run_arm", killed_in_the_second_seed)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(cfg, progress=False)
    partial = read_json(tmp_path / "demo" / "results.json")
    assert partial["seeds"] == [42] and set(partial["objectives"]) == {"mle", "conditional"}
    assert partial["objectives"]["conditional"]["misalignment_mean"] >= 0

    monkeypatch.setattr(demo, "run_arm", real_run_arm)
    first_mle = tmp_path / "demo" / "seed-43" / "mle" / "checkpoint" / "model.safetensors"
    before = digest(first_mle)
    with caplog.at_level(logging.INFO, logger="phf"):
        results = demo.run_demo(cfg, progress=False)
    reused = [r.getMessage() for r in caplog.records if "reusing its finished run" in r.getMessage()]
    assert sorted(reused) == ["== seed-42/conditional: reusing its finished run (same config)",
                              "== seed-42/mle: reusing its finished run (same config)",
                              "== seed-43/mle: reusing its finished run (same config)"]
    assert digest(first_mle) == before and results["seeds"] == [42, 43]
    assert len(results["objectives"]["conditional"]["per_seed"]["misalignment_mean"]) == 2
    # the table's wall time is this rerun's, and it says that three of the four arms were timed by the first run
    assert (results["reused_arms"], results["arms_total"]) == (3, 4)
    assert "reusing 3 of 4 arms finished earlier" in demo.format_table(results)
    # held-out bits/char on the aligned segments alone, combined over the seeds like the whole documents' figure
    conditional = results["objectives"]["conditional"]
    assert 0 < conditional["heldout_aligned_char_share"] < 1 and conditional["heldout_aligned_ratio_to_mle"] > 0
    assert len(conditional["heldout_aligned_ratio_ci95"]) == 2
    assert "on aligned segments alone" in demo.format_table(results)

    # the same folder with another config trains again instead of reusing
    caplog.clear()
    other = DemoConfig(out=cfg.out, overrides=cfg.overrides + ("train.lr=5e-3",), objectives=("mle",), seeds=2)
    with caplog.at_level(logging.INFO, logger="phf"):
        demo.run_demo(other, progress=False)
    assert not any("reusing its finished run" in r.getMessage() for r in caplog.records)
    assert digest(first_mle) != before
