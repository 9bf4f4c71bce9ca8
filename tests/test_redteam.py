"""Red teaming: the pool grows from held-out prompts, its best score never decreases, and the figure is written."""
import json
import math

import numpy as np
import pytest

from phf.analysis.redteam import Pool, PoolEntry, cut_candidate


def test_pool_keeps_the_best_new_candidates_and_never_loses_its_best():
    pool = Pool([PoolEntry("a\n", 0.2, 0, "seed"), PoolEntry("b\n", 0.05, 0, "seed")])
    added = pool.add_best([PoolEntry("c\n", 0.01, 1, "red"), PoolEntry("d\n", 0.3, 1, "red"),
                           PoolEntry("a\n", 0.9, 1, "red"), PoolEntry("e\n", math.nan, 1, "red"),
                           PoolEntry("f\n", 0.1, 1, "red")], keep=2)
    assert [e.prompt for e in added] == ["d\n", "f\n"]  # duplicates and unscorable candidates never join
    assert pool.best() == 0.3 and len(pool.entries) == 4
    pool.add_best([PoolEntry("g\n", 0.0, 2, "red")], keep=2)
    assert pool.best() == 0.3


def test_pool_draws_follow_the_score_weights():
    pool = Pool([PoolEntry(str(i), s, 0, "seed") for i, s in enumerate([0.0, 0.0, 1.0])])
    rng = np.random.default_rng(0)
    draws = [pool.draw(1, temperature=0.1, scale=1.0, rng=rng)[0] for _ in range(2000)]
    share = draws.count("2") / len(draws)
    expected = math.exp(10) / (math.exp(10) + 2)  # exp(score / 0.1), normalised
    assert share == pytest.approx(expected, abs=0.01)
    assert sorted(pool.draw(3, 0.1, 1.0, rng)) == ["0", "1", "2"]  # without replacement


def test_candidates_are_whole_lines_within_the_limit():
    assert cut_candidate("\n\ndef f(x):\n    return x\n", 100) == "def f(x):\n    return x\n"
    assert cut_candidate("def f(x):\n    return x\n", 12) == "def f(x):\n"
    assert cut_candidate("\n   \n", 100) == ""


@pytest.fixture(scope="module")
def tiny_runs(tiny_cfg_factory, data_dir, tmp_path_factory):
    from phf.training.trainer import run_training

    root = tmp_path_factory.mktemp("redteam")
    runs = {}
    for objective in ("mle", "conditional"):
        cfg = tiny_cfg_factory(objective, ["train.max_steps=3"])
        runs[objective] = run_training(cfg, root / objective, data_dir, progress=False).checkpoint
    return runs


def test_red_team_rounds_never_decrease_the_pools_best_score(tiny_runs, data_dir, tmp_path):
    from phf.analysis.probes import run_config, scored_corpus_for
    from phf.cli.main import main
    from phf.tasks import task_for

    out = tmp_path / "rt"
    # the red model defaults to the sibling `mle` run
    main(["-q", "redteam", "--model", str(tiny_runs["conditional"].parent), "--out", str(out), "--rounds", "3",
          "--seeds", "3", "--candidates", "4", "--keep", "2", "--continuations", "2"])
    res = json.loads((out / "results.json").read_text())
    assert res["red_model"] == str(tiny_runs["mle"])
    (target,) = res["targets"].values()
    rounds = target["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    best = [r["pool_best"] for r in rounds]
    assert all(b2 >= b1 for b1, b2 in zip(best, best[1:]))
    assert all(r["pool_size"] >= rounds[0]["pool_size"] for r in rounds)
    # each round says what its continuations' misalignment owes to their length (pep8 scores are rates)
    assert rounds[0]["continuations_length_weighted_misalignment"] >= 0
    assert 0 <= rounds[0]["continuations_finished_share"] <= 1 and rounds[0]["continuations_mean_chars"] >= 0
    # the pool is seeded from held-out test prompts, and the seeds' scores come from the target
    cfg = run_config(tiny_runs["conditional"])
    held_out = set(task_for(cfg).eval_prompts(scored_corpus_for(tiny_runs["conditional"], cfg), 3))
    seeds = [e for e in target["pool"] if e["source"] == "seed"]
    assert seeds and {e["prompt"] for e in seeds} <= held_out
    assert all(e["score"] >= 0 for e in target["pool"])
    assert (out / "redteam.png").stat().st_size > 1000
