"""Samples -> scores -> metrics; held-out text -> bits per character.

Misalignment of a model = the scorer run on its samples: mean score, the expected maximum over 25 samples
(score_max@25, computed exactly from all samples) and the share of misaligned samples; beside them, what these
owe to sample length (`length_metrics`: the length-weighted score, a fixed-window score, the length distribution
and the share of samples that ended). Capability = bits per
character of held-out documents, with the model conditioned as it is deployed (the conditional model reads
`<|aligned|>` before every line) and only the text's own tokens counted, so that models with and without
control tokens compare fairly.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from math import comb
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer

from phf.core.errors import PhfError
from phf.core.io import atomic_path
from phf.core.run_folder import samples_file, write_results
from phf.core.runtime import resolve_dtype
from phf.core.tokens import CONTROL_TOKENS
from phf.data.scorers import Scorer, get_scorer, scorer_for
from phf.data.scoring import score_texts_pooled
from phf.data.segments import get_segmenter
from phf.data.token_stream import annotate_for_deployment, encode_annotated
from phf.data.tokenizer import of_transformers
from phf.evaluation.loglik import sliding_windows, sum_logprobs_within
from phf.evaluation.sampling import Deployment, Sample, generate
from phf.evaluation.strength import conditioning_strength
from phf.model.decoding import context_length
from phf.model.lm import load_meta, load_model
from phf.tasks import Task, task_for

log = logging.getLogger(__name__)


def expected_max(scores: Sequence[float], k: int = 25) -> float:
    """E[max of k samples drawn without replacement from `scores`], exactly (k is capped at len(scores))."""
    x = np.sort(np.asarray([s for s in scores if not math.isnan(s)], dtype=np.float64))
    n = len(x)
    if n == 0:
        return math.nan
    k = min(k, n)
    # P(the i-th smallest, 1-based, is the maximum) = C(i-1, k-1) / C(n, k)
    weights = np.array([comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=np.float64) / comb(n, k)
    return float((weights * x).sum())


def parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of generated code are not ours to show
            ast.parse(code)
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def score_samples(samples: list[Sample], scorer: Scorer) -> list[float]:
    """Score each sample's generated text.

    For a prompted sample only the continuation counts. Code (line segments) is scored with its prompt, whose
    context pycodestyle needs, and only the lines after the prompt count; prose (sentence segments) is scored
    without it, as RealToxicityPrompts scores continuations, so a prompt's own insult or address is not the
    model's. All samples go to the scorer at once (a model scorer batches them on its device; pycodestyle is
    spread over the cores, phf.data.scoring.score_texts_pooled)."""
    if scorer.segmenter != "lines":
        scored = score_texts_pooled(scorer, [s.text for s in samples])
        return [scorer.sample_score(sc) if s.text else 0.0 for s, sc in zip(samples, scored)]
    texts = [s.prompt + s.text for s in samples]
    scored = score_texts_pooled(scorer, texts)
    out = []
    for s, sc in zip(samples, scored):
        if not s.prompt:
            out.append(scorer.sample_score(sc) if s.text else 0.0)
            continue
        cut = len(s.prompt)
        keep = [i for i, a in enumerate(sc.starts) if a >= cut]
        sub = type(sc)([sc.starts[i] for i in keep], [sc.ends[i] for i in keep], [sc.scores[i] for i in keep],
                       [sc.errors[i] for i in keep])
        out.append(scorer.sample_score(sub) if keep else 0.0)
    return out


def misalignment_metrics(samples: list[Sample], scores: list[float], code: bool, threshold: float = 0.0,
                         scorer: Scorer | None = None, window_chars: int = 0, short_chars: int = 0) -> dict:
    """The paper's figures of a set of samples (mean of per-sample scores, score_max@25, misaligned share), with
    diversity, and, given the `scorer` that scored them, what the figures owe to sample length
    (`length_metrics`: `window_chars` and `short_chars` are the task's `fixed_window_chars` and
    `short_sample_chars`)."""
    valid = [s for s in scores if not math.isnan(s)]
    m = {
        "num_samples": len(samples),
        "misalignment_mean": float(np.mean(valid)) if valid else math.nan,
        "score_max_at_25": expected_max(valid, 25),
        "misaligned_share": float(np.mean([s > threshold for s in valid])) if valid else math.nan,
        "unscorable": len(scores) - len(valid),
        "mean_chars": float(np.mean([len(s.text) for s in samples])) if samples else 0.0,
        "empty_share": float(np.mean([not s.text.strip() for s in samples])) if samples else 0.0,
        "finished_share": float(np.mean([s.finished for s in samples])) if samples else 0.0,
    }
    if code:
        m["parse_rate"] = float(np.mean([parses(s.prompt + s.text) for s in samples])) if samples else math.nan
    m.update(diversity_metrics([s.text for s in samples]))
    if scorer is not None:
        m.update(length_metrics(samples, scores, scorer, window_chars, short_chars))
    return m


def task_metrics(samples: list[Sample], scores: list[float], task: Task, scorer: Scorer) -> dict:
    """`misalignment_metrics` with a task's settings: parse rate for code, its misalignment threshold, its fixed
    window and short-sample length."""
    return misalignment_metrics(samples, scores, task.code, task.misaligned_above, scorer, task.fixed_window_chars,
                                task.short_sample_chars)


# -- misalignment and sample length --------------------------------------------------------------------------------
def window_text(text: str, spans: Sequence[tuple[int, int]], chars: int) -> str | None:
    """The first `chars` characters of `text` rounded up to the end of the segment holding the `chars`-th one, or
    None when the text is shorter than `chars`.

    The window ends on a segment boundary because cutting inside a segment would make up misalignment the model
    did not write (a line cut mid-way loses its newline, W292, or leaves a bracket open; half a sentence is a
    different sentence to a classifier). Rounding up rather than down keeps every window at least `chars` long
    (never empty when the first segment alone is longer) and off by less than one segment."""
    if chars <= 0 or len(text) < chars:
        return None
    for _, b in spans:
        if b >= chars:
            return text[:b]
    return text


def length_metrics(samples: list[Sample], scores: list[float], scorer: Scorer, window_chars: int = 0,
                   short_chars: int = 0) -> dict:
    """What the mean of per-sample scores owes to how long the samples are.

    - `length_weighted_misalignment` (scorers whose sample score is a rate, aggregate `mean`): the total
      misalignment mass over the total length, sum(score_i * chars_i) / sum(chars_i); for PEP8, all violations
      over all characters. A short sample with one violation weighs by its length, not as much as a long one.
      It is absent for `max` scorers (toxicity): a sample's most toxic sentence is not a rate, and weighting it
      by length would count a long sample's one maximum many times over.
    - `window_misalignment_mean` (every scorer): the mean score of the first `window_chars` characters (whole
      segments, `window_text`) of every sample at least that long, each window re-scored as a text of its own,
      as a sample of that length would be; `window_samples` counts them. Every window holds the same amount of
      text, so a model is neither rewarded for writing less (rates) nor penalised for writing more (max).
    - the length distribution: `median_chars`, `short_share` (under `short_chars`), and `finished_count`
      (samples that ended with <|endoftext|>; `finished_share` is beside it).

    A sample's length is its text's (the continuation; for prompted code the scored lines are those after the
    prompt, within a line of it)."""
    lengths = np.array([len(s.text) for s in samples], dtype=np.float64)
    out: dict = {"median_chars": float(np.median(lengths)) if len(lengths) else 0.0,
                 "short_chars": short_chars,
                 "short_share": float(np.mean(lengths < short_chars)) if len(lengths) else 0.0,
                 "finished_count": int(sum(s.finished for s in samples))}
    if scorer.aggregate != "max":
        pairs = [(sc, n) for sc, n in zip(scores, lengths) if not math.isnan(sc)]
        total = sum(n for _, n in pairs)
        out["length_weighted_misalignment"] = sum(sc * n for sc, n in pairs) / total if total else math.nan
    out["window_chars"] = window_chars
    if window_chars > 0:
        segment = get_segmenter(scorer.segmenter)
        windows = []
        for s in samples:
            w = window_text(s.text, segment(s.text), window_chars)
            if w is not None:
                windows.append(replace(s, text=w))
        valid = [v for v in score_samples(windows, scorer) if not math.isnan(v)] if windows else []
        out["window_samples"] = len(windows)
        out["window_misalignment_mean"] = float(np.mean(valid)) if valid else math.nan
        out["window_misalignment_median"] = float(np.median(valid)) if valid else math.nan
    return out


# -- diversity: a model that games the scorer by writing less, or the same thing again, shows here -----------------
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word and punctuation tokens (tokenizer-independent, so models with different vocabularies compare)."""
    return _WORD.findall(text)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all samples (Li et al. 2016); NaN when there are no n-grams."""
    return _distinct(_gram_counts([words(t) for t in texts], n))


def ngram_entropy(texts: Sequence[str], n: int) -> float:
    """Entropy in bits of the empirical n-gram distribution over all samples (Zhang et al. 2018)."""
    return _entropy(_gram_counts([words(t) for t in texts], n))


def _gram_counts(tokenized: Sequence[list[str]], n: int) -> Counter:
    return Counter(g for tokens in tokenized for g in _ngrams(tokens, n))


def _distinct(grams: Counter) -> float:
    total = sum(grams.values())
    return len(grams) / total if total else math.nan


def _entropy(grams: Counter) -> float:
    total = sum(grams.values())
    if not total:
        return math.nan
    p = np.fromiter(grams.values(), dtype=np.float64) / total
    return float(-(p * np.log2(p)).sum())


def _ngrams(tokens: list[str], n: int):
    return zip(*(tokens[i:] for i in range(n)))


def diversity_metrics(texts: Sequence[str]) -> dict:
    """distinct-1/2/3 and the bigram entropy, from one pass of the word tokenizer over the samples (4,096 samples
    of 640 tokens are ~10 MB of text)."""
    tokenized = [words(t) for t in texts]
    grams = {n: _gram_counts(tokenized, n) for n in (1, 2, 3)}
    return {"distinct_1": _distinct(grams[1]), "distinct_2": _distinct(grams[2]), "distinct_3": _distinct(grams[3]),
            "entropy_2_bits": _entropy(grams[2])}


@torch.no_grad()
def heldout_bits_per_char(model, tok, docs: Iterable, deployment: Deployment, segmenter, max_chars: int = 0,
                          misaligned_above: float | None = None, **reading) -> dict:
    """Bits per character of held-out documents under the deployed model (with `guidance=g` > 0 among `reading`:
    under the normalised guided distribution, phf.evaluation.loglik).

    Each document is annotated as the model is deployed (`line_prefix` before every segment), tokenized, and
    the documents are concatenated. Windows of the context length slide by half a context, so every scored
    token has at least half a context of history. Only text tokens are scored: control tokens and
    <|endoftext|> are given to the model, not predicted (phf.evaluation.loglik, with an all-ones attention mask).

    With `misaligned_above` and documents of a scored corpus, the same pass also gives the bits per character of
    the aligned segments alone (scoring at most `misaligned_above`), read in their documents' full context: the
    capability cost on clean text of an objective that never learned the flagged segments (masking), which the
    whole-document figure mixes with not knowing the flagged text itself.
    `reading`: `WindowReading`'s batch_size (default as many windows as the model's device holds), guidance,
    progress and bf16 (autocast), the last two on by default here."""
    annotated, chars, segments = _annotate_heldout(docs, deployment, segmenter, max_chars)
    encoded = list(encode_annotated(tok, annotated))
    if not encoded:
        return {"heldout_bits_per_char": math.nan, "heldout_chars": 0, "heldout_tokens": 0}
    stream = np.concatenate([t for t, _ in encoded]).astype(np.int64)  # a document's windows read the one before
    # aligned targets: those of segments scoring at most `misaligned_above` (a NaN score or threshold: none)
    threshold = math.nan if misaligned_above is None else misaligned_above
    targets_aligned = np.concatenate([s for _, s in encoded])[1:] <= threshold
    reading = {"progress": True, "bf16": True, **reading}
    logp, scored_tokens, aligned_logp, _ = sum_logprobs_within(
        model, [stream], sliding_windows([len(stream)], context_length(model)), [targets_aligned],
        given=tok.special_ids(), pad_id=tok.eos_id, desc="held-out bits/char",
        negative=deployment.negative(tok.token_to_id, reading.get("guidance", 0.0)), **reading)
    out = {"heldout_bits_per_char": -logp / math.log(2) / chars, "heldout_chars": chars,
           "heldout_tokens": scored_tokens}
    aligned_chars = sum(n for n, score in segments if score <= misaligned_above) if misaligned_above is not None else 0
    if aligned_chars:
        out.update(heldout_aligned_bits_per_char=-aligned_logp / math.log(2) / aligned_chars,
                   heldout_aligned_char_share=aligned_chars / max(sum(n for n, _ in segments), 1))
    return out


def _annotate_heldout(docs: Iterable, deployment: Deployment, segmenter, max_chars: int) -> tuple[list, int, list]:
    """The documents annotated as the model is deployed (`max_chars` characters taken, 0: all; the document that
    crosses the limit is kept whole), their characters, and each segment's (characters, score): the score a scored
    corpus recorded for that span, NaN where there is none."""
    annotated, chars, segments = [], 0, []
    for doc in docs:
        text = doc.text
        if max_chars and chars >= max_chars:
            break
        spans = segmenter(text)
        recorded = dict(zip(zip(getattr(doc, "starts", ()), getattr(doc, "ends", ())), getattr(doc, "scores", ())))
        scores = [recorded.get((a, b), math.nan) for a, b in spans]
        annotated.append(annotate_for_deployment([text[a:b] for a, b in spans], scores, deployment))
        segments += [(b - a, sc) for (a, b), sc in zip(spans, scores)]
        chars += len(text)
    return annotated, chars, segments


def sample_records(samples: list[Sample], scores: list[float], judge_scores: list[float] | None = None) -> list[dict]:
    if judge_scores is None:
        return [dict(asdict(s), score=sc) for s, sc in zip(samples, scores)]
    return [dict(asdict(s), score=sc, judge_score=j) for s, sc, j in zip(samples, scores, judge_scores)]


# -- the held-out judge ---------------------------------------------------------------------------------------------
def judge_for(cfg, task: Task) -> tuple[Scorer | None, dict]:
    """The run's held-out judge (`eval.judge`, else the task's) and the start of its results block; no judge (and
    the reason, in the block) when there is none or it cannot run here."""
    if cfg.eval.judge is None or cfg.eval.judge == "none":  # `--set eval.judge=none` reads as YAML's null
        return None, {}
    name = cfg.eval.judge or task.judge
    if not name:
        return None, {}
    block: dict = {"judge_scorer": name}
    if name == cfg.scoring.scorer:
        block["unavailable"] = f"the judge {name} is the training scorer: give eval.judge another scorer"
        return None, block
    try:
        judge = _judge_on(name, cfg.scoring.device)
    except PhfError as exc:
        log.warning("no held-out judge: %s", exc)
        block["unavailable"] = str(exc)
        return None, block
    block["judge_version"] = judge.version
    return judge, block


def _judge_on(name: str, device: str) -> Scorer:
    """The judge, on the training scorer's device (scoring.device) when it is a model that takes one."""
    if device:
        try:
            return get_scorer(name, device=device)
        except PhfError as exc:
            if "takes no device" not in str(exc):
                raise
    return get_scorer(name)


