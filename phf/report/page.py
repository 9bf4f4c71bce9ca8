"""The report: one self-contained HTML page (figures, a table, a sample browser) for one or more result folders.

    phf report runs/sweep [runs/other ...] [--out DIR]   ->   DIR/report.html + DIR/figures/*.png

A result folder is what `phf demo` or `phf sweep` writes: `results.json` (one entry per objective) and, per
objective, a run folder with `metrics.jsonl` and `samples.jsonl`. The page needs nothing from the network: the
figures are embedded as data URIs (and also written as PNG files next to it) and the only script is a few lines
that mark the page once every figure has loaded. Sample text is model output and is always escaped.

Figures:
  misalignment vs capability  mean misalignment of unconditional samples against KL(reference || model) in bits
                              per character, log-log, one point per objective, the Pareto front drawn (the
                              paper's Figure 2); held-out bits/char on the x axis where no KL was measured
  misalignment vs tokens      `eval_misalignment_mean` of the evaluations during training, one line per run
  loss vs tokens              validation loss (and training loss, faint) against tokens seen
  score distribution          share of unconditional samples scoring above each threshold, per objective

Studies written into a folder appear in their own section, one per study record of phf.analysis.registry: e.g.
`phf probe guidance --run DIR` (DIR/guidance: the guidance curve's figure and table), `phf sweep --rl`
(`rl_from_bases` in results.json: RL from each base) and `phf sweep --tamper` (DIR/tamper: every arm under
adversarial finetuning).
"""
from __future__ import annotations

import base64
import bisect
import html
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from phf.analysis.registry import studies as registered_studies
from phf.core.errors import PhfError
from phf.core.io import atomic_path, read_jsonl, write_text
from phf.core.objective_specs import ARM_VARIANTS, OBJECTIVE_SPECS
from phf.core.run_folder import REFERENCE_ARM, ArmResult, metrics_file, read_results, samples_file
from phf.data.scorers import get_scorer
from phf.evaluation.evaluate import score_samples
from phf.evaluation.sampling import Sample
from phf.tasks import get_task

log = logging.getLogger("phf.report")

REFERENCE = REFERENCE_ARM
FIGURE_NAMES = ("misalignment_vs_kl", "misalignment_vs_bits_per_char", "misalignment_vs_tokens", "loss_vs_tokens",
                "score_distribution")  # and each study's (phf.analysis.registry)
# Each objective's and arm variant's colour is its registry record's (phf.core.objective_specs); `rl` is the RL
# baseline's.
COLORS = {**{name: spec.color for name, spec in {**OBJECTIVE_SPECS, **ARM_VARIANTS}.items()}, "rl": "#8c564b"}
_EXTRA_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#aec7e8", "#98df8a")


# -- the data ---------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One objective's results in one folder: its results entry, training metrics and samples."""
    label: str  # as shown: the objective's name, or FOLDER/name when several folders are reported together
    result: ArmResult  # its entry in results.json (phf.core.run_folder)
    root: Path  # the results folder
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    reference: dict | None = None  # the mle entry of the same folder (what ratios are taken to)

    @property
    def name(self) -> str:
        """The key in results.json, e.g. "conditional" or "finetune:conditional"."""
        return self.result.name

    @property
    def entry(self) -> dict:
        """The whole entry as written, for the table's columns."""
        return self.result.raw

    @property
    def finetune(self) -> bool:
        return self.name.startswith("finetune:") or self.result.kind == "finetune"

    @property
    def base(self) -> str:
        if self.name.startswith("rl:"):  # RL from another pretraining arm: a colour of its own
            return self.name
        return self.name.split(":", 1)[-1]

    @property
    def run_dir(self) -> Path:
        return self.result.run_folder(self.root)

    @property
    def kl(self) -> float | None:
        if self.name == REFERENCE:
            return 0.0  # the reference itself (an estimate against itself is 0 up to rounding)
        return _num(self.result.kl_from_reference_bits)


@dataclass
class Report:
    task: str
    dirs: list[Path]
    results: list[dict]
    arms: list[Arm]


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        return None
    return float(v)


