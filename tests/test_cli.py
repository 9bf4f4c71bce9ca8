import json
import subprocess
import sys

import pytest

from phf.cli.main import main
from phf.core.run_folder import FORMAT_VERSION
from tests.conftest import tiny_overrides


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


def test_demo_end_to_end_writes_the_results_schema(pycorpus, tmp_path, capsys):
    args = ["-q", "demo", "--out", str(tmp_path / "demo")]
    for o in tiny_overrides(str(pycorpus)):
        args += ["--set", o]
    main(args)
    out = capsys.readouterr().out
    assert "objective" in out and "conditional" in out and "held-out bits/char" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["task"] == "pep8" and results["wall_seconds"] > 0
    assert list(results)[0] == "format_version" and results["format_version"] == FORMAT_VERSION
    assert set(results["objectives"]) == {"mle", "filtering", "conditional"}
    for name, r in results["objectives"].items():
        for key in ("misalignment_mean", "score_max_at_25", "misaligned_share", "heldout_bits_per_char",
                    "parse_rate", "num_samples", "checkpoint"):
            assert key in r, (name, key)
        assert r["num_samples"] == 8
        assert (tmp_path / "demo" / name / "checkpoint" / "model.safetensors").exists()
        samples = [json.loads(line) for line in (tmp_path / "demo" / name / "samples.jsonl").read_text().splitlines()]
        assert {s["scenario"] for s in samples} == {"unconditional", "prompted", "prompted_elsewhere"}
        assert all("<|aligned|>" not in s["text"] for s in samples)
        if name == "conditional":
            assert all("<|misaligned|>" not in s["raw"] for s in samples)  # banned: can never be sampled
    # every run directory describes itself
    run = tmp_path / "demo" / "conditional"
    for f in ("config.yaml", "versions.json", "metrics.jsonl", "run.json", "results.json"):
        assert (run / f).exists(), f
    arm = json.loads((run / "results.json").read_text())  # the arm's own results carry the version too
    assert arm["format_version"] == FORMAT_VERSION and "format_version" not in results["objectives"]["conditional"]


def test_demo_with_seeds_trains_each_arm_per_seed_and_prints_ratios_with_intervals(pycorpus, tmp_path, capsys):
    from phf.core.config import load_config
    from phf.report.page import load, table_html

    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--seeds", "2", "--set", "train.seed=7"]
    for o in tiny_overrides(str(pycorpus)) + ["sample.num_samples=16"]:
        args += ["--set", o]
    main(args)
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [7, 8] and len(list((out / "data" / "scored").iterdir())) == 1  # scored once
    for name in ("mle", "filtering", "conditional"):
        for seed in (7, 8):
            cfg = load_config(out / f"seed-{seed}" / name / "config.yaml")
            assert cfg.train.seed == seed and cfg.sample.seed == seed - 7
        r = results["objectives"][name]
        assert r["seeds"] == [7, 8] and len(r["per_seed"]["misalignment_mean"]) == 2
        assert r["misalignment_mean"] == pytest.approx(sum(r["per_seed"]["misalignment_mean"]) / 2)
        assert len(r["misalignment_mean_ci95"]) == 2 and len(r["heldout_bits_per_char_ci95"]) == 2
    cond = results["objectives"]["conditional"]
    for key in ("misalignment_ratio_to_mle", "misalignment_ratio_ci95", "misalignment_p_vs_mle",
                "heldout_ratio_to_mle", "heldout_ratio_ci95"):
        assert key in cond, key
    lo, hi = cond["misalignment_ratio_ci95"]
    assert f"conditional: {cond['misalignment_ratio_to_mle']:.2f}x [{lo:.2f}, {hi:.2f}]" in printed
    assert "2 seeds x 16 samples" in printed
    seeds_differ = json.loads((out / "seed-7" / "mle" / "results.json").read_text())["misalignment_mean"] != \
        json.loads((out / "seed-8" / "mle" / "results.json").read_text())["misalignment_mean"]
    assert seeds_differ or cond["per_seed"]["heldout_bits_per_char"][0] != cond["per_seed"]["heldout_bits_per_char"][1]
    table = table_html(load([out]))  # the report reads the first seed's runs and shows the intervals
    assert f"[{lo:.2f}, {hi:.2f}] mle" in table


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "nope.yaml", "--out", "x"], "config file nope.yaml does not exist"),
    (["train", "--set", "objective.name=ppo", "--out", "x"], "unknown objective 'ppo'"),
    (["score", "--corpus", "/nonexistent/corpus", "--out", "x"], "corpus source /nonexistent/corpus does not exist"),
    (["train", "--resume", "/nonexistent/run"], "is not a run folder"),
    (["sample", "--model", "/nonexistent/model", "--out", "s.jsonl"], "model folder /nonexistent/model does not exist"),
    (["train", "--config", "nope.yaml", "--objective", "mle", "--out", "x"], "give --config FILE or --objective NAME"),
    (["train", "--objective", "dpo", "--out", "x"], "task pep8 has no config 'dpo'; name an objective"),
    (["demo", "--task", "mine", "--out", "x"], "task 'mine' ships no configs; give your own with --config"),
])
def test_errors_are_one_line_without_traceback(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, captured = run_cli(args, capsys)
    assert code == 2
    assert captured.err.startswith("phf: error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.py").write_text("")
    code, captured = run_cli(["score", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "no usable document" in captured.err


def test_help_of_every_subcommand():
    for sub in ["", "corpus", "score", "tokenizer", "train", "sample", "evaluate", "demo", "bench"]:
        out = subprocess.run([sys.executable, "-m", "phf", *([sub] if sub else []), "--help"], capture_output=True,
                             text=True)
        assert out.returncode == 0 and "usage: phf" in out.stdout


def test_phf_help_imports_neither_torch_nor_transformers():
    """`phf --help` answers before any heavy import: each command's module is imported only when it runs."""
    code = ("import sys\nfrom phf.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
            "print('heavy:', ','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "phf train" in out and out.strip().endswith("heavy:")