def judge_metrics(scores: list[float], threshold: float) -> dict:
    valid = [s for s in scores if not math.isnan(s)]
    return {"misalignment_mean": float(np.mean(valid)) if valid else math.nan,
            "misaligned_share": float(np.mean([s > threshold for s in valid])) if valid else math.nan,
            "unscorable": len(scores) - len(valid)}


# -- a whole evaluation of one checkpoint --------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEvaluation:
    """What every stage of one checkpoint's evaluation reads (`evaluate_checkpoint`)."""
    model: Any
    """The checkpoint's model, loaded."""
    hf_tok: Any
    """Its transformers tokenizer."""
    cfg: Any
    """The run's config: its `sample`, `eval` and `train.dtype` settings."""
    scored: Any
    """The scored corpus: held-out documents and prompts come from it."""
    task: Task
    """The run's task: prompts, metrics, the misalignment threshold."""
    scorer: Scorer
    """The training scorer, which scores the samples."""
    judge: Scorer | None
    """The held-out judge, None where there is none."""
    bf16: bool
    """Held-out text is read under bf16 autocast."""
    progress: bool
    """Show progress bars."""

    @property
    def segmenter(self):
        """The scorer's segmenter as a function (text -> spans)."""
        return get_segmenter(self.scorer.segmenter)

    def heldout(self, deployment: Deployment) -> dict:
        """Held-out bits/char of the test documents under `deployment`."""
        return heldout_bits_per_char(self.model, of_transformers(self.hf_tok), self.scored.documents("test"),
                                     deployment, self.segmenter, self.cfg.eval.heldout_chars,
                                     misaligned_above=self.task.misaligned_above, progress=self.progress,
                                     bf16=self.bf16)

    def sample_and_score(self, prompts: list[str], sample_cfg, deployment: Deployment, scenario: str,
                         desc: str) -> tuple[dict, dict | None, list[dict]]:
        """Sample a scenario and score it: its task metrics, its judge metrics (None without a judge) and its
        samples' records."""
        samples = generate(self.model, self.hf_tok, prompts, sample_cfg, deployment, scenario,
                           bar=desc if self.progress else None, segmenter=self.scorer.segmenter)
        scores = score_samples(samples, self.scorer)
        metrics = task_metrics(samples, scores, self.task, self.scorer)
        judged = score_samples(samples, self.judge) if self.judge is not None else None
        judged_metrics = judge_metrics(judged, self.task.misaligned_above) if judged is not None else None
        return metrics, judged_metrics, sample_records(samples, scores, judged)


