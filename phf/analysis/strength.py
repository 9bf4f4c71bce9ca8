"""`phf probe strength`: has a conditionally trained model learned to use its control tokens?

For each model (a conditional model folder, or a run folder holding one), on the held-out test documents of the
scored corpus it was trained on: how many nats likelier each segment is under its own control token than under
the other (phf.evaluation.strength, the figure `phf demo` prints beside each conditional arm), the aligned and the
misaligned segments separately, each mean with its 95% bootstrap interval. A misaligned segments' strength near
zero means conditional training has trained MLE under another name. Writes OUT/results.json, OUT/strength.png and
the table; with OUT = DIR/strength beside a demo or sweep's results.json, DIR's report shows it as a study.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from phf.analysis.probes import load, run_config, scored_corpus_for
from phf.analysis.registry import Probe, ProbeConfig, Study, register, results_file
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import write_json
from phf.core.run_folder import results_path
from phf.core.tables import text_table
from phf.evaluation.strength import NEAR_ZERO_NATS, STRENGTH_MAX_CHARS, conditioning_strength
from phf.tasks import task_for

log = logging.getLogger(__name__)

KINDS = ("misaligned", "aligned")


@dataclass(frozen=True)
class StrengthConfig(ProbeConfig):
    """`phf probe strength`: the conditional models and how much held-out text to read."""
    model: tuple[str, ...] = field(metadata={"required": True, "append": True})
    """A conditional model or run folder (repeat to compare)."""
    out: str = field(metadata={"required": True})
    """Folder for results.json and strength.png (DIR/strength puts it into DIR's report)."""
    heldout_chars: int = STRENGTH_MAX_CHARS
    """Characters of held-out test documents read (each twice: under either control token)."""
    data_dir: str | None = None
    """The data folder the models were trained from (default: from run.json)."""

    def validate(self) -> None:
        if not self.model:
            raise PhfError("phf probe strength needs at least one --model (a conditional model or run folder)")
        if self.heldout_chars < 1:
            raise PhfError(f"--heldout-chars must be >= 1, got {self.heldout_chars}")


def model_strength(path, settings: StrengthConfig, progress: bool = True) -> dict:
    """One model's conditioning strength, at the threshold it was trained with (its objective's, else the
    task's misaligned_above): the one that decided which control token each training segment got."""
    m = load(path)
    if not m.deployment.conditional:
        raise PhfError(f"{m.folder} was not trained with control tokens; conditioning strength needs a conditional "
                       f"model (e.g. runs/demo/conditional)")
    cfg = run_config(m.folder)
    scored = scored_corpus_for(m.folder, cfg, settings.data_dir)
    objective = m.meta.get("objective", {})
    threshold = objective.get("threshold")
    threshold = task_for(cfg).misaligned_above if threshold is None else threshold
    m.model.eval()
    block = conditioning_strength(m.model, m.backend, scored.documents("test"), threshold,
                                  max_chars=settings.heldout_chars, progress=progress)
    log.info("strength %s: misaligned %.4f nats per segment, aligned %.4f", m.folder,
             block["misaligned"]["nats_per_segment"], block["aligned"]["nats_per_segment"])
    return {"folder": str(m.folder), "objective": objective.get("name"), **block}


def run_strength(settings: StrengthConfig, progress: bool = True) -> dict:
    """The conditioning strength of every model; writes OUT/results.json and OUT/strength.png."""
    models: dict[str, dict] = {}
    for path in settings.model:
        row = model_strength(path, settings, progress)
        name = Path(row["folder"]).parent.name  # the run folder of a run's model
        models[name if name not in models else f"{name}-{len(models)}"] = row
    out = Path(settings.out)
    results = {"probe": "strength", "heldout_chars": settings.heldout_chars, "near_zero_nats": NEAR_ZERO_NATS,
               "models": models}
    results["figure"] = str(plot_strength(results, out / "strength.png"))
    write_json(results_path(out), results)
    return results


def plot_strength(results: dict, path: Path) -> Path:
    """Per model, the misaligned and the aligned segments' strength with its interval; zero and the near-zero
    line marked."""
    names = list(results["models"])
    fig, ax = pyplot().subplots(figsize=(6.4, 0.9 + 0.55 * len(names)))
    for k, (kind, color) in enumerate(zip(KINDS, ("#d62728", "#2ca02c"))):
        ys = [i + (0.15 if k else -0.15) for i in range(len(names))]
        xs = [results["models"][n][kind]["nats_per_segment"] for n in names]
        cis = [results["models"][n][kind]["ci95"] or [x, x] for n, x in zip(names, xs)]
        err = [[max(0.0, x - c[0]) for x, c in zip(xs, cis)], [max(0.0, c[1] - x) for x, c in zip(xs, cis)]]
        ax.errorbar(xs, ys, xerr=err, fmt="o", color=color, capsize=3, label=f"{kind} segments")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.axvline(results["near_zero_nats"], color="gray", linestyle="--", linewidth=0.8, label="near zero")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("nats per held-out segment likelier under its own control token than the other")
    ax.grid(True, axis="x", alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title("Conditioning strength")
    return save_figure(fig, path)


def _nats(block: dict) -> str:
    mean = block["nats_per_segment"]
    if not block["segments"] or mean is None or math.isnan(mean):
        return "-"
    ci = block.get("ci95")
    return f"{mean:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + f" ({block['segments']})"


def strength_table(results: dict) -> list[list[str]]:
    """Header and rows: per model, each kind's strength in nats per segment [95%] (segments), and whether the
    model has learned to condition."""
    rows = [["model", "objective", "misaligned segments, nats [95%] (n)", "aligned segments, nats [95%] (n)",
             "learned to condition"]]
    for name, r in results["models"].items():
        learned = {True: "yes", False: "no (near zero)", None: "no misaligned segment"}[r["learned"]]
        rows.append([name, r["objective"] or "-", _nats(r["misaligned"]), _nats(r["aligned"]), learned])
    return rows


def format_strength(results: dict) -> str:
    lines = text_table(strength_table(results))
    lines.append(f"figure: {results['figure']}")
    return "\n".join(lines)


def strength_caption(results: dict) -> str:
    return (f"How many nats likelier each held-out segment is under its own control token than under the other "
            f"(the misaligned segments' is what deployment under <|aligned|> relies on), per model, with 95% "
            f"bootstrap intervals, on up to {results['heldout_chars']:,} held-out characters. Near zero (below "
            f"{results['near_zero_nats']} nats or an interval reaching 0): the model has not learned to condition.")


def _report_folder(cfg: StrengthConfig) -> Path | None:
    """OUT = DIR/strength beside DIR/results.json (a demo or sweep folder): DIR, whose report shows the study."""
    out = Path(cfg.out)
    return out.parent if out.name == "strength" and results_path(out.parent).exists() else None


PROBE = register(Probe(
    name="strength", config=StrengthConfig, run=run_strength,
    help="conditioning strength: nats per held-out segment likelier under its own control token than the other",
    show=lambda results, cfg: f"{format_strength(results)}\nresults: {results_path(cfg.out)}",
    study=Study("strength", "Conditioning strength", results_file("strength", "strength.png"),
                strength_caption, strength_table),
    report_folder=_report_folder))
