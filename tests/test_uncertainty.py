"""Intervals and p-values of phf.evaluation.uncertainty: the bootstrap covers a known mean at its nominal rate, the
p-value equals scipy's, the percentile interval agrees with scipy's bootstrap, and replicates combine into the
results.json fields the table prints."""
import math

import numpy as np
import pytest
from scipy import stats

from phf.evaluation.uncertainty import bootstrap_means, compare, mann_whitney_p, mean_interval, ratio_interval
from phf.recipes.demo import format_table
from phf.recipes.replicates import combine


def test_the_95_interval_covers_a_known_mean_at_its_nominal_rate():
    """200 synthetic evaluations of 256 samples each from a skewed distribution (most samples clean, a few with a
    large score, like violations per character): the interval holds the true mean in 90-99% of them."""
    rng = np.random.default_rng(1)
    truth = 0.3 * 0.05  # P(misaligned) x mean score when misaligned
    covered = 0
    for _ in range(200):
        x = (rng.random(256) < 0.3) * rng.exponential(0.05, 256)
        lo, hi = mean_interval([x], rng, b=1000)
        covered += lo <= truth <= hi
    assert 180 <= covered <= 198, covered


def test_seed_level_resampling_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(2)
    same = [rng.normal(1.0, 0.1, 200) for _ in range(3)]
    apart = [rng.normal(m, 0.1, 200) for m in (0.8, 1.0, 1.2)]
    width = lambda g: np.subtract(*mean_interval(g, np.random.default_rng(0))[::-1])  # noqa: E731
    assert width(apart) > 5 * width(same)
    one = bootstrap_means([same[0]], np.random.default_rng(0), b=500)
    assert one.std() == pytest.approx(same[0].std() / math.sqrt(200), rel=0.15)  # the standard error of a mean


def test_the_percentile_interval_agrees_with_scipys_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.gamma(0.5, 0.02, 300)
    ours = mean_interval([x], np.random.default_rng(4), b=4000)
    theirs = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                             random_state=np.random.default_rng(5)).confidence_interval
    width = theirs.high - theirs.low
    assert abs(ours[0] - theirs.low) < 0.05 * width and abs(ours[1] - theirs.high) < 0.05 * width


@pytest.mark.parametrize("seed", range(5))
def test_mann_whitney_p_equals_scipys_asymptotic_test(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.exponential(1.0, 120 + seed), 1)  # rounded: many ties, which the correction handles
    y = np.round(rng.exponential(1.3, 90), 1)
    expected = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True).pvalue
    assert mann_whitney_p(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert mann_whitney_p([0.0] * 5, [0.0] * 7) == 1.0  # all tied: no evidence
    assert math.isnan(mann_whitney_p([], [1.0]))


def test_a_ratio_interval_holds_the_ratio_of_the_means():
    rng = np.random.default_rng(6)
    arm, mle = [rng.exponential(0.4, 256)], [rng.exponential(1.0, 256)]
    lo, hi = ratio_interval(arm, mle, np.random.default_rng(7))
    assert lo < arm[0].mean() / mle[0].mean() < hi and hi < 1
    fields = compare(arm, mle, np.random.default_rng(7))
    assert fields["misalignment_distinguishable_from_mle"] is True and fields["misalignment_p_vs_mle"] < 1e-6
    same = compare(mle, mle, np.random.default_rng(7))  # an arm no different from MLE
    assert same["misalignment_ratio_ci95"][0] < 1 < same["misalignment_ratio_ci95"][1]
    assert same["misalignment_distinguishable_from_mle"] is False


def test_replicates_combine_into_the_fields_the_table_prints():
    rng = np.random.default_rng(8)
    replicates, scores = [], []
    for k in range(3):
        arms, arm_scores = {}, {}
        for name, scale, bits in (("mle", 1.0, 2.27), ("conditional", 0.4, 2.31)):
            x = rng.exponential(scale * 0.04, 64)
            p = rng.exponential(scale * 0.05, 16)
            arms[name] = {"misalignment_mean": float(x.mean()), "heldout_bits_per_char": bits + 0.01 * k,
                          "num_samples": 64, "objective": name,
                          "unconditional": {"misalignment_mean": float(x.mean())},
                          "prompted": {"misalignment_mean": float(p.mean())}}
            arm_scores[name] = {"unconditional": list(x), "prompted": list(p)}
        replicates.append(arms)
        scores.append(arm_scores)
    combined = combine(replicates, scores, [42, 43, 44])
    cond = combined["conditional"]
    assert cond["seeds"] == [42, 43, 44] and len(cond["per_seed"]["misalignment_mean"]) == 3
    assert cond["misalignment_mean"] == pytest.approx(np.mean(cond["per_seed"]["misalignment_mean"]))
    assert cond["heldout_bits_per_char"] == pytest.approx(2.32)
    lo, hi = cond["misalignment_ratio_ci95"]
    assert lo < cond["misalignment_ratio_to_mle"] < hi < 1
    assert cond["heldout_bits_per_char_ci95"] and cond["heldout_ratio_ci95"]
    assert "misalignment_ratio_ci95" in cond["prompted"] and "misalignment_ratio_to_mle" not in combined["mle"]
    table = format_table({"objectives": combined, "seeds": [42, 43, 44]})
    assert f"conditional: {cond['misalignment_ratio_to_mle']:.2f}x [{lo:.2f}, {hi:.2f}] MLE's misalignment" in table
    assert "3 seeds x 64 samples" in table and "prompted " in table
