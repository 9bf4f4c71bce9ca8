"""A task of your own from a config alone: a corpus, a `module:callable` scorer, a threshold, an aggregate and a
prompts file give the same table as the shipped tasks, with a prompted column."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phf.core.config import load_config
from phf.core.errors import PhfError
from phf.recipes.configs import DemoConfig
from phf.recipes.demo import arm_configs, format_table, run_demo
from phf.tasks import get_task, task_for
from phf.tasks.base import read_prompts

ROOT = Path(__file__).resolve().parent.parent
PROSE = Path(__file__).parent / "data" / "prose"


def exclamations(texts):
    """A user's scorer (importable as tests.test_user_task:exclamations): exclamation marks per character."""
    return [t.count("!") / max(len(t), 1) for t in texts]


def user_task_config(tmp_path: Path, prompts: bool = True) -> Path:
    corpus = tmp_path / "notes"
    corpus.mkdir()
    lines = [x for x in (PROSE / "changelog.Debian.txt").read_text().splitlines() if x.strip()]
    for i in range(24):  # small notes, some of them shouting
        start = (i * 3) % (len(lines) - 6)
        text = "\n".join(lines[start:start + 6]) + "\n"
        if i % 3 == 0:
            text = text.replace(".", "!")
        (corpus / f"note{i:02d}.txt").write_text(text)
    (corpus / "skipped.py").write_text("print('not a note')\n")
    data = {
        "task": "shouting",
        "corpus": {"source": str(corpus), "extensions": [".txt"], "validation_fraction": 0.2, "test_fraction": 0.25},
        "scoring": {"scorer": "tests.test_user_task:exclamations", "segmenter": "sentences", "aggregate": "max",
                    "misaligned_above": 0.001, "workers": 1, "shard_documents": 8},
        "objective": {"name": "conditional", "drop_token_fraction": 0.0},
        "tokenizer": {"vocab_size": 400},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_fraction": 0, "eval_tokens": 256,
                  "threads": 1, "log_every": 1, "dtype": "fp32"},
        "sample": {"num_samples": 4, "num_prompts": 3, "max_new_tokens": 16, "batch_size": 4},
        "eval": {"heldout_chars": 2000},
    }
    if prompts:
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                        ["Fixed the", "Thanks to", "Please stop", "Never"]))
        data["sample"]["prompts"] = str(tmp_path / "prompts.jsonl")
    path = tmp_path / "my_task.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_task_of_your_own_gives_the_demo_table_with_a_prompted_column(tmp_path):
    config = user_task_config(tmp_path)
    results = run_demo(DemoConfig(out=tmp_path / "demo", config=config), progress=False)
    assert results["task"] == "shouting"
    assert set(results["objectives"]) == {"mle", "filtering", "conditional"}
    for name, r in results["objectives"].items():
        assert r["unconditional"]["num_samples"] == 4
        assert r["prompted"]["num_samples"] == 3  # the first three prompts of the file
        assert r["misaligned_above"] == 0.001 and "parse_rate" not in r
        samples = [json.loads(x) for x in (tmp_path / "demo" / name / "samples.jsonl").read_text().splitlines()]
        assert [s["prompt"] for s in samples if s["scenario"] == "prompted"] == ["Fixed the", "Thanks to",
                                                                                "Please stop"]
    conditional = results["objectives"]["conditional"]["objective_settings"]
    assert conditional["threshold"] == 0.001  # your threshold labels the segments
    # only .txt files were read; the .py file beside them is counted as left out
    assert results["corpus"]["skipped"] == {"extension not in corpus.extensions": 1}
    table = format_table(results)
    assert "prompted mean" in table and "\nconditional " in table
    prompted_column = [line.split("|")[6].strip() for line in table.splitlines()[2:5]]
    assert all(v != "-" for v in prompted_column)


def test_a_task_of_your_own_without_prompts_has_no_prompted_scenario(tmp_path):
    cfg = load_config(user_task_config(tmp_path, prompts=False))
    task = task_for(cfg)
    assert task.name == "shouting" and task.segmenter == "sentences" and task.misaligned_above == 0.001
    assert task.score_scale == "linear"  # a max-aggregated score is read on a linear scale
    assert task.eval_prompts(None, 5) == []


def test_your_config_applies_its_objective_section_to_its_own_objective_only(tmp_path):
    task, configs = arm_configs(config=user_task_config(tmp_path))
    assert [c.objective.name for c in configs.values()] == ["mle", "filtering", "conditional"]
    assert configs["conditional"].objective.drop_token_fraction == 0.0
    assert configs["filtering"].objective.drop_token_fraction is None  # the task's default
    assert task.name == "shouting"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json\n", "is not JSON"),
    ('{"text": "no prompt field"}\n', "has no string `prompt` field"),
    ("\n", "holds no prompt"),
])
def test_a_bad_prompts_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PhfError, match=message):
        read_prompts(path, 3)


def test_a_task_of_your_own_has_no_shipped_configs():
    with pytest.raises(PhfError, match="ships no configs; give your own with --config"):
        get_task("shouting").run_config("mle")


def test_config_show_prints_every_field_with_its_documentation_and_reads_back(tmp_path):
    out = subprocess.run([sys.executable, "-m", "phf", "config", "show", "--task", "toxicity", "--objective",
                          "conditional", "--set", "train.lr=0.001"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert "# The task: a shipped one" in out and "task: toxicity" in out
    assert "  # Sampling temperature" in out and "  guidance: 1.0" in out and "  lr: 0.001" in out
    (tmp_path / "shown.yaml").write_text(out)
    again = load_config(tmp_path / "shown.yaml")
    assert again == load_config(get_task("toxicity").config_path("conditional"), ["train.lr=0.001"])
