"""Probes of what a model simulates: which writer ("mask") a control token selects, whether a finetune only
moves weight between the masks its base could already play, and which control token makes a text more likely.

    mask sweep     sample a conditional model under <|aligned|>, under <|misaligned|> and with no control token;
                   score the samples; how far apart the writers are (mean ratio, Mann-Whitney U)
    reweighting    per-sequence log-likelihoods under a finetuned model and under its base conditioned on each
                   control token; the mixture a * p(x | aligned) + (1 - a) * p(x | misaligned) fitted by maximum
                   likelihood; KL(finetuned || best mixture) against KL(finetuned || base)
    attribution    per segment, log p(segment | <|aligned|>) - log p(segment | <|misaligned|>): a learned scorer,
                   compared with the real one by rank correlation on held-out segments

Log-likelihoods count only a text's own tokens: the text is annotated with the condition's control token before
every segment (or none), preceded by <|endoftext|>, and control tokens are given to the model, never predicted
(phf.evaluation.loglik).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import mannwhitneyu, spearmanr
from transformers import AutoTokenizer

from phf.analysis.registry import Probe, ProbeConfig, register, summary
from phf.core.config import SampleConfig, load_config
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import write_json
from phf.core.run_folder import recorded_path, results_path
from phf.core.tokens import ALIGNED, MISALIGNED
from phf.data.scorers import scorer_for
from phf.data.scoring import ScoredCorpus
from phf.data.segments import get_segmenter, line_spans
from phf.data.tokenizer import of_transformers
from phf.evaluation.evaluate import score_samples, task_metrics
from phf.evaluation.loglik import segment_logprobs, sequence_logprobs
from phf.evaluation.sampling import Deployment, generate, strip_control
from phf.model.finetune import resolve_model_folder
from phf.model.lm import load_meta, load_model
from phf.tasks import get_task, score_run_corpus, task_for

log = logging.getLogger(__name__)

# a condition: the control token before every segment, or None for plain text
CONDITIONS = {"aligned": ALIGNED, "misaligned": MISALIGNED, "none": None}


# -- loading a model with the run it came from ---------------------------------------------------------------------
@dataclass
class Loaded:
    folder: Path
    model: torch.nn.Module
    tokenizer: object  # transformers PreTrainedTokenizerFast
    meta: dict
    deployment: Deployment

    @property
    def backend(self):
        return of_transformers(self.tokenizer)

    @property
    def is_conditional(self) -> bool:
        """Whether the model was trained with control tokens (it has a conditioned deployment)."""
        return bool(self.deployment.sampling_prefix or self.deployment.line_prefix)


def load(path: str | Path) -> Loaded:
    """A model folder, or a run folder holding checkpoint/."""


    folder = resolve_model_folder(path)
    model = load_model(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    meta = load_meta(folder)
    return Loaded(folder, model, tok, meta, Deployment.from_meta(meta))


def run_config(folder: Path, overrides: Sequence[str] = ()):
    """The config of the run a checkpoint came from (its run folder's config.yaml), else the task's shipped one."""
    run_cfg = Path(folder).parent / "config.yaml"
    if run_cfg.exists():
        return load_config(run_cfg, list(overrides))
    return get_task(load_meta(folder).get("task", "pep8")).run_config("mle", list(overrides))


def scored_corpus_for(folder: Path, cfg, data_dir: str | Path | None = None):
    """The scored corpus a checkpoint was trained on (recorded in its run.json), or the one in `data_dir`."""
    if data_dir:
        return score_run_corpus(cfg, data_dir)
    path = recorded_path(Path(folder).parent, "scored_corpus")
    if path is not None:
        return ScoredCorpus(path)
    raise PhfError(f"cannot tell which scored corpus {folder} was trained on (no run.json beside it); "
                   f"pass --data-dir DATA, the data folder it was trained from")


# -- the mixture of masks ------------------------------------------------------------------------------------------
def mixture_logprob(a: float, logp_a: np.ndarray, logp_b: np.ndarray) -> np.ndarray:
    """log(a * p_a + (1 - a) * p_b), elementwise and stable."""
    logp_a, logp_b = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(a) + logp_a, np.log1p(-a) + logp_b)


def fit_mixture_weight(logp_a: Sequence[float], logp_b: Sequence[float], tol: float = 1e-10) -> float:
    """The maximum-likelihood weight a in [0, 1] of the mixture a * p_a(x) + (1 - a) * p_b(x), given each
    observation's log-probability under both components.

    The log-likelihood is concave in a, so its derivative sum_i (p_a - p_b) / (a p_a + (1 - a) p_b) decreases
    in a: the optimum is 0 or 1 when the derivative has one sign over [0, 1], else its root, found by bisection."""
    la, lb = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    if la.shape != lb.shape or la.ndim != 1 or len(la) == 0:
        raise PhfError("fit_mixture_weight needs two equally long, non-empty 1-D arrays of log-probabilities")
    if not (np.isfinite(la).all() and np.isfinite(lb).all()):
        raise PhfError("fit_mixture_weight got non-finite log-probabilities; drop empty or unscorable texts first")
    m = np.maximum(la, lb)
    pa, pb = np.exp(la - m), np.exp(lb - m)  # each row scaled by the same factor: ratios are unchanged

    def slope(a: float) -> float:
        return float(np.sum((pa - pb) / (a * pa + (1 - a) * pb)))

    if slope(0.0) <= 0:
        return 0.0
    if slope(1.0) >= 0:
        return 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def reweighting_figures(ft: np.ndarray, aligned: np.ndarray, misaligned: np.ndarray, base: np.ndarray,
                        a: float | None = None) -> dict:
    """Monte Carlo KL estimates from texts sampled from the finetuned model (each array: log-likelihood per text
    under the finetuned model, the base given <|aligned|>, given <|misaligned|>, the plain base). `a` is fitted
    here by maximum likelihood unless given."""
    if a is None:
        a = fit_mixture_weight(aligned, misaligned)
    mix = mixture_logprob(a, aligned, misaligned)
    return {"mixture_weight_aligned": a,
            "kl_finetuned_to_mixture": float(np.mean(ft - mix)),
            "kl_finetuned_to_base": float(np.mean(ft - base)),
            "kl_finetuned_to_base_aligned": float(np.mean(ft - aligned)),
            "kl_finetuned_to_base_misaligned": float(np.mean(ft - misaligned))}


# -- scores of samples and two-sample tests ------------------------------------------------------------------------
def two_sample_test(x: Sequence[float], y: Sequence[float]) -> dict:
    """Mann-Whitney U of `x` against `y` (one-sided: x tends to be larger), with the common-language effect size
    AUC = P(X > Y) + P(X = Y) / 2."""

    x = np.asarray([v for v in x if not math.isnan(v)], np.float64)
    y = np.asarray([v for v in y if not math.isnan(v)], np.float64)
    if len(x) == 0 or len(y) == 0:
        return {"test": "mann-whitney-u", "u": math.nan, "p_value": math.nan, "auc": math.nan}
    res = mannwhitneyu(x, y, alternative="greater")
    return {"test": "mann-whitney-u", "alternative": "greater", "u": float(res.statistic),
            "p_value": float(res.pvalue), "auc": float(res.statistic / (len(x) * len(y))), "n_x": len(x),
            "n_y": len(y)}


def condition_deployment(name: str) -> Deployment:
    """Sampling under a condition: the control token after <|endoftext|>, the other one banned (none: neither
    given nor banned; the model picks its own tokens)."""
    if name == "aligned":
        return Deployment([ALIGNED], [MISALIGNED], None)
    if name == "misaligned":
        return Deployment([MISALIGNED], [ALIGNED], None)
    return Deployment([], [], None)


@dataclass(frozen=True)
class MasksConfig(ProbeConfig):
    """`phf probe masks`: the model and its sampling settings."""
    model: str = field(metadata={"required": True})
    """Model folder or run folder."""
    out: str = field(metadata={"required": True})
    """Folder for results.json and masks.png."""
    num_samples: int = 128
    """Samples per condition."""
    max_new_tokens: int | None = None
    """Default: the run's sample.max_new_tokens."""
    temperature: float | None = None
    """Default: the run's sample.temperature."""
    top_p: float | None = None
    """Default: the run's sample.top_p."""
    seed: int = 0
    """Sampling seed."""

    def validate(self) -> None:
        if self.num_samples < 1:
            raise PhfError(f"--num-samples must be >= 1, got {self.num_samples}")


def mask_sweep(settings: MasksConfig, progress: bool = True) -> dict:
    """Sample a conditional model under each condition, score the samples, compare their distributions."""
    num_samples, max_new_tokens, temperature, top_p = (settings.num_samples, settings.max_new_tokens,
                                                       settings.temperature, settings.top_p)
    m = load(settings.model)
    if not m.is_conditional:
        log.warning("%s was not trained with control tokens; its conditions differ only by chance", m.folder)
    cfg = run_config(m.folder)
    scfg = SampleConfig(num_samples=num_samples, max_new_tokens=max_new_tokens or cfg.sample.max_new_tokens,
                        temperature=temperature or cfg.sample.temperature, top_p=top_p or cfg.sample.top_p,
                        batch_size=cfg.sample.batch_size, seed=settings.seed)
    scfg.validate()
    task = task_for(cfg)
    scorer = scorer_for(cfg.scoring)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    results = {"probe": "masks", "model": str(m.folder), "objective": m.meta.get("objective", {}).get("name"),
               "scorer": scorer.name, "sample": scfg.__dict__, "conditions": {}}
    scores = {}
    for name in CONDITIONS:
        samples = generate(m.model, m.tokenizer, [""] * num_samples, scfg, condition_deployment(name),
                           f"mask:{name}", bar=f"sampling ({name})" if progress else None, segmenter=scorer.segmenter)
        scores[name] = score_samples(samples, scorer)
        results["conditions"][name] = task_metrics(samples, scores[name], task, scorer)
    c = results["conditions"]
    results["mean_score_ratio_misaligned_to_aligned"] = (
        c["misaligned"]["misalignment_mean"] / c["aligned"]["misalignment_mean"]
        if c["aligned"]["misalignment_mean"] else math.inf)
    results["tests"] = {"misaligned_vs_aligned": two_sample_test(scores["misaligned"], scores["aligned"]),
                        "none_vs_aligned": two_sample_test(scores["none"], scores["aligned"]),
                        "misaligned_vs_none": two_sample_test(scores["misaligned"], scores["none"])}
    out_dir = Path(settings.out)
    results["scores"] = scores
    results["figure"] = str(plot_mask_sweep(scores, out_dir / "masks.png", scorer.name))
    write_json(results_path(out_dir), results)
    return results


def plot_mask_sweep(scores: dict[str, list[float]], path: Path, scorer: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(scores)
    data = [[s for s in scores[n] if not math.isnan(s)] for n in names]
    ax.boxplot(data, showmeans=True, showfliers=False)
    for i, d in enumerate(data, start=1):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(d))
        ax.scatter(np.full(len(d), i) + jitter, d, s=6, alpha=0.35)
    ax.set_xticks(range(1, len(names) + 1), [f"<|{n}|>" if n != "none" else "no token" for n in names])
    ax.set_yscale("symlog", linthresh=0.01)  # linear near 0, logarithmic for the rare very bad samples
    top = max((max(d) for d in data if d), default=1.0)
    ax.set_ylim(0, top * 1.5 if top > 0 else 1.0)
    ax.set_ylabel(f"{scorer} score per sample")
    ax.set_title("Samples under each control token")
    return save_figure(fig, path)


# -- reweighting probe ---------------------------------------------------------------------------------------------
def heldout_chunks(scored, limit: int, max_chars: int = 1200, segmenter: Callable | None = None) -> list[str]:
    """Up to `limit` pieces of held-out test documents, each whole segments up to `max_chars`, spread over the
    documents (one piece from each document in turn)."""

    segmenter = segmenter or line_spans
    per_doc = []
    for d in scored.documents("test"):
        chunks, cur = [], ""
        for a, b in segmenter(d.text):
            seg = d.text[a:b]
            if cur and len(cur) + len(seg) > max_chars:
                chunks.append(cur)
                cur = ""
            cur += seg
        if cur:
            chunks.append(cur)
        per_doc.append([c for c in chunks if c.strip()])
    out, depth = [], 0
    while len(out) < limit and any(depth < len(c) for c in per_doc):
        for c in per_doc:
            if depth < len(c) and len(out) < limit:
                out.append(c[depth])
        depth += 1
    return out


@dataclass(frozen=True)
class ReweightingConfig(ProbeConfig):
    """`phf probe reweighting`: a finetune, the base it started from, and how many texts to read."""
    base: str = field(metadata={"required": True})
    """The (conditional) model the finetune started from."""
    finetuned: str = field(metadata={"required": True})
    """The finetuned model (folder or run folder)."""
    out: str = field(metadata={"required": True})
    """Folder for results.json and reweighting.png."""
    num_samples: int = 128
    """Samples of the finetuned model."""
    num_heldout: int = 128
    """Pieces of held-out test documents."""
    max_new_tokens: int | None = None
    """Tokens per sample (default: the run's sample.max_new_tokens)."""
    data_dir: str | None = None
    """Data folder of the scored corpus (default: from the run's run.json)."""
    seed: int = 0
    """Sampling seed."""

    def validate(self) -> None:
        for name in ("num_samples", "num_heldout"):
            if getattr(self, name) < 1:
                raise PhfError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def reweighting_probe(settings: ReweightingConfig, progress: bool = True) -> dict:
    """Does the finetune only move weight between its base's masks? See the module docstring."""
    base, ft = load(settings.base), load(settings.finetuned)
    if base.tokenizer.get_vocab() != ft.tokenizer.get_vocab():
        raise PhfError(f"{base.folder} and {ft.folder} use different tokenizers; compare a finetune with the base "
                       f"it was finetuned from")
    cfg = run_config(ft.folder)
    scored = scored_corpus_for(ft.folder, cfg, settings.data_dir)
    segmenter = get_segmenter(task_for(cfg).segmenter)
    if not base.is_conditional:
        log.warning("%s was not trained with control tokens: its 'masks' are untrained tokens", base.folder)
    # samples of the finetuned model as deployed, at temperature 1 and no nucleus: its own distribution
    scfg = SampleConfig(num_samples=settings.num_samples,
                        max_new_tokens=settings.max_new_tokens or cfg.sample.max_new_tokens, temperature=1.0,
                        top_p=1.0, batch_size=cfg.sample.batch_size, seed=settings.seed)
    scfg.validate()
    samples = generate(ft.model, ft.tokenizer, [""] * settings.num_samples, scfg, ft.deployment, "reweighting",
                       bar="sampling (finetuned)" if progress else None)
    sets = {"finetuned_samples": [t for t in (strip_control(s.raw) for s in samples) if t.strip()],
            "heldout": heldout_chunks(scored, settings.num_heldout, segmenter=segmenter)}
    results = {"probe": "reweighting", "base": str(base.folder), "finetuned": str(ft.folder),
               "base_objective": base.meta.get("objective", {}).get("name"),
               "finetuned_objective": ft.meta.get("objective", {}).get("name"),
               "base_is_conditional": base.is_conditional, "sample": scfg.__dict__,
               "note": "log-likelihoods in nats over each text's own tokens; KLs are Monte Carlo estimates on the "
                       "finetuned model's samples (nats per sequence and per character)"}
    lls = {name: _reweighting_logprobs(base, ft, name, texts, segmenter, progress) for name, texts in sets.items()}
    s = lls["finetuned_samples"]
    fig = reweighting_figures(s["finetuned"], s["base_aligned"], s["base_misaligned"], s["base"])
    chars_per_seq = float(s["chars"].mean())
    results["finetuned_samples"] = {"num_texts": len(s["chars"]), "mean_chars": chars_per_seq, **fig,
                                    **{f"{k}_per_char": v / chars_per_seq for k, v in fig.items()
                                       if k.startswith("kl_")}}
    results["heldout"] = heldout_mixture_figures(lls["heldout"], fig["mixture_weight_aligned"])
    out_dir = Path(settings.out)
    results["figure"] = str(plot_reweighting(s, out_dir / "reweighting.png"))
    write_json(results_path(out_dir), results)
    return results


def _reweighting_logprobs(base: Loaded, ft: Loaded, name: str, texts: list[str], segmenter: Callable,
                          progress: bool) -> dict[str, np.ndarray]:
    """Each text's log-likelihood under the finetuned model as deployed and under its base given each control
    token and none; and each text's length in characters."""
    kw = dict(segmenter=segmenter, progress=progress)
    return {
        "finetuned": sequence_logprobs(ft.model, ft.backend, texts, ft.deployment.line_prefix,
                                       desc=f"{name}: finetuned", **kw),
        "base_aligned": sequence_logprobs(base.model, base.backend, texts, ALIGNED, desc=f"{name}: base|aligned",
                                          **kw),
        "base_misaligned": sequence_logprobs(base.model, base.backend, texts, MISALIGNED,
                                             desc=f"{name}: base|misaligned", **kw),
        "base": sequence_logprobs(base.model, base.backend, texts, None, desc=f"{name}: base", **kw),
        "chars": np.array([len(t) for t in texts], np.float64),
    }


def heldout_mixture_figures(h: dict[str, np.ndarray], a_samples: float) -> dict:
    """Held-out bits/char of the finetuned model, the base under each condition and the mixture (with the weight
    fitted on the finetuned model's samples, `a_samples`, and with one fitted on the held-out text itself)."""
    a_h = fit_mixture_weight(h["base_aligned"], h["base_misaligned"])
    total = float(h["chars"].sum())
    bpc = {name: float(-h[name].sum() / total / math.log(2))
           for name in ("finetuned", "base_aligned", "base_misaligned", "base")}
    bpc["mixture_fitted_on_samples"] = float(-mixture_logprob(a_samples, h["base_aligned"],
                                                              h["base_misaligned"]).sum() / total / math.log(2))
    bpc["mixture_fitted_on_heldout"] = float(-mixture_logprob(a_h, h["base_aligned"], h["base_misaligned"]).sum()
                                             / total / math.log(2))
    return {"num_texts": len(h["chars"]), "chars": total, "mixture_weight_aligned": a_h, "bits_per_char": bpc,
            "gap_bits_per_char_vs_finetuned": {k: v - bpc["finetuned"] for k, v in bpc.items() if k != "finetuned"}}


def plot_reweighting(s: dict, path: Path) -> Path:
    """KL(finetuned || mixture_a) over a, against KL(finetuned || base)."""
    plt = pyplot()
    grid = np.linspace(0, 1, 101)
    chars = float(s["chars"].mean())
    kl = [float(np.mean(s["finetuned"] - mixture_logprob(a, s["base_aligned"], s["base_misaligned"]))) / chars
          for a in grid]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(grid, kl, label="KL(finetuned || a·base|aligned + (1-a)·base|misaligned)")
    ax.axhline(float(np.mean(s["finetuned"] - s["base"])) / chars, color="gray", linestyle="--",
               label="KL(finetuned || base)")
    a = fit_mixture_weight(s["base_aligned"], s["base_misaligned"])
    ax.axvline(a, color="black", linewidth=0.8)
    ax.set_xlabel("mixture weight a of <|aligned|>")
    ax.set_ylabel("nats per character")
    ax.legend(fontsize=7)
    ax.set_title("Does the finetune only reweight masks?")
    return save_figure(fig, path)


# -- control-token attribution -------------------------------------------------------------------------------------
def attribute(model, tok, texts: Sequence[str], segmenter: Callable, progress: bool = False) -> list[np.ndarray]:
    """Per text, per segment: log p(segment | <|aligned|>) - log p(segment | <|misaligned|>), each condition's
    token before every segment of the text. Positive: the aligned writer is the likelier author."""
    al = segment_logprobs(model, tok, texts, ALIGNED, segmenter, progress=progress, desc="attribution: aligned")
    mis = segment_logprobs(model, tok, texts, MISALIGNED, segmenter, progress=progress,
                           desc="attribution: misaligned")
    return [a - m for a, m in zip(al, mis)]


@dataclass(frozen=True)
class AttributionConfig(ProbeConfig):
    """`phf probe attribution`: a conditional model, a text to attribute, and how much held-out text to read."""
    model: str = field(metadata={"required": True})
    """A conditionally trained model (folder or run folder)."""
    out: str = field(metadata={"required": True})
    """Folder for results.json and attribution.png."""
    text_file: str | None = None
    """A text to attribute segment by segment."""
    heldout_chars: int = 100_000
    """Held-out text for the correlation with the real scorer."""
    per_doc_chars: int = 4000
    """Characters read from the opening of each held-out document (whole segments), so many files are read."""
    data_dir: str | None = None
    """Data folder of the scored corpus (default: from the run's run.json)."""

    def validate(self) -> None:
        for name in ("heldout_chars", "per_doc_chars"):
            if getattr(self, name) < 1:
                raise PhfError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def attribution_probe(settings: AttributionConfig, progress: bool = True) -> dict:
    """Attribution of a text file's segments (if given) and its rank correlation with the real scorer on held-out
    segments (segments with any non-space character)."""
    m = load(settings.model)
    if not m.is_conditional:
        raise PhfError(f"{m.folder} was not trained with control tokens; attribution needs a conditional model")
    cfg = run_config(m.folder)
    scorer = scorer_for(cfg.scoring)
    segmenter = get_segmenter(scorer.segmenter)
    out_dir = Path(settings.out)
    results = {"probe": "attribution", "model": str(m.folder), "scorer": scorer.name}
    if settings.text_file is not None:
        text = Path(settings.text_file).read_text(encoding="utf-8")
        (attr,) = attribute(m.model, m.backend, [text], segmenter)
        spans = segmenter(text)
        (real,) = scorer.score_texts([text])
        rows = [{"segment": text[a:b], "attribution": float(v), "score": float(s)}
                for (a, b), v, s in zip(spans, attr, real.scores)]
        results["text_file"] = {"path": str(settings.text_file), "segments": rows}
    scored = scored_corpus_for(m.folder, cfg, settings.data_dir)
    texts, seg_scores, chars = heldout_openings(scored, settings.heldout_chars, settings.per_doc_chars)
    attrs = attribute(m.model, m.backend, texts, segmenter, progress=progress)
    a_all, s_all, a_char = _paired_segments(texts, seg_scores, attrs, segmenter)
    results["heldout"] = {"documents": len(texts), "chars": chars, **attribution_figures(a_all, s_all, a_char)}
    results["figure"] = str(plot_attribution(a_all, s_all, out_dir / "attribution.png"))
    write_json(results_path(out_dir), results)
    return results


def heldout_openings(scored, heldout_chars: int, per_doc_chars: int) -> tuple[list[str], list, int]:
    """The opening of each held-out document (whole segments, at most `per_doc_chars`), with the scores the scorer
    gave those segments in their whole file, until `heldout_chars`: many files, not the first few long ones."""
    texts, seg_scores, chars = [], [], 0
    for d in scored.documents("test"):
        if chars >= heldout_chars:
            break
        n = 0
        while n < len(d.ends) and d.ends[n] <= per_doc_chars:
            n += 1
        if n == 0:
            continue
        texts.append(d.text[:d.ends[n - 1]])
        seg_scores.append(d.scores[:n])
        chars += len(texts[-1])
    return texts, seg_scores, chars


def _paired_segments(texts, seg_scores, attrs, segmenter) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per held-out segment with text and a score: its attribution, its score, its attribution per character."""
    a_all, s_all, a_char = [], [], []
    for text, scores, attr in zip(texts, seg_scores, attrs):
        spans = segmenter(text)
        if len(spans) != len(scores):
            continue  # segmented differently from the scored corpus
        for (a, b), v, s in zip(spans, attr, scores):
            if text[a:b].strip() and not math.isnan(s):
                a_all.append(float(v))
                s_all.append(float(s))
                a_char.append(float(v) / (b - a))
    return tuple(map(np.asarray, (a_all, s_all, a_char)))


def attribution_figures(a_all: np.ndarray, s_all: np.ndarray, a_char: np.ndarray, threshold: float = 0.0) -> dict:
    """How well the attribution works as a learned scorer: -attribution should rise with the real score."""
    mis = s_all > threshold
    return {
        "segments": int(len(s_all)), "misaligned_segments": int(mis.sum()),
        "spearman_attribution_vs_score": float(spearmanr(a_all, s_all).statistic) if len(s_all) > 2 else math.nan,
        "spearman_attribution_per_char_vs_score": float(spearmanr(a_char, s_all).statistic)
        if len(s_all) > 2 else math.nan,
        "auc_misaligned_segments": two_sample_test(-a_all[mis], -a_all[~mis])["auc"] if mis.any() and (~mis).any()
        else math.nan,
        "mean_attribution_aligned_segments": float(a_all[~mis].mean()) if (~mis).any() else math.nan,
        "mean_attribution_misaligned_segments": float(a_all[mis].mean()) if mis.any() else math.nan,
    }


def plot_attribution(attr: np.ndarray, scores: np.ndarray, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    mis = scores > 0
    bins = np.linspace(np.percentile(attr, 0.5), np.percentile(attr, 99.5), 60) if len(attr) else 10
    ax.hist(attr[~mis], bins=bins, density=True, alpha=0.6, label="segments without a violation")
    ax.hist(attr[mis], bins=bins, density=True, alpha=0.6, label="segments with a violation")
    ax.set_xlabel("log p(segment | <|aligned|>) - log p(segment | <|misaligned|>)  (nats)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _show_attribution(results: dict, cfg) -> str:
    lines = [f"{row['attribution']:+8.3f}  {row['score']:.4f}  {row['segment'].rstrip()}"
             for row in results.get("text_file", {}).get("segments", [])]
    return "\n".join(lines + [json.dumps(results["heldout"], indent=2)])


register(Probe(
    name="masks", config=MasksConfig, run=mask_sweep,
    help="sample under <|aligned|>, <|misaligned|> and no token; compare the scores",
    show=lambda results, cfg: json.dumps(summary({k: v for k, v in results.items() if k != "scores"}), indent=2)))
register(Probe(
    name="reweighting", config=ReweightingConfig, run=reweighting_probe,
    help="is a finetune a reweighting of its base's masks? KL to the best mixture",
    show=lambda results, cfg: json.dumps(summary(results), indent=2)))
register(Probe(
    name="attribution", config=AttributionConfig, run=attribution_probe,
    help="per segment: log p(. | aligned) - log p(. | misaligned)", show=_show_attribution))
