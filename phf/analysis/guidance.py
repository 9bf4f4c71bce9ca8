"""`phf probe guidance`: the guidance strength of a conditionally trained model as a curve, so a user picks the
operating point.

With classifier-free guidance g the model draws each token from p(. | aligned)^(1 + g) / p(. | misaligned)^g,
normalised (phf.evaluation.sampling). g = 0 is the paper's conditional sampling; larger g buys less misalignment
and costs capability. Per strength this probe measures, for each replicate (a training seed's conditional model
and the MLE model of the same seed):

    misalignment   unconditional samples at the run's sampling settings, scored by the training scorer and the
                   held-out judge; the mean over replicates with a hierarchical bootstrap interval and its ratio to
                   the MLE model's samples (phf.evaluation.uncertainty)
    KL from MLE    KL(mle || guided) in bits per character of text, from samples of the MLE model (temperature 1,
                   no nucleus) scored under the normalised guided distribution (phf.evaluation.kl)
    held-out       bits per character of the test documents under the normalised guided distribution

Both log-likelihoods use the guided distribution over the whole vocabulary, as held-out bits/char at g = 0 always
has, so the g = 0 point equals the run's own evaluation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from phf.analysis.probes import load, run_config, scored_corpus_for
from phf.analysis.registry import Probe, ProbeConfig, Study, register, results_file
from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import write_json
from phf.core.run_folder import REFERENCE_ARM, RunFolder, results_path
from phf.core.tables import text_table
from phf.data.scorers import scorer_for
from phf.data.segments import get_segmenter
from phf.evaluation.evaluate import heldout_bits_per_char, judge_for, score_samples
from phf.evaluation.kl import DeployedModel, KLReference
from phf.evaluation.sampling import generate
from phf.evaluation.uncertainty import compare, seed_interval
from phf.model.finetune import resolve_model_folder
from phf.tasks import task_for

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class GuidanceConfig(ProbeConfig):
    """`phf probe guidance`: the replicates (a demo or sweep folder, or models and references) and the curve."""
    run: str | None = None
    """A folder written by `phf demo` or `phf sweep`: its conditional and mle runs (every seed's); results go to
    RUN/guidance and into its report."""
    model: tuple[str, ...] = field(default=(), metadata={"append": True})
    """A conditional model or run folder (repeatable: one per seed)."""
    reference: tuple[str, ...] = field(default=(), metadata={"append": True})
    """The MLE model to compare with (one, or one per --model, in the same order)."""
    out: str | None = None
    """Folder for results.json and guidance.png (with --run: RUN/guidance)."""
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    """Guidance strengths, separated by commas."""
    num_samples: int = 256
    """Unconditional samples per strength and seed."""
    kl_samples: int | None = None
    """Samples of the MLE model for the KL (default: the run's eval.kl_samples)."""
    heldout_chars: int = 0
    """Held-out characters for bits/char (0: the run's eval.heldout_chars)."""
    seed: int = 0
    """Sampling seed of the first replicate (+1 per replicate)."""
    data_dir: str | None = None
    """The data folder the models were trained from (default: from run.json)."""

    def validate(self) -> None:
        if self.run and (self.model or self.reference):
            raise PhfError("give either --run DIR or --model/--reference, not both")
        if not self.run and not (self.model and self.reference):
            raise PhfError("give --run DIR (a demo or sweep folder) or --model CONDITIONAL --reference MLE")
        if len(self.reference) not in (0, 1, len(self.model)):
            raise PhfError(f"give one --reference, or one per --model ({len(self.model)}); got {len(self.reference)}")
        if self.out is None and not self.run:
            raise PhfError("give --out DIR for the results (with --run it defaults to RUN/guidance)")
        g = self.strengths
        if not g or min(g) < 0 or not all(math.isfinite(v) for v in g):
            raise PhfError(f"--strengths must be finite guidance strengths >= 0, got {sorted(set(g))}")

    @property
    def curve_strengths(self) -> list[float]:
        return sorted(set(float(g) for g in self.strengths))

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "guidance"

    def pairs(self) -> list[tuple]:
        """(conditional model, MLE model) of every replicate."""
        if self.run:
            return pairs_in(self.run)
        return list(zip(self.model, self.reference * len(self.model) if len(self.reference) == 1 else self.reference))


def pairs_in(run_dir: str | Path) -> list[tuple[Path, Path]]:
    """(conditional model, MLE model) of every replicate in a folder written by `phf demo` or `phf sweep`: its
    own `conditional` and `mle` runs, or those of each `seed-<seed>` folder."""
    run_dir = Path(run_dir)
    roots = [RunFolder(r) for r in RunFolder(run_dir).replicate_roots()]
    pairs = [(r.arm_dir("conditional"), r.arm_dir(REFERENCE_ARM)) for r in roots
             if r.checkpoint("conditional").exists() and r.checkpoint(REFERENCE_ARM).exists()]
    if not pairs:
        raise PhfError(f"{run_dir} has no conditional and mle runs side by side (conditional/checkpoint, "
                       f"mle/checkpoint, or the same in seed-* folders); give --model and --reference instead")
    return pairs


def _samples(m, scfg: SampleConfig, scorer, judge, progress: bool, desc: str) -> tuple[list[float], list[float]]:
    samples = generate(m.model, m.tokenizer, [""] * scfg.num_samples, scfg, m.deployment, "unconditional",
                       bar=desc if progress else None, segmenter=scorer.segmenter)
    return score_samples(samples, scorer), (score_samples(samples, judge) if judge is not None else [])


def replicate_curve(model_path, reference_path, settings: GuidanceConfig, seed: int, progress: bool = True) -> dict:
    """One replicate: its reference's sample scores, then per strength the guided model's sample scores (scorer
    and judge), KL(reference || guided) and held-out bits/char; sampled with `seed`."""
    num_samples, kl_samples, heldout_chars = settings.num_samples, settings.kl_samples, settings.heldout_chars
    m = load(model_path)
    cfg = run_config(m.folder)
    m.deployment.negative(m.tokenizer.convert_tokens_to_ids, 1.0)  # refuses a model without conditional training
    scored = scored_corpus_for(m.folder, cfg, settings.data_dir)
    task, scorer = task_for(cfg), scorer_for(cfg.scoring)
    judge, judge_block = judge_for(cfg, task)
    segmenter = get_segmenter(scorer.segmenter)

    def sampling(guidance: float) -> SampleConfig:  # the run's sampling settings at this strength
        s = replace(cfg.sample, num_samples=num_samples, guidance=guidance, seed=seed)
        s.validate()
        return s

    ref = load(reference_path)
    ref_scores, ref_judged = _samples(ref, sampling(0.0), scorer, judge, progress, "sampling the reference")
    kl_ref = KLReference.sample_from(DeployedModel(ref.model, ref.backend, ref.deployment),
                                     kl_samples if kl_samples is not None else cfg.eval.kl_samples,
                                     cfg.eval.kl_max_new_tokens, cfg.eval.kl_seed, scorer.segmenter, progress=progress)
    del ref
    deployed = DeployedModel(m.model, m.backend, m.deployment)
    points = []
    for g in settings.curve_strengths:
        scores, judged = _samples(m, sampling(g), scorer, judge, progress, f"sampling at guidance {g:g}")
        point = {"guidance": float(g), "scores": scores, "misalignment_mean": float(np.nanmean(scores))}
        if judge is not None:
            point.update(judge_scores=judged, judge_misalignment_mean=float(np.nanmean(judged)))
        point.update(kl_ref.kl(deployed, guidance=g))
        point.update(heldout_bits_per_char(m.model, m.backend, scored.documents("test"), m.deployment, segmenter,
                                           heldout_chars or cfg.eval.heldout_chars, progress=False, bf16=False,
                                           guidance=g))
        log.info("guidance %g (%s): misalignment %.4f, KL from the reference %.4f bits/char, held-out %.4f "
                 "bits/char", g, m.folder, point["misalignment_mean"], point["kl_from_reference_bits"],
                 point["heldout_bits_per_char"])
        points.append(point)
    return {"model": str(m.folder), "reference": str(resolve_model_folder(reference_path)), "scorer": scorer.name,
            "judge": judge_block.get("judge_scorer") if judge is not None else None,
            "reference_scores": ref_scores, "reference_judge_scores": ref_judged, "points": points}


def summarise(replicates: list[dict], strengths: Sequence[float]) -> list[dict]:
    """Per strength, the figures over replicates: means, intervals, ratios to the reference."""
    rng = np.random.default_rng(0)
    ref = [r["reference_scores"] for r in replicates]
    ref_judge = [r["reference_judge_scores"] for r in replicates]
    rows = []
    for i, g in enumerate(strengths):
        points = [r["points"][i] for r in replicates]
        groups = [p["scores"] for p in points]
        row = {"guidance": float(g), "misalignment_mean": float(np.mean([p["misalignment_mean"] for p in points])),
               **compare(groups, ref, rng)}
        if all("judge_scores" in p for p in points) and all(ref_judge):
            row["judge_misalignment_mean"] = float(np.mean([p["judge_misalignment_mean"] for p in points]))
            row.update(compare([p["judge_scores"] for p in points], ref_judge, rng, prefix="judge_misalignment"))
        for key in ("kl_from_reference_bits", "heldout_bits_per_char"):
            values = [p[key] for p in points]
            row[key] = float(np.mean(values))
            row[f"{key}_per_seed"] = values
            row[f"{key}_ci95"] = seed_interval(values, rng)
        row["kl_stderr_bits"] = float(math.sqrt(sum(p["kl_stderr_bits"] ** 2 for p in points)) / len(points))
        rows.append(row)
    return rows


def run_guidance(settings: GuidanceConfig, progress: bool = True) -> dict:
    """The guidance curve over replicates: each conditional model is compared with its reference (or the one
    reference given); writes OUT/results.json and OUT/guidance.png."""
    strengths, pairs = settings.curve_strengths, settings.pairs()
    replicates = []
    for k, (model, reference) in enumerate(pairs):
        log.info("== guidance: replicate %d of %d, %s against %s", k + 1, len(pairs), model, reference)
        replicates.append(replicate_curve(model, reference, settings, settings.seed + k, progress))
    out_dir = settings.out_dir
    results = {"probe": "guidance", "strengths": strengths, "replicates": len(replicates),
               "num_samples": settings.num_samples, "scorer": replicates[0]["scorer"], "judge": replicates[0]["judge"],
               "reference_misalignment_mean": float(np.mean([np.nanmean(r["reference_scores"]) for r in replicates])),
               "curve": summarise(replicates, strengths), "per_replicate": replicates}
    results["figure"] = str(plot_guidance(results, out_dir / "guidance.png"))
    write_json(results_path(out_dir), results)
    return results


def plot_guidance(results: dict, path: Path) -> Path:
    """Misalignment against KL from MLE and against held-out bits/char, one point per strength, with intervals."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10.0, 4.2), sharey=True)
    curve = results["curve"]
    y = [r["misalignment_mean"] for r in curve]
    ci = [r.get("misalignment_mean_ci95") or [v, v] for r, v in zip(curve, y)]
    yerr = [[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]]
    for ax, key, label in ((axes[0], "kl_from_reference_bits", "KL(mle || guided), bits/char"),
                           (axes[1], "heldout_bits_per_char", "held-out bits/char (guided)")):
        x = [r[key] for r in curve]
        ax.errorbar(x, y, yerr=yerr, marker="o", color="#2ca02c", capsize=3, label="conditional, guided")
        for xi, yi, r in zip(x, y, curve):
            ax.annotate(f"g={r['guidance']:g}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.axhline(results["reference_misalignment_mean"], color="#444444", linestyle="--", linewidth=1,
                   label="mle")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel(f"misalignment ({results['scorer']}), unconditional samples")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Guidance strength: misalignment against capability ({results['replicates']} seed(s) x "
                 f"{results['num_samples']} samples, 95% intervals)")
    return save_figure(fig, path)


def _ratio(row: dict, prefix: str = "misalignment") -> str:
    ratio, ci = row.get(f"{prefix}_ratio_to_mle"), row.get(f"{prefix}_ratio_ci95")
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "-"
    return f"{ratio:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def guidance_table(results: dict) -> list[list[str]]:
    """Header and rows of the curve's table (for the terminal and the report)."""
    rows = [["guidance", f"{results['scorer']} / mle", "judge / mle" if results.get("judge") else "",
             "KL from mle, bits/char", "held-out bits/char"]]
    for r in results["curve"]:
        heldout = f"{r['heldout_bits_per_char']:.4f}"
        if r.get("heldout_bits_per_char_ci95"):
            heldout += " [{:.4f}, {:.4f}]".format(*r["heldout_bits_per_char_ci95"])
        rows.append([f"{r['guidance']:g}", _ratio(r), _ratio(r, "judge_misalignment") if results.get("judge") else "",
                     f"{r['kl_from_reference_bits']:.4f} +- {r['kl_stderr_bits']:.4f}", heldout])
    if not results.get("judge"):
        rows = [[c for j, c in enumerate(row) if j != 2] for row in rows]
    return rows


def format_guidance(results: dict) -> str:
    lines = text_table(guidance_table(results))
    lines.append(f"{results['replicates']} seed(s) x {results['num_samples']} samples per strength; intervals: "
                 f"hierarchical bootstrap (misalignment), over seeds (held-out); KL +- its standard error")
    lines.append(f"figure: {results['figure']}")
    return "\n".join(lines)


def guidance_caption(results: dict) -> str:
    return (f"A conditional model sampled with classifier-free guidance of each strength g: misalignment "
            f"({results['scorer']}) of {results['num_samples']} unconditional samples per seed against KL from the "
            f"MLE model and held-out bits/char, both under the normalised guided distribution; "
            f"{results['replicates']} seed(s), 95% intervals. Pick the strength whose cost you accept.")


def _report_folder(cfg: GuidanceConfig) -> Path | None:
    """With --run and its default --out, the run folder: its report shows the curve beside the arms."""
    run = Path(cfg.run) if cfg.run else None
    if run is not None and cfg.out_dir == run / "guidance" and results_path(run).exists():
        return run
    return None


PROBE = register(Probe(
    name="guidance", config=GuidanceConfig, run=run_guidance,
    help="a conditional model's misalignment against KL from MLE and held-out bits/char over guidance strengths",
    show=lambda results, cfg: f"{format_guidance(results)}\nresults: {results_path(cfg.out_dir)}",
    study=Study("guidance", "Guidance strength", results_file("guidance", "guidance.png"),
                guidance_caption, guidance_table),
    report_folder=_report_folder))
