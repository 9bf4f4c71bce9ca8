"""The RL finetuning baseline: a few GRPO steps on a tiny model move its parameters and log reward, KL, length."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from phf.core.io import read_jsonl

pytest.importorskip("trl", reason="the RL baseline needs the `rl` extra")


@pytest.fixture(scope="module")
def tiny_mle(tiny_cfg_factory, data_dir, tmp_path_factory):
    from phf.training.trainer import prepare_data, run_training

    cfg = tiny_cfg_factory("mle", ["train.max_steps=2"])
    result = run_training(cfg, tmp_path_factory.mktemp("rl") / "mle", data_dir, progress=False)
    return cfg, prepare_data(cfg, data_dir, progress=False).scored, result.checkpoint


def test_rl_arm_changes_parameters_and_logs_reward_kl_length(tiny_mle, tmp_path):
    from phf.analysis.rl import RLConfig, rl_finetune
    from phf.evaluation.evaluate import evaluate_checkpoint

    cfg, scored, base = tiny_mle
    rl = RLConfig(beta=0.1, lr=1e-2, num_generations=4, batch_size=8, max_completion_tokens=16, num_prompts=8)
    summary = rl_finetune(base, cfg, scored, tmp_path / "rl", max_tokens=600, progress=False, rl=rl)
    before, after = load_file(str(base / "model.safetensors")), load_file(f"{summary['checkpoint']}/model.safetensors")
    assert set(before) == set(after)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), f"unchanged: {sorted(set(before) - set(moved))}"
    rows = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert rows and summary["tokens"] >= 600 and len(rows) >= 2 and rows[-1]["tokens"] == summary["tokens"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert r["reward"] <= 0 and math.isfinite(r["reward"])  # -misalignment
        assert math.isfinite(r["kl"]) and r["kl"] >= 0
        assert 0 < r["completion_mean_length"] <= 16
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step samples from the start model itself
    assert any(r["kl"] > 0 for r in rows[1:])
    # the checkpoint is a phf checkpoint: phf's evaluation loads and evaluates it
    res = evaluate_checkpoint(summary["checkpoint"], cfg, scored, tmp_path / "eval", progress=False)
    assert res["objective"] == "rl" and math.isfinite(res["heldout_bits_per_char"])


def test_reward_is_minus_misalignment_of_complete_lines(tiny_mle):
    from phf.analysis.rl import reward_function
    from phf.data.scorers import get_scorer

    scorer = get_scorer("pep8")
    reward = reward_function(scorer, "<|endoftext|>")
    clean, bad = "x = 1\n", "x=1\n"
    r = reward(["<|endoftext|>"] * 4, [clean, bad, bad + "y=2", ""], _finished=[True, True, False, True])
    assert r[0] == 0.0 and r[3] == 0.0  # a clean line and an empty completion are both "perfect": the hack to watch
    assert r[1] < 0
    # an unfinished completion is judged on its complete lines only: the cut `y=2` does not count
    assert r[2] == pytest.approx(r[1])




def test_the_bases_are_compared_on_smoothed_curves_and_the_goodhart_gap():
    from phf.analysis.rl import base_study, compare_bases, rl_study_table

    def rows(levels):
        return [{"step": i + 1, "tokens": 100 * (i + 1), "misalignment": v, "kl": 0.01 * i}
                for i, v in enumerate(levels)]

    def entry(scorer, judge):
        return {"misalignment_mean": scorer, "judge": {"judge_misalignment_mean": judge},
                "unconditional": {"mean_chars": 500, "empty_share": 0.0}, "heldout_bits_per_char": 2.3,
                "distinct_2": 0.6, "parse_rate": 0.1, "kl_from_reference_bits": 0.1}

    # MLE's RL ends at a smoothed 0.05; the conditional base starts lower and gets there sooner, and its judge
    # sees the improvement the reward saw, while MLE's judge sees half of it
    mle = base_study(entry(0.04, 0.02), entry(0.02, 0.015), rows([0.08] * 8 + [0.05] * 8))
    cond = base_study(entry(0.02, 0.01), entry(0.01, 0.005), rows([0.06] * 4 + [0.03] * 12))
    assert mle["scorer_change"] == pytest.approx(0.5) and mle["judge_change"] == pytest.approx(0.75)
    assert mle["goodhart_gap"] == pytest.approx(1.5) and cond["goodhart_gap"] == pytest.approx(1.0)
    study = compare_bases({"mle": mle, "conditional": cond})
    assert study["level"] == pytest.approx(0.05)
    # a trailing mean of up to 8 steps: MLE's reaches 0.05 at its last step; the conditional's at step 7, where
    # (4 x 0.06 + 3 x 0.03) / 7 = 0.047
    assert mle["tokens_to_reference_level"] == 1600
    assert cond["tokens_to_reference_level"] == 700
    assert "after 700 RL tokens, against 1,600" in study["answer"] and "conditional 1.00, mle 1.50" in study["answer"]
    table = rl_study_table(study)
    assert table[1][0] == "mle" and table[2][3] == "1.00"


def test_the_change_intervals_resample_samples_with_both_their_scores():
    from phf.analysis.rl import change_intervals

    rng = np.random.default_rng(1)
    before = rng.exponential(0.04, 300)
    after = rng.exponential(0.02, 300)
    # the judge sees the same samples, scaled: it agrees exactly with the scorer, so the gap is 1 in every draw
    ci = change_intervals(list(before), list(2 * before), list(after), list(2 * after), np.random.default_rng(0))
    assert ci["goodhart_gap_ci95"] == pytest.approx([1.0, 1.0])
    assert ci["scorer_change_ci95"][0] < 0.5 < ci["scorer_change_ci95"][1] < 1.0
    # a judge that sees no change: the gap's interval sits above 1
    judged_after = rng.permutation(before)
    ci = change_intervals(list(before), list(before), list(after), list(judged_after), np.random.default_rng(0))
    assert ci["goodhart_gap_ci95"][0] > 1.3
