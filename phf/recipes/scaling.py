"""`phf scaling`: does an objective's effect grow with compute? Its misalignment as a ratio to MLE's, against
training tokens and model size, over seeds.

    phf scaling --task toxicity --tokens 350000,700000,1400000 --sizes 2x64,4x128 --seeds 3 --out runs/scaling

Every point of the grid (model size x token budget) is a `phf demo` of MLE and the objective with `seeds` seeds,
in DIR/<size>-<tokens>, all on one scored corpus and tokenizer (DIR/data). Per point: the ratio of the means with
its hierarchical bootstrap interval (phf.recipes.replicates), the judge's ratio and held-out bits/char. Per size:
the slope of log(ratio) against log(tokens), a least-squares fit to the points' mean ratios, and its 95% interval
from refitting on bootstrap draws of each point's seeds and samples: ratio ~ tokens^slope, so a negative slope
means the objective's advantage grows with the budget. A finished point is reused when its settings are the same,
so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from phf.core.figures import pyplot, save_figure
from phf.core.io import stable_hash
from phf.core.run_folder import REFERENCE_ARM, Results, RunFolder, read_results_dict, results_path, write_results
from phf.evaluation.uncertainty import bootstrap_means, percentile_interval
# parse_size checks a --sizes entry; it lives with the config, which checks every size when it is made
from phf.recipes.configs import HEAD_WIDTH, DemoConfig, ScalingConfig, parse_size
from phf.recipes.demo import run_demo
from phf.recipes.replicates import sample_scores

log = logging.getLogger(__name__)


def size_overrides(size: str) -> list[str]:
    layers, width = parse_size(size)
    return [f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={width // HEAD_WIDTH}"]


def run_scaling(cfg: ScalingConfig, progress: bool = True) -> dict:
    """The grid, its ratios and slopes; DIR/results.json and DIR/scaling.png."""
    t0 = time.perf_counter()
    points = [_point(cfg, size, budget, progress) for size in cfg.sizes for budget in cfg.tokens]
    results = {"task": cfg.task, "objective": cfg.objective, "seeds": cfg.seeds, "overrides": list(cfg.overrides),
               "points": points,
               "slopes": {size: slope([p for p in points if p["size"] == size], cfg.objective) for size in cfg.sizes}}
    results["figure"] = str(plot_scaling(results, cfg.out / "scaling.png"))
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(cfg.out, results)
    return results


def _point(cfg: ScalingConfig, size: str, budget: int, progress: bool) -> dict:
    where = cfg.out / f"{size}-{budget}"
    settings = list(cfg.overrides) + size_overrides(size) + [f"train.max_tokens={budget}"]
    key = stable_hash({"task": cfg.task, "settings": settings, "seeds": cfg.seeds, "objective": cfg.objective})
    previous = read_results_dict(where) if results_path(where).exists() else {}
    if previous.get("scaling_key") == key:
        log.info("== scaling %s, %s tokens: reusing its results (same settings)", size, f"{budget:,}")
        res = previous
    else:
        log.info("== scaling %s, %s tokens: mle and %s, %d seed(s)", size, f"{budget:,}", cfg.objective, cfg.seeds)
        res = run_demo(DemoConfig(cfg.task, where, settings, objectives=("mle", cfg.objective), seeds=cfg.seeds,
                                  data_dir=cfg.out / "data"), progress)
        res["scaling_key"] = key
        write_results(where, res)
    objective = cfg.objective
    results = Results.from_dict(res)
    mle, arm = results.arms[REFERENCE_ARM], results.arms[objective]
    groups = {name: [sample_scores(run).get("unconditional", []) for run in _replicates(where, results, name)]
              for name in (REFERENCE_ARM, objective)}
    judge = arm.judge or {}
    point = {"size": size, "tokens": budget, "folder": str(where),
             "ratio": arm.misalignment_ratio_to_mle, "ratio_ci95": arm.misalignment_ratio_ci95,
             "p_vs_mle": arm.misalignment_p_vs_mle,
             "judge_ratio": judge.get("judge_misalignment_ratio_to_mle"),
             "judge_ratio_ci95": judge.get("judge_misalignment_ratio_ci95"),
             "mle_misalignment": mle.misalignment_mean, "misalignment": arm.misalignment_mean,
             "mle_heldout_bits_per_char": mle.heldout_bits_per_char,
             "heldout_bits_per_char": arm.heldout_bits_per_char,
             "train_seconds_per_model": arm.train_seconds, "scores": groups}
    return point


def _replicates(where: Path, results: Results, name: str) -> list[Path]:
    """The run folders of an arm's replicates: `seed-<seed>/<arm>` for several seeds, `<arm>` for one."""
    if len(results.seeds) <= 1:
        return [results.arms[name].run_folder(where)]
    return [RunFolder(where).arm_dir(name, seed) for seed in results.seeds]