def load(dirs: Sequence[str | Path]) -> Report:
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise PhfError("phf report needs at least one folder written by `phf demo` or `phf sweep`")
    results, arms, task = [], [], None
    names = [d.resolve().name for d in dirs]
    for i, d in enumerate(dirs):
        folder = read_results(d)  # one line naming the fix for a missing, damaged or newer results.json
        t = folder.task or "pep8"
        if task is not None and t != task:
            raise PhfError(f"{dirs[0]} is task {task} but {d} is task {t}: run `phf report` once per task")
        task = t
        results.append(folder.raw)
        prefix = "" if len(dirs) == 1 else (names[i] if names.count(names[i]) == 1 else f"{names[i]}.{i + 1}") + "/"
        reference = folder.reference.raw if folder.reference else None
        for name, result in folder.arms.items():
            arm = Arm(prefix + name, result, d, reference=reference)
            metrics = metrics_file(arm.run_dir)
            samples = samples_file(arm.run_dir)
            arm.metrics = read_jsonl(metrics) if metrics.exists() else []
            arm.samples = read_jsonl(samples) if samples.exists() else []
            arms.append(arm)
    return Report(task, dirs, results, arms)


# -- the Pareto front -------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point dominates (lower is better on both coordinates), by increasing x.

    A point is dominated when another is at least as good on both and strictly better on one; points with a
    missing or NaN coordinate are never on the front (and dominate nothing)."""
    valid = [(i, x, y) for i, (x, y) in enumerate(points) if _num(x) is not None and _num(y) is not None]
    front = [(x, y, i) for i, x, y in valid
             if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for _, x2, y2 in valid)]
    return [i for _, _, i in sorted(front)]


# -- figures ----------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes


def _color(base: str, seen: dict[str, str]) -> str:
    if base in COLORS:
        return COLORS[base]
    if base not in seen:
        seen[base] = _EXTRA_COLORS[len(seen) % len(_EXTRA_COLORS)]
    return seen[base]


def _new_figure(size=(7.0, 4.6)):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=110, layout="constrained")
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _tokens_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _: f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}K" if abs(v) >= 1e3 else f"{v:g}"))


def _log_scale(ax, which: str) -> None:
    """A log axis labelled in plain numbers (0.02, 0.05, 0.1); the narrower the range, the more minor ticks
    are labelled."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis

    def minor(v, _):
        lo, hi = sorted(axis.get_view_interval())
        digits = "123456789" if hi < 4 * lo else "235" if hi < 30 * lo else "25"
        return f"{v:.3g}" if f"{v:.1e}"[0] in digits else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _x_tokens(row: dict) -> float | None:
    return _num(row.get("total_tokens", row.get("tokens")))


def _misalignment_label(task: str) -> str:
    return get_task(task).misalignment_label


def capability_points(rep: Report) -> tuple[list[Arm], list[float | None], list[float], bool]:
    """The arms with a misalignment, their x (KL from the reference where any was measured, else held-out
    bits/char), their misalignment, and whether x is KL."""
    arms = [a for a in rep.arms if _num(a.entry.get("misalignment_mean")) is not None]
    ys = [float(a.entry["misalignment_mean"]) for a in arms]
    use_kl = any((a.kl or 0) > 0 for a in arms)
    xs = [a.kl for a in arms] if use_kl else [_num(a.entry.get("heldout_bits_per_char")) for a in arms]
    return arms, xs, ys, use_kl


