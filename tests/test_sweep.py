"""`phf sweep` on a tiny budget: all six objectives, finetune arms branching from the MLE run, KL from the MLE
model, the demo's schema, and reuse of finished arms."""
from __future__ import annotations

import math

import pytest

from phf.core.errors import PhfError
from phf.core.io import read_json, read_jsonl
from phf.core.run_folder import FORMAT_VERSION
from phf.recipes.configs import SweepConfig
from phf.recipes.sweep import SWEEP_OBJECTIVES, plan, run_sweep
from tests.conftest import tiny_overrides

EXTRA = ["train.eval_every=2", "train.eval_samples=2", "eval.kl_samples=6", "eval.kl_max_new_tokens=16",
         "sample.num_samples=4", "sample.num_prompts=2"]


@pytest.fixture(scope="module")
def sweep(pycorpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    overrides = tiny_overrides(str(pycorpus)) + EXTRA
    results = run_sweep(SweepConfig("pep8", out, overrides, finetune=["conditional", "awr"], report=False),
                        progress=False)
    return out, overrides, results


def test_sweep_has_every_arm_in_the_demo_schema(sweep):
    out, _, results = sweep
    assert list(results["objectives"]) == SWEEP_OBJECTIVES + ["finetune:conditional", "finetune:awr"]
    written = read_json(out / "results.json")
    assert written.pop("format_version") == FORMAT_VERSION and written.keys() == results.keys()
    assert written["objectives"].keys() == results["objectives"].keys()
    for name, r in results["objectives"].items():
        for key in ("misalignment_mean", "score_max_at_25", "heldout_bits_per_char", "kl_from_reference_bits",
                    "distinct_2", "kind", "run_dir", "tokens_seen_total"):
            assert key in r, (name, key)
        assert (out / r["run_dir"] / "checkpoint" / "model.safetensors").exists()
    mle = results["objectives"]["mle"]
    assert mle["kl_from_reference_bits"] == pytest.approx(0.0, abs=1e-9)  # the reference itself
    # a Monte Carlo estimate from 6 samples may fall below 0; it is finite and not 0 for a different model
    assert all(math.isfinite(r["kl_from_reference_bits"]) and r["kl_from_reference_bits"] != 0
               for n, r in results["objectives"].items() if n != "mle")
    assert len(read_jsonl(out / "reference_samples.jsonl")) == 6


def test_finetune_arms_branch_from_the_mle_run_at_equal_total_tokens(sweep):
    out, _, results = sweep
    arms = results["objectives"]
    branch = results["finetune_from_tokens"]
    assert branch == arms["mle"]["train_tokens"] // 2
    for name in ("finetune:conditional", "finetune:awr"):
        assert arms[name]["kind"] == "finetune"
        assert arms[name]["tokens_seen_total"] == arms["mle"]["tokens_seen_total"] == arms["conditional"]["train_tokens"]
        run = read_json(out / arms[name]["run_dir"] / "run.json")
        assert run["init_from"].endswith("mle/snapshots/step-2") and run["tokens_before"] == branch
        rows = [m for m in read_jsonl(out / arms[name]["run_dir"] / "metrics.jsonl") if "loss" in m]
        assert rows[0]["total_tokens"] > branch
    # AWR's value head is saved with the finetuned model
    assert (out / "finetune-awr" / "checkpoint" / "value_head.safetensors").exists()
    # misalignment against tokens seen during training
    evals = [m for m in read_jsonl(out / "conditional" / "metrics.jsonl") if "eval_misalignment_mean" in m]
    assert [m["step"] for m in evals] == [2, 4] and all(not math.isnan(m["eval_misalignment_mean"]) for m in evals)


def test_a_second_sweep_reuses_finished_arms(sweep):
    out, overrides, results = sweep
    mtime = (out / "awr" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    again = run_sweep(SweepConfig("pep8", out, overrides, finetune=["conditional", "awr"], report=False),
                      progress=False)
    assert (out / "awr" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again["objectives"]["awr"]["misalignment_mean"] == results["objectives"]["awr"]["misalignment_mean"]


def test_sweep_plan_errors():
    with pytest.raises(PhfError, match="mle arm"):
        plan(SweepConfig(objectives=["conditional"]))
    with pytest.raises(PhfError, match="finetune-fraction"):
        plan(SweepConfig(finetune_fraction=1.0))
    with pytest.raises(PhfError, match="has no config 'dpo'; name an objective"):
        plan(SweepConfig(objectives=["mle", "dpo"]))


def test_sweep_cli_prints_the_table_and_writes_the_report(pycorpus, tmp_path, capsys):
    from phf.cli.main import main

    args = ["-q", "sweep", "--out", str(tmp_path / "sw"), "--objectives", "mle,conditional", "--finetune",
            "conditional", "--rl", "--rl-tokens", "300"]
    rl = ["rl.num_generations=4", "rl.batch_size=8", "rl.max_completion_tokens=16", "rl.num_prompts=8"]
    for o in tiny_overrides(str(pycorpus)) + EXTRA + rl:
        args += ["--set", o]
    main(args)
    out = capsys.readouterr().out
    assert "KL from MLE bits/char" in out and "finetune:conditional" in out and "distinct-2" in out
    res = read_json(tmp_path / "sw" / "results.json")["objectives"]
    assert list(res) == ["mle", "conditional", "finetune:conditional", "rl", "rl:conditional"]
    # the RL arms start from the MLE weights the finetune arms start from, and from the conditional arm's at the
    # same step, on the same budget, and are measured the same way
    for name, base in (("rl", "mle"), ("rl:conditional", "conditional")):
        assert res[name]["kind"] == "rl" and res[name]["train_tokens"] >= 300 and res[name]["rl_base"] == base
        assert math.isfinite(res[name]["kl_from_reference_bits"]) and "distinct_2" in res[name]
        meta = read_json(tmp_path / "sw" / name.replace(":", "-") / "checkpoint" / "phf.json")
        assert meta["init_from"].endswith(f"{base}/snapshots/step-2")
    # RL keeps the conditional model's deployment: it is still sampled after <|aligned|>
    assert meta["objective"]["sampling_prefix"] == ["<|aligned|>"]
    study = read_json(tmp_path / "sw" / "results.json")["rl_from_bases"]
    assert set(study["bases"]) == {"mle", "conditional"} and study["reference_base"] == "mle"
    for s in study["bases"].values():
        assert s["before"]["misalignment_mean"] is not None and s["after"]["kl_from_reference_bits"] is not None
        assert len(s["curve"]) >= 2 and s["curve"][-1]["tokens"] >= 300
    assert "PHF, then RL" in out and study["answer"].startswith("the conditional base")
    page = (tmp_path / "sw" / "report.html").read_text()
    assert "finetune:conditional" in page and "<table" in page and "PHF, then RL" in page
    assert (tmp_path / "sw" / "figures" / "rl_from_bases.png").exists()


def test_evaluate_with_a_reference_adds_kl(sweep, capsys, tmp_path):
    from phf.cli.main import main

    out, overrides, results = sweep
    args = ["-q", "evaluate", "--model", str(out / "conditional"), "--reference", str(out / "mle"),
            "--data-dir", str(out / "data"), "--out", str(tmp_path / "ev")]
    for o in overrides:
        args += ["--set", o]
    main(args)
    res = read_json(tmp_path / "ev" / "results.json")
    assert res["kl_samples"] == 6 and math.isfinite(res["kl_from_reference_bits"])
    # the same reference samples (same seed) give the sweep's estimate
    assert res["kl_from_reference_bits"] == pytest.approx(results["objectives"]["conditional"]["kl_from_reference_bits"])


def test_a_sweep_with_seeds_runs_once_per_seed_on_one_data_folder_and_reports_intervals(pycorpus, tmp_path):
    out = tmp_path / "sweep"
    overrides = tiny_overrides(str(pycorpus)) + EXTRA + ["train.seed=3"]
    results = run_sweep(SweepConfig("pep8", out, overrides, objectives=["mle", "conditional"],
                                    finetune=["conditional"], seeds=2), progress=False)
    assert results["seeds"] == [3, 4] and len(list((out / "data" / "scored").iterdir())) == 1
    for seed in (3, 4):
        assert (out / f"seed-{seed}" / "finetune-conditional" / "checkpoint" / "model.safetensors").exists()
    arm = results["objectives"]["finetune:conditional"]
    assert arm["run_dir"] == "seed-3/finetune-conditional" and arm["seeds"] == [3, 4]
    assert len(arm["per_seed"]["misalignment_mean"]) == 2 and len(arm["kl_from_reference_bits_ci95"]) == 2
    assert "misalignment_ratio_ci95" in arm and "heldout_ratio_ci95" in arm
    page = (out / "report.html").read_text()
    assert "Bars: 95% bootstrap intervals over 2 seeds" in page


def test_sweep_tamper_measures_every_arm_and_reports_it(sweep):
    """A grid of attacks (two learning rates, as `--tamper-set lr=1e-2,3e-2` gives them) on every arm."""
    out, overrides, _ = sweep
    results = run_sweep(SweepConfig("pep8", out, overrides, finetune=["conditional", "awr"],
                                    tamper={"steps": [0, 4], "num_samples": 8, "heldout_chars": 2000,
                                            "lr": "1e-2,3e-2"}),
                        progress=False)
    tamper = results["tamper"]
    attacks = ("full lr=0.01", "full lr=0.03")
    # the arms were reused; every one was tampered with, under each attack
    assert set(tamper["arms"]) == {f"{arm} {a}" for arm in results["objectives"] for a in attacks}
    for a in attacks:  # MLE is at its own level from the start
        assert tamper["arms"][f"mle {a}"]["to_reference_level"]["tokens"] == 0
    curves = read_json(out / "tamper" / "results.json")["models"]
    assert len(curves) == 2 * len(results["objectives"])
    assert all([p["step"] for p in c["points"]] == [0, 4] for c in curves.values())
    page = (out / "report.html").read_text()
    assert "Tamper resistance" in page and (out / "figures" / "tamper.png").exists()


def test_rl_bases_must_be_pretraining_arms_of_the_sweep():
    from phf.recipes.sweep import rl_bases_of

    _, arms, _, _ = plan(SweepConfig(objectives=["mle", "conditional"], finetune=["filtering"]))
    assert rl_bases_of(arms, None) == ["mle", "conditional"]
    assert rl_bases_of(arms, ["conditional"]) == ["mle", "conditional"]  # mle is always the reference
    with pytest.raises(PhfError, match="not a pretraining arm of this sweep"):
        rl_bases_of(arms, ["filtering"])  # only a finetune arm here


def test_rl_studies_over_seeds_are_combined_and_labelled_by_their_training_seeds():
    """Each seed's answer is labelled by the seed it trained with, and each figure is the mean of the seeds'."""
    from phf.analysis.rl import combine_studies, format_rl_study

    def study(seed: int, before: float, after: float) -> dict:
        figures = {"misalignment_mean": before, "judge_misalignment_mean": before / 2, "heldout_bits_per_char": 2.0,
                   "mean_chars": 100.0, "empty_share": 0.0, "distinct_2": 0.5}
        base = {"curve": [{"tokens": 10, "misalignment": before, "misalignment_smoothed": before, "kl": 0.0}],
                "before": figures, "after": dict(figures, misalignment_mean=after, kl_from_reference_bits=0.1),
                "scorer_change": after / before, "judge_change": 1.0, "goodhart_gap": before / after,
                "tokens_to_reference_level": 100 * seed}
        return {"reference_base": "mle", "level": after, "bases": {"mle": base}, "answer": f"answer of {seed}"}

    combined = combine_studies([study(3, 0.4, 0.2), study(4, 0.2, 0.1)], [3, 4])
    mle = combined["bases"]["mle"]
    assert combined["seeds"] == [3, 4] and mle["seeds"] == 2
    assert mle["before"]["misalignment_mean"] == pytest.approx(0.3) and mle["tokens_to_reference_level"] == 350
    text = format_rl_study(combined)
    assert "answer (seed 3): answer of 3" in text and "answer (seed 4): answer of 4" in text
