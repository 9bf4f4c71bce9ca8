"""Misalignment and sample length: the length-weighted and fixed-window statistics against hand computation, a
model that only writes shorter samples, the sampler's treatment of control tokens, `phf probe lengths|ending`."""
import json
import math

import pytest
import torch

from phf.core.errors import PhfError
from phf.data.scorers import get_scorer
from phf.data.segments import line_spans
from phf.evaluation.evaluate import length_metrics, misalignment_metrics, score_samples, window_text
from phf.evaluation.sampling import Sample, sample_next


def samples_of(texts, finished=None):
    finished = finished or [False] * len(texts)
    return [Sample("unconditional", "", t, t, f, 0) for t, f in zip(texts, finished)]


def test_each_statistic_equals_its_hand_computation():
    scorer = get_scorer("tests.helpers:x_per_char", "lines")
    texts = ["ab\n", "xxab\n", "x\nab\nab\nab\nab\n", "abcd\nabcd\nxbcd\nabcd\n"]  # 3, 5, 14, 20 chars
    samples = samples_of(texts, [True, True, False, False])
    scores = score_samples(samples, scorer)
    x = [0, 2, 1, 1]
    lengths = [3, 5, 14, 20]
    assert scores == pytest.approx([xi / n for xi, n in zip(x, lengths)])  # a sample's score: x per character
    m = misalignment_metrics(samples, scores, False, 0.0, scorer, window_chars=10, short_chars=6)
    assert m["misalignment_mean"] == pytest.approx((0 + 2 / 5 + 1 / 14 + 1 / 20) / 4)
    assert m["length_weighted_misalignment"] == pytest.approx(4 / 42)
    # windows: samples of at least 10 chars, cut at the end of the line holding the 10th character
    assert window_text(texts[2], line_spans(texts[2]), 10) == "x\nab\nab\nab\n"  # 11 chars
    assert window_text(texts[3], line_spans(texts[3]), 10) == "abcd\nabcd\n"  # exactly 10
    assert window_text(texts[1], line_spans(texts[1]), 10) is None
    assert m["window_samples"] == 2 and m["window_chars"] == 10
    assert m["window_misalignment_mean"] == pytest.approx((1 / 11 + 0 / 10) / 2)
    assert m["window_misalignment_median"] == pytest.approx((1 / 11 + 0) / 2)
    assert m["mean_chars"] == pytest.approx(42 / 4) and m["median_chars"] == pytest.approx(9.5)
    assert m["short_share"] == pytest.approx(2 / 4) and m["short_chars"] == 6
    assert m["finished_share"] == pytest.approx(0.5) and m["finished_count"] == 2


def test_existing_keys_are_unchanged_and_max_scorers_have_no_length_weighted_score():
    samples = samples_of(["x\nab\n", "ab\n"])
    rate = get_scorer("tests.helpers:x_per_char", "lines")
    plain = misalignment_metrics(samples, score_samples(samples, rate), False)
    full = misalignment_metrics(samples, score_samples(samples, rate), False, 0.0, rate, 4, 4)
    assert {k: full[k] for k in plain} == plain  # the old keys, with the old values
    top = get_scorer("tests.helpers:x_per_char", "lines", aggregate="max")
    m = length_metrics(samples, score_samples(samples, top), top, 4, 4)
    assert "length_weighted_misalignment" not in m  # a maximum is not a rate
    assert m["window_samples"] == 1 and m["window_misalignment_mean"] == pytest.approx(0.5)  # "x\n": x is half


BAD, GOOD = "y = 1 \n", "y = 1\n"  # W291 trailing whitespace (1 violation in 7 chars); clean (6 chars)
CYCLE = BAD + GOOD * 3  # 25 chars, 1 violation: 0.04 per character


def test_a_model_that_only_writes_shorter_samples_does_not_look_better_on_pep8():
    scorer = get_scorer("pep8")
    long_model = samples_of([CYCLE * 10] * 16)
    # the same lines in the same proportion, but half of the samples end after one line
    short_model = samples_of([CYCLE * 10] * 8 + [BAD] * 2 + [GOOD] * 6, [False] * 8 + [True] * 8)
    m = {}
    for name, samples in (("long", long_model), ("short", short_model)):
        m[name] = misalignment_metrics(samples, score_samples(samples, scorer), True, 0.0, scorer, 100, 50)
    assert m["long"]["misalignment_mean"] == pytest.approx(0.04)
    # the paper's mean of per-sample rates is fooled: a lone clean line scores 0, a lone bad one only 1/7
    assert m["short"]["misalignment_mean"] < 0.95 * m["long"]["misalignment_mean"]
    # all violations over all characters, and the first 100 characters, are not
    assert m["short"]["length_weighted_misalignment"] == pytest.approx(m["long"]["length_weighted_misalignment"])
    assert m["short"]["window_misalignment_mean"] == pytest.approx(m["long"]["window_misalignment_mean"])
    assert m["long"]["window_misalignment_mean"] == pytest.approx(0.04)
    assert m["short"]["window_samples"] == 8 and m["short"]["short_share"] == pytest.approx(0.5)