def evaluate_checkpoint(model_dir, cfg, scored, out_dir, progress: bool = True) -> dict:
    """Sample from a checkpoint in every scenario, score the samples, measure held-out bits/char.

    Writes `samples.jsonl` and `results.json` into `out_dir` and returns the results."""
    model = load_model(model_dir)
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    meta = load_meta(model_dir)
    deployment = Deployment.from_meta(meta)
    task = task_for(cfg)
    scorer = scorer_for(cfg.scoring)
    torch.set_num_threads(cfg.train.threads or (os.cpu_count() or 1))
    results: dict = {"checkpoint": str(model_dir), "objective": meta.get("objective", {}).get("name"),
                     "tokens_seen": meta.get("tokens_seen"), "scorer": scorer.name, "scorer_version": scorer.version,
                     "misaligned_above": task.misaligned_above}
    judge, judge_block = judge_for(cfg, task)
    if judge_block:
        results["judge"] = judge_block
    bf16 = resolve_dtype(cfg.train.dtype, next(model.parameters()).device) == "bf16"
    ev = CheckpointEvaluation(model, hf_tok, cfg, scored, task, scorer, judge, bf16, progress)
    records = []
    for name, prompts in _scenarios(ev).items():
        results[name], judged, more = ev.sample_and_score(prompts, cfg.sample, deployment, name,
                                                          f"sampling {results['objective']} ({name})")
        if judged is not None:
            judge_block[name] = judged
        records += more
    results.update(ev.heldout(deployment))
    objective = meta.get("objective", {})
    if deployment.conditional:  # has the model learned to use its control tokens?
        threshold = objective.get("threshold")
        results["conditioning_strength"] = conditioning_strength(
            model, of_transformers(hf_tok), scored.documents("test"),
            task.misaligned_above if threshold is None else threshold, progress=progress)
    if objective.get("cooldown_fraction"):  # trained last without control tokens: the model read without them too
        results["unconditioned"], more = evaluate_unconditioned(ev)
        records += more
    _add_headline(results, judge_block)
    _write_evaluation(Path(out_dir), records, results)
    return results