def _spread_labels(fig, labels, step: float = 9.0, tries: int = 12) -> None:
    """Move point labels that would overlap an earlier one down (then up), a line at a time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    placed = []
    for t in labels:
        dx, dy = t.xyann
        for k in range(tries):
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(p) for p in placed):
                break
            shift = step * (k // 2 + 1) * (-1 if k % 2 == 0 else 1)
            t.xyann = (dx, dy + shift)
        placed.append(t.get_window_extent(renderer))


def figure_pareto(rep: Report) -> Figure | None:
    arms, xs, ys, use_kl = capability_points(rep)
    if not arms:
        return None
    front = set(pareto_front(list(zip(xs, ys))))
    log_y = all(y > 0 for y in ys)
    fig, ax = _new_figure()
    marks = _pareto_points(fig, ax, arms, xs, ys, front, use_kl)
    line = sorted((xs[i], ys[i]) for i in front if xs[i] is not None and not (use_kl and xs[i] <= 0))
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], color="black", linewidth=1, alpha=0.5, zorder=2,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    if use_kl:
        _log_scale(ax, "x")
        ax.set_xlabel(f"KL({REFERENCE} || model), bits per character (log)")
    else:
        ax.set_xlabel("held-out bits per character (capability: lower is better)")
    if log_y:
        _log_scale(ax, "y")
    ax.set_ylabel(f"misalignment: {_misalignment_label(rep.task)}" + (" (log)" if log_y else ""))
    ax.grid(True, which="both", alpha=0.25)
    on_front = ", ".join(arms[i].label for i in sorted(front, key=lambda i: xs[i]))
    caption = _pareto_caption(arms, on_front, use_kl, log_y, **marks)
    name = "misalignment_vs_kl" if use_kl else "misalignment_vs_bits_per_char"
    ax.set_title("Misalignment vs " + ("KL from the reference" if use_kl else "held-out bits per character"))
    return Figure(name, "Misalignment vs capability", caption, _png(fig))


def _pareto_points(fig, ax, arms: list[Arm], xs, ys, front: set[int], use_kl: bool) -> dict[str, list[str]]:
    """Each arm's point (outlined on the front, a square when finetuned), its interval bars and label; the
    reference at KL 0 as a horizontal line. Returns the labels of the arms drawn specially, for the caption."""
    seen: dict[str, str] = {}
    ref_lines, not_positive, labels, same_as_reference = [], [], [], []
    floor = min((x for x in xs if x is not None and x > 0), default=1.0) / 2  # where KL <= 0 estimates are put
    for a, x, y, i in zip(arms, xs, ys, range(len(arms))):
        color = _color(a.base, seen)
        if x is None:
            continue
        label, marker = a.label, "s" if a.finetune else "o"
        if use_kl and x <= 0:
            if a.name == REFERENCE:  # KL 0 cannot sit on a log axis: a horizontal line marks the reference
                ax.axhline(y, color=color, linestyle=":", linewidth=1.2)
                ref_lines.append(a.label)
                ax.annotate(f"{a.label} (reference, KL 0)", (0.01, y), xycoords=("axes fraction", "data"),
                            xytext=(2, 3), textcoords="offset points", fontsize=8, color=color)
                continue
            x, label, marker = floor, f"{a.label} (KL ≤ 0)", "<"  # a Monte Carlo estimate can come out below 0
            not_positive.append(a.label)
        yerr = _error_bar(y, _get_list(a.entry, ("misalignment_mean_ci95",)))
        xerr = None if use_kl else _error_bar(x, _get_list(a.entry, ("heldout_bits_per_char_ci95",)))
        if yerr is not None or xerr is not None:
            ax.errorbar([x], [y], yerr=yerr, xerr=xerr, fmt="none", ecolor=color, elinewidth=1, capsize=2, zorder=2)
        if a.entry.get("misalignment_distinguishable_from_mle") is False:  # its ratio's interval holds 1
            same_as_reference.append(a.label)
        ax.scatter([x], [y], s=70 if i in front else 45, color=color, marker=marker,
                   edgecolors="black" if i in front else "none", linewidths=1.0, zorder=3)
        labels.append(ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8))
    _spread_labels(fig, labels)
    return {"ref_lines": ref_lines, "not_positive": not_positive, "same_as_reference": same_as_reference}


def _pareto_caption(arms: list[Arm], on_front: str, use_kl: bool, log_y: bool, ref_lines: list[str],
                    not_positive: list[str], same_as_reference: list[str]) -> str:
    if use_kl:
        caption = (f"Mean misalignment of unconditional samples against the KL divergence from the {REFERENCE} "
                   "model (Monte Carlo, from its samples), in bits per character; lower is better on both axes. "
                   "Circles: feedback from the start of training; squares: finetuned with feedback. Outlined "
                   "points are on the Pareto front" + (f"; the dotted line is the reference ({', '.join(ref_lines)})"
                                                       if ref_lines else "") + f". On the front: {on_front}.")
        if not_positive:
            caption += (f" Estimated KL at or below 0 (within the estimate's noise of the reference), drawn at the "
                        f"left edge as triangles: {', '.join(not_positive)}.")
    else:
        caption = ("No KL from a reference was measured for these runs, so the x axis is held-out bits per "
                   "character of the test documents instead (capability; lower is better), on a linear axis. "
                   "Circles: feedback from the start of training; squares: finetuned with feedback. Outlined "
                   f"points are on the Pareto front (lower is better on both axes): {on_front}.")
    if any(_get_list(a.entry, ("misalignment_mean_ci95",)) for a in arms):
        seeds = len(arms[0].entry.get("seeds") or [1])
        caption += (f" Bars: 95% bootstrap intervals over {seeds} seed{'s' if seeds != 1 else ''} and their samples"
                    + (" (one seed: the sampling noise only)" if seeds == 1 else "") + ".")
    if same_as_reference:
        caption += (f" Not distinguishable from {REFERENCE} (the interval of the ratio holds 1): "
                    f"{', '.join(same_as_reference)}.")
    if not log_y:
        caption += " Some misalignment is 0, so the y axis is linear."
    return caption


def _error_bar(value: float, interval: list[float] | None):
    """matplotlib's asymmetric error of a point from its interval (clipped at 0: an interval is not always
    centred on its mean)."""
    if interval is None:
        return None
    return [[max(0.0, value - interval[0])], [max(0.0, interval[1] - value)]]


def figure_misalignment_vs_tokens(rep: Report) -> Figure | None:
    series = []
    for a in rep.arms:
        pts = [(_x_tokens(r), _num(r.get("eval_misalignment_mean"))) for r in a.metrics]
        pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
        if pts:
            series.append((a, pts))
    if not series:
        return None
    fig, ax = _new_figure()
    seen: dict[str, str] = {}
    for a, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_color(a.base, seen),
                linestyle="--" if a.finetune else "-", marker="s" if a.finetune else "o", markersize=3,
                label=a.label)
    if all(p[1] > 0 for _, pts in series for p in pts):
        _log_scale(ax, "y")
    ax.set_xlabel("tokens seen" + (" (finetunes counted from the start of pretraining)"
                                   if any(a.finetune for a, _ in series) else ""))
    ax.set_ylabel(f"misalignment: {_misalignment_label(rep.task)}")
    ax.set_title("Misalignment during training")
    _tokens_axis(ax)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    caption = ("Mean misalignment of the small batch of unconditional samples drawn at each evaluation during "
               "training (`train.eval_samples`), against tokens seen. Dashed: finetuned with feedback, placed at "
               "the tokens of the checkpoint they started from plus their own.")
    return Figure("misalignment_vs_tokens", "Misalignment vs tokens seen", caption, _png(fig))


def figure_loss_vs_tokens(rep: Report) -> Figure | None:
    series = []
    for a in rep.arms:
        train = sorted((_x_tokens(r), _num(r.get("loss"))) for r in a.metrics if "loss" in r)
        val = sorted((_x_tokens(r), _num(r.get("val_loss"))) for r in a.metrics if "val_loss" in r)
        train = [p for p in train if None not in p]
        val = [p for p in val if None not in p]
        if train or val:
            series.append((a, train, val))
    if not series:
        return None
    fig, ax = _new_figure()
    seen: dict[str, str] = {}
    for a, train, val in series:
        color = _color(a.base, seen)
        style = "--" if a.finetune else "-"
        if train:
            ax.plot([p[0] for p in train], [p[1] for p in train], color=color, linestyle=style, linewidth=0.8,
                    alpha=0.35)
        if val:
            ax.plot([p[0] for p in val], [p[1] for p in val], color=color, linestyle=style, marker="o",
                    markersize=4, linewidth=1.6, label=a.label)
        elif train:
            ax.plot([], [], color=color, linestyle=style, label=f"{a.label} (training loss only)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss, nats per token")
    ax.set_title("Validation loss during training")
    _tokens_axis(ax)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    caption = ("Validation loss (points and bold lines) and training loss (faint) against tokens seen. Each "
               "objective computes them on its own token stream (filtering's is filtered, conditional training's "
               "carries control tokens, weighted objectives weight their tokens), so compare their shapes more than "
               "their levels: held-out bits per character in the table is the like-for-like measure.")
    return Figure("loss_vs_tokens", "Loss vs tokens seen", caption, _png(fig))


def figure_score_distribution(rep: Report) -> Figure | None:
    series = []
    for a in rep.arms:
        scores = sorted(s for s in (_num(r.get("score")) for r in a.samples if r.get("scenario") == "unconditional")
                        if s is not None)
        if scores:
            series.append((a, scores))
    if not series:
        return None
    positive = [s for _, sc in series for s in sc if s > 0]
    log_x = get_task(rep.task).score_scale == "log" and bool(positive)
    start = min(positive) * 0.9 if log_x else 0.0  # left of every positive score: the share above is that above 0
    fig, ax = _new_figure()
    seen: dict[str, str] = {}
    for a, scores in series:
        n = len(scores)
        xs = [start] + sorted(set(s for s in scores if s > start))
        shares = [(n - bisect.bisect_right(scores, x)) / n for x in xs]  # share of samples scoring above x
        ax.step(xs, shares, where="post", color=_color(a.base, seen), linestyle="--" if a.finetune else "-",
                label=a.label)
    if log_x:
        _log_scale(ax, "x")
    ax.set_xlabel(f"score threshold: {_misalignment_label(rep.task)}" + (" (log)" if log_x else ""))
    ax.set_ylabel("share of samples scoring above it")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Distribution of sample scores")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    caption = ("For every threshold, the share of each objective's unconditional samples scoring above it (lower "
               "curves are better). Where the table's means are close, this shows whether an objective removes "
               "the worst samples or shifts them all.")
    return Figure("score_distribution", "Score distribution", caption, _png(fig))


def make_figures(rep: Report) -> tuple[list[Figure], list[str]]:
    figures, notes = [], []
    for make, missing in ((figure_pareto, "no objective has a misalignment_mean: nothing to plot against capability"),
                          (figure_misalignment_vs_tokens, "misalignment vs tokens seen: these runs have no "
                           "evaluation with samples during training (set train.eval_samples, as `phf sweep` does)"),
                          (figure_loss_vs_tokens, "loss vs tokens seen: no run has a metrics.jsonl"),
                          (figure_score_distribution, "score distribution: no run has a samples.jsonl")):
        fig = make(rep)
        if fig is None:
            notes.append(missing)
        else:
            figures.append(fig)
    return figures, notes


# -- studies written into a result folder ------------------------------------------------------------------------
def _rows_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def studies(rep: Report) -> tuple[list[Figure], str]:
    """The figures and HTML of the studies found in the report's folders: each study record of
    phf.analysis.registry (a probe's, e.g. the guidance curve, or a recipe's, e.g. RL from bases) in each folder."""
    figures, parts = [], []
    for study in registered_studies().values():
        for d, res in zip(rep.dirs, rep.results):
            found = study.find(d, res)
            if found is None:
                continue
            results, png = found
            caption = study.caption(results)
            if png is not None:
                figures.append(Figure(study.name, study.title, caption, png.read_bytes()))
            parts.append(f"<h3>{html.escape(study.title)} ({html.escape(d.name)})</h3><p>{html.escape(caption)}</p>"
                         + _rows_html(study.table(results))
                         + "".join(f"<p>{html.escape(a)}</p>" for a in study.notes(results)))
    return figures, ("<h2>Studies</h2>" + "".join(parts)) if parts else ""


# -- the table --------------------------------------------------------------------------------------------------
# (header, how to read it from an entry, format, ratio to the reference: "x" a ratio, "%" a relative change)
COLUMNS = [
    ("misalignment mean", ("misalignment_mean",), "{:.4g}", "x"),
    ("score max@25", ("score_max_at_25",), "{:.4g}", "x"),
    ("misaligned share", ("misaligned_share",), "{:.2f}", None),
    ("prompted mean", ("prompted", "misalignment_mean"), "{:.4g}", "x"),
    ("prompts from elsewhere", ("prompted_elsewhere", "misalignment_mean"), "{:.4g}", "x"),
    ("judge", ("judge", "judge_misalignment_mean"), "{:.4g}", "x"),
    ("read without control tokens", ("unconditioned", "misalignment_mean"), "{:.4g}", "x"),
    ("strength, misaligned segments (nats)", ("conditioning_strength", "misaligned", "nats_per_segment"), "{:+.3f}",
     None),
    ("strength, aligned segments (nats)", ("conditioning_strength", "aligned", "nats_per_segment"), "{:+.3f}", None),
    ("KL from mle, bits/char", ("kl_from_reference_bits",), "{:.4f}", None),
    ("held-out bits/char", ("heldout_bits_per_char",), "{:.4f}", "%"),
    ("distinct-2", ("distinct_2",), "{:.3f}", None),
    ("parse rate", ("parse_rate",), "{:.2f}", None),
    ("mean chars", ("unconditional", "mean_chars"), "{:.0f}", None),
    ("empty share", ("unconditional", "empty_share"), "{:.2f}", None),
    ("val loss", ("val_loss",), "{:.3f}", None),
    ("train tokens", ("train_tokens",), "{:,.0f}", None),
    ("tokens seen in all", ("tokens_seen_total",), "{:,.0f}", None),
]


def _get(entry: dict | None, path: tuple[str, ...]) -> float | None:
    v = entry
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return _num(v)


# a figure's interval where it is not `<figure>_ci95` (conditioning strength's, phf.evaluation.strength)
INTERVAL_FIELDS = {"nats_per_segment": "ci95"}
# the interval fields of a figure (phf.recipes.replicates): misalignment_mean -> misalignment_ratio_ci95
RATIO_FIELDS = {"misalignment_mean": "misalignment", "heldout_bits_per_char": "heldout",
                "judge_misalignment_mean": "judge_misalignment"}


def _get_list(entry: dict | None, path: tuple[str, ...]) -> list[float] | None:
    v = entry
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v if isinstance(v, list) and len(v) == 2 and all(_num(x) is not None for x in v) else None


def ratio_text(entry: dict, path: tuple[str, ...], ratio: float, kind: str) -> str:
    """`0.43× [0.35, 0.52] mle` or `+1.8% [+1.2%, +2.4%] vs mle`; `≈ mle` when the interval holds 1."""
    prefix = RATIO_FIELDS.get(path[-1])
    interval = _get_list(entry, path[:-1] + (f"{prefix}_ratio_ci95",)) if prefix else None
    if kind == "x":
        text = f"{ratio:.2f}×" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "") + f" {REFERENCE}"
    else:
        text = f"{(ratio - 1) * 100:+.1f}%" + (f" [{(interval[0] - 1) * 100:+.1f}%, {(interval[1] - 1) * 100:+.1f}%]"
                                               if interval else "") + f" vs {REFERENCE}"
    if interval and interval[0] <= 1 <= interval[1]:
        text += f" (≈ {REFERENCE})"
    return text


def table_html(rep: Report) -> str:
    columns = [c for c in COLUMNS if any(_get(a.entry, c[1]) is not None for a in rep.arms)]
    pareto = front_labels(rep)
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in columns)
    rows = []
    for a in rep.arms:
        cells = []
        for header, path, fmt, ratio in columns:
            v = _get(a.entry, path)
            if v is None and path == ("kl_from_reference_bits",) and a.name == REFERENCE:
                v = 0.0
            if v is None:
                cells.append("<td class=na>—</td>")
                continue
            text = fmt.format(v)
            stderr = _get(a.entry, ("kl_stderr_bits",)) if path == ("kl_from_reference_bits",) else None
            if stderr is not None and a.name != REFERENCE:
                text += f" ± {stderr:.4f}"
            interval = _get_list(a.entry, path[:-1] + (INTERVAL_FIELDS.get(path[-1], path[-1] + "_ci95"),))
            if interval:
                text += f" <small>[{fmt.format(interval[0])}, {fmt.format(interval[1])}]</small>"
            ref = _get(a.reference, path)
            if ratio and ref and a.reference is not a.entry:
                text += f"<br><small>{html.escape(ratio_text(a.entry, path, v / ref, ratio))}</small>"
            cells.append(f"<td>{text}</td>")
        mark = "✓" if a.label in pareto else ""
        rows.append(f"<tr><th scope=row>{html.escape(a.label)}</th>{''.join(cells)}<td class=front>{mark}</td></tr>")
    return (f"<table id=metrics><thead><tr><th>objective</th>{head}<th>Pareto front</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def front_labels(rep: Report) -> set[str]:
    """Labels of the arms on the Pareto front of the misalignment-vs-capability figure."""
    arms, xs, ys, _ = capability_points(rep)
    return {arms[i].label for i in pareto_front(list(zip(xs, ys)))}


# -- the sample browser -----------------------------------------------------------------------------------------
_CODE = re.compile(r"^[A-Z]\d{3}\b")


def _tag(label: str) -> str:
    """A short tag shown after a flagged span: pycodestyle's codes, else the label itself (shortened)."""
    parts = label.split("; ")
    if all(_CODE.match(p) for p in parts):
        return " ".join(dict.fromkeys(p[:4] for p in parts))
    return label if len(label) <= 32 else label[:31] + "…"


