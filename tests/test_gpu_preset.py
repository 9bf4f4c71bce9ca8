"""The GPU preset of the demo (`phf demo --preset gpu`) at tiny sizes on the CPU: the preset's own config file, its
corpus (the standard library and the installed packages), scorer pool, judge, scenarios and table, with only the
sizes overridden, so that the preset cannot rot where no GPU is available."""
from __future__ import annotations

import json

import pytest

from phf.cli.main import main
from phf.core.config import load_config
from phf.core.errors import PhfError
from phf.recipes.demo import arm_configs, format_table, preset_path

# the CPU smoke run of the preset (docs/operations.md gives the same command): sizes only
SMOKE = ["corpus.max_documents=120", "corpus.max_document_chars=20000", "corpus.test_fraction=0.25",
         "tokenizer.vocab_size=512", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
         "train.max_steps=4", "train.batch_size=4", "train.dtype=fp32", "train.eval_tokens=512",
         "sample.num_samples=16", "sample.num_prompts=2", "sample.max_new_tokens=24", "eval.heldout_chars=3000"]


def test_the_gpu_preset_is_the_papers_model_and_evaluation_on_the_large_corpus():
    cfg = load_config(preset_path("pep8", "gpu"))
    assert cfg.corpus.source == "stdlib+site-packages" and cfg.corpus.max_documents > 0
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert cfg.tokenizer.vocab_size == 32768
    assert (cfg.sample.num_samples, cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_p) == \
        (4096, 640, 0.7, 0.9)
    assert cfg.sample.num_prompts > 0 and cfg.eval.heldout_chars > 0
    # every arm gets the same budget and the task's objective settings (the paper's)
    _, arms = arm_configs(config=preset_path("pep8", "gpu"))
    assert set(arms) == {"mle", "filtering", "conditional"}
    assert {a.train.max_tokens for a in arms.values()} == {cfg.train.max_tokens}
    assert arms["conditional"].objective.name == "conditional"


def test_an_unknown_preset_and_a_preset_with_a_config_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(PhfError, match="no demo preset 'tpu'; it has: gpu"):
        preset_path("pep8", "tpu")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--preset", "gpu", "--config", str(tmp_path / "x.yaml"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "give --preset or --config, not both" in capsys.readouterr().err


def test_the_gpu_preset_runs_end_to_end_at_tiny_sizes_on_the_cpu(tmp_path, capsys):
    args = ["-q", "demo", "--preset", "gpu", "--out", str(tmp_path / "demo")]
    for o in SMOKE:
        args += ["--set", o]
    main(args)
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["objectives"]) == {"mle", "filtering", "conditional"}
    assert "site-packages/" in json.dumps(results["corpus"]) or results["corpus"]["documents"]["train"] > 0
    for name, r in results["objectives"].items():
        assert r["num_samples"] == 16 and r["heldout_bits_per_char"] > 0
        assert r["prompted"]["num_samples"] == 2 and r["prompted_elsewhere"]["num_samples"] == 2
        assert r["judge"]["judge_scorer"] == "pep8-ruff" and "judge_misalignment_mean" in r["judge"]
        assert set(r["stage_seconds"]) == {"data_and_setup", "train", "evaluate"}
        config = (tmp_path / "demo" / name / "config.yaml").read_text()
        assert "temperature: 0.7" in config and "stdlib+site-packages" in config  # the preset's, not the demo's
    assert results["objectives"]["conditional"]["misalignment_ratio_ci95"]  # ratios with intervals
    assert set(results["stage_seconds"]) == {"data_and_setup", "train", "evaluate"}
    table = format_table(results)
    assert table in out and "wall time:" in table and "(data and setup" in table
