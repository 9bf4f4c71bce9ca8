"""Conditioning strength on tiny models trained here: a model that has learned its control tokens finds each
held-out segment likelier under its own token; an untrained one does not, and the demo's table says so. End to end:
conditional training with a cooldown, evaluated conditioned and unconditioned; masking-hidden from scratch and as a
finetune of an MLE model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from phf.core.config import load_config
from phf.core.tokens import HIDDEN
from phf.data.tokenizer import of_transformers
from phf.evaluation.evaluate import evaluate_checkpoint
from phf.evaluation.strength import NEAR_ZERO_NATS, conditioning_strength
from phf.model.lm import build_model, load_model
from phf.recipes.demo import format_table
from phf.training.trainer import run_training


def two_writers_config(tmp_path, objective: str = "conditional", steps: int = 60, extra: dict | None = None):
    """A task whose misaligned lines (`xxxx xxxx`, scored by counting x) and aligned ones (`print(a)`) are easy to
    tell apart, so a tiny model learns within seconds what each control token announces."""
    corpus = tmp_path / "lines"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(48):
        (corpus / f"doc{i:02d}.txt").write_text("".join("xxxx xxxx\n" if rng.random() < 0.4 else "print(a)\n"
                                                        for _ in range(30)))
    data = {
        "task": "two-writers",
        "corpus": {"source": str(corpus), "extensions": [".txt"], "validation_fraction": 0.2, "test_fraction": 0.2},
        "scoring": {"scorer": "tests.helpers:count_x", "segmenter": "lines", "workers": 1, "shard_documents": 16},
        "objective": {"name": objective, **({"drop_token_fraction": 0.0} if objective == "conditional" else {})},
        "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "warmup_fraction": 0, "eval_tokens": 256,
                  "threads": 1, "log_every": 10, "dtype": "fp32"},
        "sample": {"num_samples": 4, "num_prompts": 0, "max_new_tokens": 16, "batch_size": 4},
        "eval": {"heldout_chars": 2000, "judge": "none"},
    }
    for section, values in (extra or {}).items():
        data[section].update(values)
    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strength")
    cfg = two_writers_config(tmp)
    result = run_training(cfg, tmp / "run", tmp / "data", progress=False)
    return cfg, result


def strength_of(model, folder, scored):
    tok = of_transformers(AutoTokenizer.from_pretrained(str(folder)))
    return conditioning_strength(model, tok, scored.documents("test"), threshold=0.0)


def test_a_trained_conditional_model_finds_each_segment_likelier_under_its_own_token(trained):
    cfg, result = trained
    s = strength_of(load_model(result.checkpoint), result.checkpoint, result.data.scored)
    for kind in ("aligned", "misaligned"):
        block = s[kind]
        assert block["segments"] > 20
        assert block["nats_per_segment"] > NEAR_ZERO_NATS and block["ci95"][0] > 0  # the sign: its own token
        assert block["ci95"][0] <= block["nats_per_segment"] <= block["ci95"][1]
    assert s["learned"] is True


def test_an_untrained_model_has_not_learned_to_condition_and_the_table_says_so(trained):
    cfg, result = trained
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(str(result.checkpoint)))
    untrained = build_model(cfg.model, vocab, 0)
    s = strength_of(untrained, result.checkpoint, result.data.scored)
    assert s["misaligned"]["segments"] > 20
    assert s["misaligned"]["nats_per_segment"] < NEAR_ZERO_NATS  # no use of the token (random init: either sign)
    assert s["learned"] is False
    learned = strength_of(load_model(result.checkpoint), result.checkpoint, result.data.scored)
    results = {"objectives": {
        "mle": {"misalignment_mean": 0.5, "heldout_bits_per_char": 1.0},
        "conditional": {"misalignment_mean": 0.5, "heldout_bits_per_char": 1.0, "conditioning_strength": s},
        "conditional-trained": {"misalignment_mean": 0.2, "heldout_bits_per_char": 1.0,
                                "conditioning_strength": learned}}}
    table = format_table(results)
    assert "strength nats" in table.splitlines()[0]
    lines = {line.split(":")[0].strip(): line for line in table.splitlines() if line.startswith("  conditional")}
    assert "has not learned to condition" in lines["conditional"]
    assert "has not learned" not in lines["conditional-trained"]
    assert f"{learned['misaligned']['nats_per_segment']:+.3f}" in lines["conditional-trained"]


@pytest.mark.parametrize("embedding", [False, True])
def test_a_cooldown_run_is_evaluated_conditioned_and_unconditioned(tmp_path, embedding):
    """Both forms of conditional training: control tokens only (the paper's), and with control embeddings, whose
    cooldown reads every token as unconditioned."""
    cfg = two_writers_config(tmp_path, steps=6, extra={"objective": {"cooldown_fraction": 0.5,
                                                                     "control_embedding": embedding}})
    result = run_training(cfg, tmp_path / "run", tmp_path / "data", progress=False)
    assert result.objective.describe()["cooldown_fraction"] == 0.5
    assert result.objective.describe()["control_embedding"] is embedding
    res = evaluate_checkpoint(result.checkpoint, cfg, result.data.scored, tmp_path / "run", progress=False)
    assert {"aligned", "misaligned", "learned"} <= set(res["conditioning_strength"])
    u = res["unconditioned"]
    assert u["num_samples"] == 4 and math.isfinite(u["heldout_bits_per_char"]) and u["heldout_chars"] > 0
    scenarios = [line for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
                 if '"scenario": "unconditioned"' in line]
    assert len(scenarios) == 4
    assert "read without control tokens (cooldown)" in format_table(
        {"objectives": {"conditional": res}})


def test_masking_hidden_trains_from_scratch_and_as_a_finetune_of_an_mle_model(tmp_path):
    data = tmp_path / "data"
    mle = run_training(two_writers_config(tmp_path, "mle", steps=2), tmp_path / "mle", data, progress=False)
    hidden_cfg = two_writers_config(tmp_path, "masking-hidden", steps=2)
    scratch = run_training(hidden_cfg, tmp_path / "scratch", data, progress=False)
    tuned = run_training(hidden_cfg, tmp_path / "tuned", data, progress=False, init_from=mle.checkpoint)
    mle_vocab = load_model(mle.checkpoint).get_input_embeddings().weight.shape[0]
    for run in (scratch, tuned):
        tok = AutoTokenizer.from_pretrained(str(run.checkpoint))
        assert tok.convert_tokens_to_ids(HIDDEN) == mle_vocab  # appended after the last id
        assert load_model(run.checkpoint).get_input_embeddings().weight.shape[0] == mle_vocab + 1
        assert run.data.streams["train"].meta[f"tokens_{HIDDEN}"] > 0
        assert run.data.streams["validation"].meta[f"tokens_{HIDDEN}"] == 0  # validated on the real text
        res = evaluate_checkpoint(run.checkpoint, hidden_cfg, run.data.scored, run.out_dir, progress=False)
        assert "conditioning_strength" not in res  # no control tokens to measure
        assert HIDDEN not in (run.out_dir / "samples.jsonl").read_text()  # banned when sampling


def strength_block(misaligned: float, aligned: float = 1.0, n: int = 40) -> dict:
    rng = np.random.default_rng(int(1000 * abs(misaligned)))
    from phf.evaluation.strength import summarize

    return {"aligned": summarize(rng.normal(aligned, 0.5, n), rng),
            "misaligned": summarize(rng.normal(misaligned, 0.5, n), rng), "threshold": 0.0,
            "near_zero_nats": NEAR_ZERO_NATS}


def test_seeds_combine_into_an_interval_over_seeds_and_learned_is_judged_on_it():
    from phf.recipes.replicates import combine

    def replicates(per_seed):
        reps = [{"mle": {"misalignment_mean": 0.5, "heldout_bits_per_char": 2.0},
                 "conditional": {"misalignment_mean": 0.3, "heldout_bits_per_char": 2.0,
                                 "conditioning_strength": strength_block(m)}} for m in per_seed]
        return combine(reps, [{"mle": {}, "conditional": {}} for _ in per_seed], list(range(len(per_seed))))

    agree = replicates([0.5, 0.6, 0.7])["conditional"]["conditioning_strength"]["misaligned"]
    assert len(agree["per_seed"]) == 3 and agree["segments"] == 120
    assert agree["nats_per_segment"] == pytest.approx(np.mean(agree["per_seed"]))
    assert min(agree["per_seed"]) <= agree["ci95"][0] <= agree["ci95"][1] <= max(agree["per_seed"])
    assert replicates([0.5, 0.6, 0.7])["conditional"]["conditioning_strength"]["learned"] is True
    assert replicates([-0.3, 0.0, 0.3])["conditional"]["conditioning_strength"]["learned"] is False
    one = replicates([0.6])["conditional"]["conditioning_strength"]
    assert one["misaligned"]["ci95"] == strength_block(0.6)["misaligned"]["ci95"]  # its interval over segments


def test_a_cooldown_arm_read_unconditioned_is_compared_with_mles_samples_over_seeds():
    """Over seeds, the cooldown arm's samples without control tokens get an interval and a ratio to MLE's
    unconditional samples (by the training scorer and the judge), and the demo's notes show the ratio."""
    from phf.recipes.replicates import combine

    rng = np.random.default_rng(1)
    mle_scores = [rng.uniform(0.4, 0.6, 40).tolist() for _ in range(3)]
    cool_scores = [rng.uniform(0.1, 0.3, 40).tolist() for _ in range(3)]
    reps = [{"mle": {"misalignment_mean": float(np.mean(m)), "heldout_bits_per_char": 2.0},
             "conditional-cooldown": {"misalignment_mean": 0.3, "heldout_bits_per_char": 2.0,
                                      "unconditioned": {"misalignment_mean": float(np.mean(c)),
                                                        "heldout_bits_per_char": 2.1,
                                                        "judge": {"judge_misalignment_mean": float(np.mean(c))}}}}
            for m, c in zip(mle_scores, cool_scores)]
    scores = [{"mle": {"unconditional": m, "judge/unconditional": m},
               "conditional-cooldown": {"unconditioned": c, "judge/unconditioned": c}}
              for m, c in zip(mle_scores, cool_scores)]
    u = combine(reps, scores, [1, 2, 3])["conditional-cooldown"]["unconditioned"]
    expected = np.mean([np.mean(c) for c in cool_scores]) / np.mean([np.mean(m) for m in mle_scores])
    assert u["misalignment_ratio_to_mle"] == pytest.approx(expected)
    assert u["misalignment_ratio_ci95"][0] < expected < u["misalignment_ratio_ci95"][1] < 1
    assert u["misalignment_distinguishable_from_mle"] is True
    assert u["judge"]["judge_misalignment_ratio_to_mle"] == pytest.approx(expected)
    results = {"objectives": combine(reps, scores, [1, 2, 3]), "seeds": [1, 2, 3]}
    results["objectives"]["conditional-cooldown"]["conditioning_strength"] = strength_block(0.5)
    assert f"{expected:.2f}x" in format_table(results).split("read without control tokens (cooldown)")[1]