def highlight(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """`text`, escaped, with each flagged span in a <mark> whose tooltip is its label (overlaps are clipped)."""
    out, pos = [], 0
    for a, b, label in sorted(spans):
        a, b = max(a, pos), min(b, len(text))
        if b <= a:
            continue
        out.append(html.escape(text[pos:a]))
        out.append(f'<mark title="{html.escape(label, quote=True)}" data-tag="{html.escape(_tag(label), quote=True)}">'
                   f"{html.escape(text[a:b])}</mark>")
        pos = b
    out.append(html.escape(text[pos:]))
    return "".join(out)


def pick_samples(samples: Sequence[dict]) -> list[tuple[str, dict]]:
    """The highest-, median- and lowest-scoring sample (distinct where there are enough), with what each is."""
    scored = sorted((r for r in samples if _num(r.get("score")) is not None), key=lambda r: r["score"])
    if not scored:
        return []
    picks = [("highest score", len(scored) - 1), ("median score", (len(scored) - 1) // 2), ("lowest score", 0)]
    out, used = [], set()
    for what, i in picks:
        if i not in used:
            used.add(i)
            out.append((what, scored[i]))
    return out


def _scorer_for(rep: Report):
    name = next((a.entry.get("scorer") for a in rep.arms if a.entry.get("scorer")), None) or rep.task

    try:
        return get_scorer(name), None
    except PhfError as exc:
        return None, f"the scorer {name!r} could not be loaded, so nothing is highlighted ({exc})"


def samples_html(rep: Report) -> tuple[str, list[str]]:
    scorer, problem = _scorer_for(rep)
    notes = [problem] if problem else []

    thresholds = [a.entry.get("misaligned_above") for a in rep.arms if a.entry.get("misaligned_above") is not None]
    threshold = thresholds[0] if thresholds else get_task(rep.task).misaligned_above
    sections = []
    for n, a in enumerate(rep.arms):
        if not a.samples:
            notes.append(f"{a.label}: no samples.jsonl in {a.run_dir}")
            continue
        blocks = []
        for scenario in dict.fromkeys(r.get("scenario", "unconditional") for r in a.samples):
            for what, r in pick_samples([r for r in a.samples if r.get("scenario", "unconditional") == scenario]):
                blocks.append(_sample_html(scenario, what, r, scorer, threshold, Sample, score_samples))
        sections.append(f"<details class=arm{' open' if n == 0 else ''}><summary>{html.escape(a.label)} "
                        f"<small>({len(a.samples)} samples)</small></summary>{''.join(blocks)}</details>")
    return "".join(sections), notes


def _sample_html(scenario, what, r, scorer, threshold, Sample, score_samples) -> str:
    prompt, text = str(r.get("prompt") or ""), str(r.get("text") or "")
    stored = float(r["score"])
    spans, rescored = [], None
    if scorer is not None:
        if scorer.segmenter == "lines":  # code is scored with its prompt; only the lines after it count
            spans = [(s - len(prompt), e - len(prompt), lab) for s, e, lab in scorer.flagged_spans(prompt + text, 0.0)
                     if s >= len(prompt)]
        else:
            spans = scorer.flagged_spans(text, threshold) if text else []
        sample = Sample(scenario, prompt, text, str(r.get("raw", text)), bool(r.get("finished", False)),
                        int(r.get("num_tokens", 0)))
        rescored = score_samples([sample], scorer)[0]
    meta = [html.escape(scenario), html.escape(what), f"score {stored:.4g}", f"{len(text):,} characters",
            f"{len(spans)} flagged"]
    if rescored is not None and not (math.isclose(rescored, stored, rel_tol=1e-6, abs_tol=1e-12)
                                     or (math.isnan(rescored) and math.isnan(stored))):
        meta.append(f'<span class=warn>re-scored now: {rescored:.4g} (the scorer has changed since)</span>')
    body = (f"<span class=prompt>{html.escape(prompt)}</span>" if prompt else "") + highlight(text, spans)
    return f"<div class=sample><div class=meta>{' · '.join(meta)}</div><pre>{body}</pre></div>"


# -- the page ---------------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;
color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#444;font-size:.92em}
table{border-collapse:collapse;font-size:.88em}th,td{border:1px solid #ddd;padding:.3em .5em;text-align:right;
vertical-align:top}thead th{background:#f4f4f4;text-align:center}tbody th{text-align:left}td small{color:#666}
td.na{color:#aaa;text-align:center}td.front{text-align:center;color:#2a7a2a}
.notes{background:#fff8e1;border:1px solid #f0d98a;padding:.5em 1em}
details.arm{margin:.6em 0;border:1px solid #ddd;border-radius:4px;padding:.3em .8em}
summary{cursor:pointer;font-weight:600}
.sample{margin:.8em 0}.meta{font-size:.85em;color:#555}.warn{color:#b00}
pre{background:#fafafa;border:1px solid #eee;padding:.6em;white-space:pre-wrap;word-break:break-word;max-height:28em;
overflow:auto;font-size:.85em}
.prompt{color:#888}mark{background:#ffd6d6;border-bottom:2px solid #d33}
mark[data-tag]::after{content:attr(data-tag);font-size:.75em;color:#fff;background:#c33;border-radius:3px;
padding:0 .25em;margin-left:.3em}
dl.about{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}dd{margin:0}
"""

# Marks the page once every figure has loaded (a browser test reads the attribute); nothing else runs.
SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-figures", ok === imgs.length ? "loaded" : "broken");
  document.body.setAttribute("data-figures-loaded", ok + "/" + imgs.length);
});"""


def _about(rep: Report) -> str:
    items = [("task", rep.task), ("folders", ", ".join(str(d) for d in rep.dirs))]
    first = rep.arms[0].entry if rep.arms else {}
    if first.get("scorer"):
        items.append(("scorer", f"{first['scorer']} ({first.get('scorer_version', '?')})"))
    for d, res in zip(rep.dirs, rep.results):
        corpus = res.get("corpus") or {}
        if corpus.get("documents"):
            docs = ", ".join(f"{v:,} {k}" for k, v in corpus["documents"].items())
            share = corpus.get("misaligned_segment_share")
            items.append((f"corpus ({d.name})", f"{docs} documents, {corpus.get('chars', 0):,} characters"
                          + (f", {share:.1%} of segments misaligned" if isinstance(share, float) else "")))
        if res.get("wall_seconds"):
            items.append((f"wall time ({d.name})", f"{res['wall_seconds']:,.0f} s"))
        v = res.get("versions") or {}
        if v:
            items.append((f"versions ({d.name})", ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers")
                                                              if k in v)))
    return "<dl class=about>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                                        for k, v in items) + "</dl>"


def render(rep: Report, figures: Sequence[Figure], notes: Sequence[str], samples: str, study_html: str = "") -> str:
    figs = "".join(
        f'<figure id="fig-{f.name}"><img alt="{html.escape(f.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(f.png).decode()}"><figcaption><b>{html.escape(f.title)}.</b> '
        f"{html.escape(f.caption)}</figcaption></figure>" for f in figures)
    note_html = ("<div class=notes><b>Not shown:</b><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                 + "</ul></div>") if notes else ""
    title = f"phf report: {rep.task}, {len(rep.arms)} objectives"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body data-figures=pending>
<h1>{html.escape(title)}</h1>
{_about(rep)}
{note_html}
<h2>Figures</h2>
{figs}
<h2>Metrics</h2>
<p>Misalignment: unconditional samples unless marked prompted (lower is better). Ratios and changes are to the
{REFERENCE} run of the same folder. Held-out bits per character: the test documents, each model conditioned as
deployed (lower is better).</p>
{table_html(rep)}
{study_html}
<h2>Samples</h2>
<p>Per objective and scenario, the highest-, median- and lowest-scoring sample, re-scored now to find what the
scorer flags (highlighted; hover for the details). Prompts are grey.</p>
{samples}
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write OUT/report.html and OUT/figures/*.png (OUT defaults to the first folder); return the page's path."""
    rep = load(dirs)
    out = Path(out) if out is not None else Path(dirs[0])
    figures, notes = make_figures(rep)
    study_figures, study_html = studies(rep)
    figures += study_figures
    samples, sample_notes = samples_html(rep)
    fig_dir = out / "figures"
    made = {f.name for f in figures}
    for name in (*FIGURE_NAMES, *registered_studies()):  # figures of an earlier report that this one does not make
        if name not in made:
            (fig_dir / f"{name}.png").unlink(missing_ok=True)
    for f in figures:
        with atomic_path(fig_dir / f"{f.name}.png") as tmp:
            tmp.write_bytes(f.png)
    page = out / "report.html"
    write_text(page, render(rep, figures, notes + sample_notes, samples, study_html))
    log.info("wrote %s and %d figures in %s", page, len(figures), fig_dir)
    return page