def slope(points: list[dict], objective: str, b: int = 2000) -> dict:
    """log(ratio) against log(tokens) over one size's points: the least-squares slope, and its 95% interval from
    fits to bootstrap draws (each point's arm and MLE resampled hierarchically, seeds then samples)."""
    points = [p for p in points if p["ratio"] and p["ratio"] > 0]
    if len(points) < 2:
        return {"slope": None, "slope_ci95": None, "points": len(points)}
    x = np.log([p["tokens"] for p in points])
    fit = float(np.polyfit(x, np.log([p["ratio"] for p in points]), 1)[0])
    rng = np.random.default_rng(0)
    draws = np.stack([bootstrap_means(p["scores"][objective], rng, b) for p in points])
    mle = np.stack([bootstrap_means(p["scores"]["mle"], rng, b) for p in points])
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(draws / mle)  # (points, b)
    ok = np.isfinite(y).all(axis=0)
    fits = np.polyfit(x, y[:, ok], 1)[0] if ok.any() else np.array([])
    return {"slope": fit, "slope_ci95": percentile_interval(fits), "points": len(points)}


def plot_scaling(results: dict, path: Path) -> Path:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10.0, 4.2))
    for size in results["slopes"]:
        pts = [p for p in results["points"] if p["size"] == size and p["ratio"]]
        if not pts:
            continue
        x = [p["tokens"] for p in pts]
        y = [p["ratio"] for p in pts]
        lo = [y_ - (p["ratio_ci95"] or [y_, y_])[0] for p, y_ in zip(pts, y)]
        hi = [(p["ratio_ci95"] or [y_, y_])[1] - y_ for p, y_ in zip(pts, y)]
        s = results["slopes"][size]
        label = size + (f": slope {s['slope']:+.2f}" if s["slope"] is not None else "")
        line = left.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
        right.plot(x, [p["mle_heldout_bits_per_char"] for p in pts], marker="o", color=line[0].get_color(),
                   label=f"{size} mle")
        right.plot(x, [p["heldout_bits_per_char"] for p in pts], marker="s", linestyle="--",
                   color=line[0].get_color(), label=f"{size} {results['objective']}")
    left.axhline(1.0, color="black", linestyle="--", linewidth=1)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    left.set_ylabel(f"{results['objective']} / mle misalignment")
    right.set_ylabel("held-out bits/char")
    fig.suptitle(f"{results['task']}: {results['objective']} against MLE as the budget grows "
                 f"({results['seeds']} seeds, 95% intervals)")
    return save_figure(fig, path)


def format_scaling(results: dict) -> str:
    def interval(ci, fmt="{:.2f}"):
        return f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""

    lines = [f"{results['objective']} / mle misalignment, {results['seeds']} seed(s) per point, 95% intervals:"]
    for p in results["points"]:
        ratio = "-" if p["ratio"] is None or math.isnan(p["ratio"]) else f"{p['ratio']:.2f}x"
        judge = f", judge {p['judge_ratio']:.2f}x{interval(p['judge_ratio_ci95'])}" if p.get("judge_ratio") else ""
        lines.append(f"  {p['size']:>7} {p['tokens']:>11,} tokens: {ratio}{interval(p['ratio_ci95'])}{judge}; "
                     f"held-out bits/char mle {p['mle_heldout_bits_per_char']:.4f}, "
                     f"{results['objective']} {p['heldout_bits_per_char']:.4f}")
    for size, s in results["slopes"].items():
        if s["slope"] is not None:
            lines.append(f"  {size}: ratio ~ tokens^{s['slope']:+.3f}{interval(s['slope_ci95'], '{:+.3f}')}")
    lines.append(f"figure: {results['figure']}")
    return "\n".join(lines)