def test_a_longer_sample_is_not_penalised_under_a_max_scorer_in_the_window():
    scorer = get_scorer("tests.helpers:x_per_char", "lines", aggregate="max")
    cycle = ["x\n"] + ["a\n"] * 19  # one offending line in twenty
    long_model = samples_of(["".join((cycle * 3)[10 * (k % 2):10 * (k % 2) + 40]) for k in range(8)])
    short_model = samples_of(["".join((cycle * 3)[10 * (k % 2):10 * (k % 2) + 10]) for k in range(8)])
    m = {name: misalignment_metrics(s, score_samples(s, scorer), False, 0.0, scorer, 20, 10)
         for name, s in (("long", long_model), ("short", short_model))}
    assert m["long"]["misalignment_mean"] == pytest.approx(0.5)  # every 40-line sample holds an "x" line
    assert m["short"]["misalignment_mean"] == pytest.approx(0.25)  # half of the 10-line samples do
    assert m["long"]["window_misalignment_mean"] == pytest.approx(m["short"]["window_misalignment_mean"])
    assert m["long"]["window_samples"] == m["short"]["window_samples"] == 8


def test_control_tokens_stand_outside_the_nucleus():
    # token 0 a control token holding 0.95 of the mass, 1 <|endoftext|>, 2 a text token
    probs = torch.tensor([0.95, 0.03, 0.02])
    logits = probs.log().repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    before = sample_next(logits, 1.0, 0.9, g)
    assert set(before.tolist()) == {0}  # the control token alone fills a 0.9 nucleus: no ending, ever
    after = sample_next(logits, 1.0, 0.9, g, exempt=[0])
    freq = torch.bincount(after, minlength=3).float() / len(after)
    assert freq.tolist() == pytest.approx([0.95, 0.03, 0.02], abs=0.006)
    # the rest is still truncated: of [eos 0.03, a 0.0149, b 0.0001] the nucleus keeps 0.9 of 0.045
    probs = torch.tensor([0.955, 0.03, 0.0149, 0.0001])
    draws = sample_next(probs.log().repeat(20000, 1), 1.0, 0.9, g, exempt=[0])
    assert 3 not in draws.tolist() and 1 in draws.tolist()


def test_the_ending_probes_nucleus_is_the_distribution_the_sampler_draws_from():
    """phf probe ending computes the nucleus as a distribution (a full sort); the sampler draws from it without
    sorting the vocabulary: the two must agree, with and without exempt control tokens."""
    from phf.analysis.ending import nucleus_probs

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(1, 12, generator=g) * 2, -1)
    for exempt, rounds in (([], 4), ([0], 4), ([0, 5], 4), ([0, 5], 0)):  # rounds=0: the sorting fallback
        expected = nucleus_probs(probs, 0.8, exempt)[0]
        draws = sample_next(probs.log().repeat(40000, 1), 1.0, 0.8, g, exempt=exempt, rounds=rounds)
        freq = torch.bincount(draws, minlength=12).float() / len(draws)
        assert freq.tolist() == pytest.approx(expected.tolist(), abs=0.01)
        assert bool(((expected == 0) == (freq == 0)).all())  # the same tokens fall outside the nucleus


@pytest.fixture(scope="module")
def tiny_evaluated(tiny_cfg_factory, data_dir, tmp_path_factory):
    """A tiny conditional run, trained and evaluated (samples.jsonl, results.json)."""
    from phf.evaluation.evaluate import evaluate_checkpoint
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=3"])
    root = tmp_path_factory.mktemp("lengths")
    trained = run_training(cfg, root / "conditional", data_dir, progress=False)
    evaluate_checkpoint(trained.checkpoint, cfg, trained.data.scored, root / "conditional", progress=False)
    return root / "conditional"


def test_evaluation_records_the_length_statistics_and_probe_lengths_reads_them(tiny_evaluated, tmp_path, capsys):
    from phf.cli.main import main

    res = json.loads((tiny_evaluated / "results.json").read_text())
    u = res["unconditional"]
    for key in ("length_weighted_misalignment", "window_chars", "window_samples", "median_chars", "short_share",
                "finished_count"):
        assert key in u
    assert u["window_chars"] == 400 and res["window_chars"] == 400  # the PEP8 task's window, recorded
    main(["-q", "probe", "lengths", str(tiny_evaluated), "--out", str(tmp_path / "lengths.json")])
    out = json.loads((tmp_path / "lengths.json").read_text())
    row = out["models"]["conditional"]
    assert row["misalignment_mean"] == pytest.approx(u["misalignment_mean"])
    assert row["length_weighted_misalignment"] == pytest.approx(u["length_weighted_misalignment"])
    assert "| conditional |" in capsys.readouterr().out


def test_probe_lengths_names_a_folder_without_samples(tmp_path):
    from phf.analysis.lengths import LengthsConfig, lengths_probe

    (tmp_path / "config.yaml").write_text("task: pep8\n")
    with pytest.raises(PhfError, match="has no samples.jsonl"):
        lengths_probe(LengthsConfig(dirs=(str(tmp_path),)))


def test_ending_probe_returns_probabilities_and_writes_its_json(tiny_evaluated, tmp_path):
    from phf.cli.main import main

    main(["-q", "probe", "ending", "--model", str(tiny_evaluated), "--out", str(tmp_path / "ending"),
          "--num-docs", "4"])
    res = json.loads((tmp_path / "ending" / "results.json").read_text())
    row = res["models"]["conditional"]
    assert row["document_end"]["boundaries"] == 4 and row["inside"]["boundaries"] > 0
    for where in ("document_end", "inside"):
        for key, v in row[where].items():
            if key.startswith("p_"):
                assert 0.0 <= v <= 1.0 and not math.isnan(v), (where, key, v)
        assert row[where]["p_eos_sampled"] <= 1.0
    assert "p_eos_after_control" in row["document_end"]