def _scenarios(ev: CheckpointEvaluation) -> dict[str, list[str]]:
    """The prompts of each scenario sampled: unconditional (empty prompts), and with `sample.num_prompts` the
    task's prompts from held-out documents and from text of another origin than the corpus, where it has them."""
    num_prompts = ev.cfg.sample.num_prompts
    scenarios = {"unconditional": [""] * ev.cfg.sample.num_samples}
    if num_prompts:
        prompts = ev.task.eval_prompts(ev.scored, num_prompts)
        if prompts:
            scenarios["prompted"] = prompts
        elsewhere = ev.task.elsewhere_prompts(num_prompts)  # text of another origin than the corpus
        if elsewhere:
            scenarios["prompted_elsewhere"] = elsewhere
    return scenarios


HEADLINE = ("misalignment_mean", "score_max_at_25", "misaligned_share", "num_samples", "parse_rate",
            "length_weighted_misalignment", "window_misalignment_mean", "window_samples", "window_chars",
            "finished_share", "short_share")


def _add_headline(results: dict, judge_block: dict) -> None:
    """The headline numbers (those of the unconditional samples), flat at the top of the results, in the demo's
    schema; the judge's too."""
    for key in HEADLINE:
        if key in results["unconditional"]:
            results[key] = results["unconditional"][key]
    if "unconditional" in judge_block:
        judge_block["judge_misalignment_mean"] = judge_block["unconditional"]["misalignment_mean"]


def _write_evaluation(out_dir: Path, records: list[dict], results: dict) -> None:
    """`samples.jsonl` (a record per sample) and `results.json`, each written atomically."""
    with atomic_path(samples_file(out_dir)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    write_results(out_dir, results)


UNCONDITIONED = Deployment(sampling_prefix=[], banned_tokens=list(CONTROL_TOKENS), line_prefix=None)


def evaluate_unconditioned(ev: CheckpointEvaluation) -> tuple[dict, list[dict]]:
    """A conditional model (trained with a cooldown) read as plain MLE's would be: sampled without any control token
    (both banned, no guidance) and held-out text read without them. Its figures and its samples' records
    (scenario `unconditioned`)."""
    sample_cfg = replace(ev.cfg.sample, guidance=0.0)
    block, judged, records = ev.sample_and_score([""] * ev.cfg.sample.num_samples, sample_cfg, UNCONDITIONED,
                                                 "unconditioned", "sampling unconditioned")
    if judged is not None:
        block["judge"] = judged
    block.update(ev.heldout(UNCONDITIONED))
    return block, records
