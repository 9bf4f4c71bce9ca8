"""`phf scaling`: a grid of token budgets x model sizes, each point MLE and an objective over seeds, the ratio with
its interval, the slope of log(ratio) on log(tokens) with its interval; finished points are reused."""
import json

import numpy as np
import pytest

from phf.core.errors import PhfError
from phf.recipes.scaling import parse_size, slope
from tests.conftest import tiny_overrides


def test_a_grid_gives_ratios_a_slope_and_a_figure_and_is_reused(pycorpus, tmp_path, capsys):
    from phf.cli.main import main

    args = ["-q", "scaling", "--task", "pep8", "--tokens", "512,1024", "--sizes", "1x32", "--seeds", "2",
            "--out", str(tmp_path / "sc")]
    for o in tiny_overrides(str(pycorpus)) + ["train.max_steps=0", "sample.num_prompts=0"]:
        args += ["--set", o]
    main(args)
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "sc" / "results.json").read_text())
    assert [(p["size"], p["tokens"]) for p in res["points"]] == [("1x32", 512), ("1x32", 1024)]
    for p in res["points"]:
        run = json.loads((tmp_path / "sc" / f"1x32-{p['tokens']}" / "results.json").read_text())
        assert run["seeds"] == [42, 43] and run["objectives"]["mle"]["train_tokens"] == p["tokens"]
        assert run["objectives"]["conditional"]["misalignment_ratio_to_mle"] == p["ratio"]
        assert len(p["scores"]["mle"]) == 2 and all(len(s) == 8 for s in p["scores"]["conditional"])
    s = res["slopes"]["1x32"]
    assert s["points"] == 2 and s["slope_ci95"][0] <= s["slope"] <= s["slope_ci95"][1]
    assert (tmp_path / "sc" / "scaling.png").exists() and "ratio ~ tokens^" in printed
    assert not (tmp_path / "sc" / "1x32-512" / "data").exists()  # one scored corpus for the grid
    # a rerun with the same settings trains nothing
    before = (tmp_path / "sc" / "1x32-512" / "seed-42" / "mle" / "checkpoint" / "model.safetensors").stat().st_mtime
    main(args)
    after = (tmp_path / "sc" / "1x32-512" / "seed-42" / "mle" / "checkpoint" / "model.safetensors").stat().st_mtime
    assert before == after


def test_the_slope_recovers_a_known_power_law():
    rng = np.random.default_rng(0)
    points = []
    for tokens in (1e5, 4e5, 1.6e6):
        ratio = (tokens / 1e5) ** -0.25
        mle = [rng.exponential(0.1, 400) for _ in range(3)]
        arm = [rng.exponential(0.1 * ratio, 400) for _ in range(3)]
        points.append({"tokens": tokens, "ratio": float(np.mean(arm) / np.mean(mle)),
                       "scores": {"mle": mle, "conditional": arm}})
    s = slope(points, "conditional")
    assert s["slope"] == pytest.approx(-0.25, abs=0.05)
    assert s["slope_ci95"][0] < -0.25 < s["slope_ci95"][1] and s["slope_ci95"][1] < 0


def test_bad_sizes_and_objectives_are_one_line_errors(tmp_path):
    from phf.recipes.configs import ScalingConfig

    for bad in ("4", "4x100", "0x64", "x128"):
        with pytest.raises(PhfError, match="LAYERSxWIDTH"):
            parse_size(bad)
    assert parse_size("6x192") == (6, 192)
    with pytest.raises(PhfError, match="feedback objective"):
        ScalingConfig(tokens=[1000], task="pep8", out=tmp_path, objective="mle")
    with pytest.raises(PhfError, match="positive token budgets"):
        ScalingConfig(tokens=[0], task="pep8", out=tmp_path)
