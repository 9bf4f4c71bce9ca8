"""Per-sample scores of replicate runs -> means with 95% intervals, ratios to MLE with intervals, p-values.

A replicate is one training seed (and its own sampling seed); it yields a set of sample scores. Two sources of
noise sit in every figure: which samples were drawn, and which seed trained the model. The bootstrap here
resamples both, hierarchically: draw seeds with replacement, then each drawn seed's samples with replacement, and
take the mean of the seeds' means. With one seed only the samples are resampled, so the interval says nothing of
seed-to-seed variation; with few seeds the seed level undercovers (three seeds give a coarse resampling
distribution), which the docs say beside every figure.

Intervals are percentile intervals of B bootstrap statistics. A ratio's interval resamples the two arms
independently (they are separate models), so it covers the noise of both. The p-value of an arm against MLE is
the two-sided Mann-Whitney U test on the pooled sample scores (normal approximation with tie and continuity
corrections, as scipy's `mannwhitneyu(method="asymptotic")`); pooling treats samples of different seeds as
exchangeable, so it is a test of the sampled models, not of the training procedure.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

B = 2000  # bootstrap statistics per interval: the percentile ends move by ~0.01 of the interval between reruns


def _clean(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[~np.isnan(x)]


def bootstrap_means(groups: Sequence[Sequence[float]], rng: np.random.Generator, b: int = B) -> np.ndarray:
    """`b` bootstrap statistics of the mean of group means: groups (seeds) drawn with replacement, then each drawn
    group's values (samples) drawn with replacement. One group: only its values are resampled. Empty groups are
    ignored; no values at all gives NaNs."""
    groups = [g for g in (_clean(g) for g in groups) if len(g)]
    if not groups:
        return np.full(b, math.nan)
    s = len(groups)
    picks = rng.integers(0, s, size=(b, s)) if s > 1 else np.zeros((b, 1), dtype=np.int64)
    means = np.empty(picks.shape)
    for g, values in enumerate(groups):  # every slot that drew group g gets a resample of its own
        slots = picks == g
        n = int(slots.sum())
        if n:
            means[slots] = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return means.mean(axis=1)


def percentile_interval(stats: np.ndarray, level: float = 0.95) -> list[float] | None:
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]


def mean_interval(groups: Sequence[Sequence[float]], rng: np.random.Generator, b: int = B) -> list[float] | None:
    """95% interval of the mean of group means (`bootstrap_means`)."""
    return percentile_interval(bootstrap_means(groups, rng, b))


def ratio_interval(groups: Sequence[Sequence[float]], reference: Sequence[Sequence[float]],
                   rng: np.random.Generator, b: int = B) -> list[float] | None:
    """95% interval of mean(groups) / mean(reference), the two resampled independently."""
    num, den = bootstrap_means(groups, rng, b), bootstrap_means(reference, rng, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(num / den)


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test of x against y: the normal approximation with the tie
    correction and a continuity correction (scipy.stats.mannwhitneyu, method="asymptotic"). NaN without data."""
    x, y = _clean(x), _clean(y)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return math.nan
    both = np.concatenate([x, y])
    ranks = _average_ranks(both)
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)  # the larger U: its upper tail, doubled
    _, counts = np.unique(both, return_counts=True)
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1)))
    if variance <= 0:
        return 1.0  # every value tied: no evidence either way
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return float(min(1.0, math.erfc(z / math.sqrt(2))))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def compare(groups: Sequence[Sequence[float]], reference: Sequence[Sequence[float]] | None,
            rng: np.random.Generator, prefix: str = "misalignment") -> dict:
    """The uncertainty fields of one figure of an arm: `<prefix>_mean_ci95`, and against a reference arm
    `<prefix>_ratio_to_mle`, `<prefix>_ratio_ci95`, `<prefix>_p_vs_mle`, and whether the ratio's interval
    holds 1 (`<prefix>_distinguishable_from_mle`: False when it does)."""
    means = [float(np.mean(g)) for g in (_clean(g) for g in groups) if len(g)]
    out = {f"{prefix}_mean_ci95": mean_interval(groups, rng)}
    if reference is None:
        return out
    ref_means = [float(np.mean(g)) for g in (_clean(g) for g in reference) if len(g)]
    ref = float(np.mean(ref_means)) if ref_means else math.nan
    ratio = float(np.mean(means)) / ref if means and ref else math.nan
    interval = ratio_interval(groups, reference, rng) if ref else None
    distinguishable = None if interval is None else not interval[0] <= 1 <= interval[1]
    out.update({f"{prefix}_ratio_to_mle": ratio, f"{prefix}_ratio_ci95": interval,
                f"{prefix}_p_vs_mle": mann_whitney_p(np.concatenate([_clean(g) for g in groups] or [[]]),
                                                     np.concatenate([_clean(g) for g in reference] or [[]])),
                f"{prefix}_distinguishable_from_mle": distinguishable})
    return out


def seed_interval(values: Sequence[float], rng: np.random.Generator, b: int = B) -> list[float] | None:
    """95% interval of the mean of per-seed values (one number per seed, like held-out bits/char); None for
    fewer than two seeds, where there is nothing to resample."""
    x = _clean(values)
    if len(x) < 2:
        return None
    return percentile_interval(x[rng.integers(0, len(x), size=(b, len(x)))].mean(axis=1))


def seed_ratio_interval(values: Sequence[float], reference: Sequence[float], rng: np.random.Generator,
                        b: int = B) -> list[float] | None:
    """95% interval of mean(values) / mean(reference), per-seed values resampled independently; None for fewer
    than two seeds on either side."""
    x, y = _clean(values), _clean(reference)
    if len(x) < 2 or len(y) < 2:
        return None
    num = x[rng.integers(0, len(x), size=(b, len(x)))].mean(axis=1)
    den = y[rng.integers(0, len(y), size=(b, len(y)))].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(num / den)
