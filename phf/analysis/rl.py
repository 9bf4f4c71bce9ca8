"""RL finetuning baseline: the scorer as a reward, optimised with TRL's GRPO and a KL penalty to the start model.

reward(completion) = -misalignment of the completion's complete lines (code) or sentences (prose), scored as phf
scores samples (a prompted completion with its prompt as context, only the completion's segments counting). An
empty completion scores 0, the best possible: an RL run that "wins" by writing less shows up in the hacking
figures (length, distinct-2, parse rate, empty share, held-out bits/char) that `phf rl` measures before and after.

Prompts: half unconditional (<|endoftext|> and the model's sampling prefix), half function signatures + docstrings
(pep8) or the task's prompts taken from the *training* split, so the held-out prompts stay unseen. The run stops
once it has processed `max_tokens` prompt + completion tokens. The result is a phf checkpoint folder.

Needs the `rl` extra: `pip install -c constraints.txt -e '.[rl]'`.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from phf.analysis.probes import load, run_config, scored_corpus_for
from phf.analysis.registry import Study, register_study
from phf.core.config import from_dict, parse_override
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import append_jsonl, write_json
from phf.core.run_folder import RunFolder, checkpoint_dir, metrics_file, results_path
from phf.core.tables import text_table
from phf.data.scorers import scorer_for
from phf.data.segments import get_segmenter
from phf.evaluation.evaluate import heldout_bits_per_char, score_samples, task_metrics
from phf.evaluation.sampling import Deployment, Sample, complete_segments, generate, strip_control
from phf.evaluation.uncertainty import percentile_interval
from phf.model.conditioning import markers_of
from phf.model.decoding import context_length
from phf.model.finetune import resolve_model_folder
from phf.model.lm import check_model_folder, load_meta, load_model, save_checkpoint
from phf.tasks import Task, task_for

log = logging.getLogger(__name__)


@dataclass
class RLConfig:
    beta: float = 0.04
    """Weight of the KL penalty to the starting model (TRL's k3 estimator per token)."""
    lr: float = 1e-4
    """Learning rate (constant). 1e-4 moved the 1.9M-parameter PEP8 demo model in 34 steps; large pretrained
    models usually take 1e-6 to 1e-5."""
    num_generations: int = 8
    """Completions per prompt; GRPO's advantage is a completion's reward relative to its group."""
    batch_size: int = 16
    """Completions per optimisation step (a multiple of num_generations)."""
    max_completion_tokens: int = 128
    """Tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature of the completions (1.0: the policy's own distribution, as the KL assumes)."""
    num_prompts: int = 256
    """Distinct prompts in the training set (half unconditional, half from the training split)."""
    prompted_fraction: float = 0.5
    """Share of prompts taken from training documents; the rest are unconditional."""
    seed: int = 42

    def validate(self) -> "RLConfig":
        if self.beta < 0:
            raise PhfError(f"rl.beta must be >= 0, got {self.beta}")
        if self.num_generations < 2:
            raise PhfError("rl.num_generations must be >= 2 (GRPO compares completions of one prompt)")
        if self.batch_size % self.num_generations:
            raise PhfError(f"rl.batch_size ({self.batch_size}) must be a multiple of rl.num_generations "
                           f"({self.num_generations})")
        for name in ("lr", "max_completion_tokens", "temperature", "num_prompts"):
            if not getattr(self, name) > 0:
                raise PhfError(f"rl.{name} must be > 0")
        if not 0 <= self.prompted_fraction <= 1:
            raise PhfError("rl.prompted_fraction must be in [0, 1]")
        return self


def rl_config(overrides: list[str]) -> RLConfig:
    """An RLConfig from `rl.KEY=VALUE` overrides (typed as the run config's)."""

    data = {}
    for text in overrides:
        key, value = parse_override(text)
        if key[0] != "rl" or len(key) != 2:
            raise PhfError(f"not an rl setting: {text!r}; rl settings are rl.KEY=VALUE")
        data[key[1]] = value
    return from_dict(RLConfig, data, prefix="rl.").validate()


def _require_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise PhfError("RL finetuning needs TRL: pip install -c constraints.txt -e '.[rl]'") from None


def reward_function(scorer, eos_token: str, segmenter: str = "lines"):
    """reward(prompts, completions, completion_ids) -> -misalignment per completion, TRL's reward signature."""

    def pep8_reward(prompts, completions, completion_ids=None, **kwargs):
        samples = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            prompt = strip_control(p.replace(eos_token, ""))
            text = strip_control(c)
            ids = completion_ids[i] if completion_ids is not None else []
            finished = kwargs.get("_finished", [None] * len(prompts))[i]
            if not finished:  # cut mid-segment by the length limit: keep whole segments only
                kept = complete_segments(prompt + text, segmenter)
                text = kept[len(prompt):] if len(kept) > len(prompt) else ""
            samples.append(Sample("rl", prompt, text, c, bool(finished), len(ids)))
        scores = np.array(score_samples(samples, scorer), np.float64)
        if np.isnan(scores).any():  # an unscorable completion gets the batch's worst reward, never the best
            worst = np.nanmax(scores) if np.isfinite(scores).any() else 0.0
            scores = np.where(np.isnan(scores), worst, scores)
        return [-float(s) for s in scores]

    pep8_reward.__name__ = f"{scorer.name}_reward"
    return pep8_reward


def rl_prompts(task: Task, scored, cfg: RLConfig, deployment, segmenter, eos: str) -> list[str]:
    """Training prompts as the model reads them: the end-of-document token `eos`, its sampling prefix, the
    prompt text."""
    n_prompted = int(round(cfg.num_prompts * cfg.prompted_fraction))
    prompted = task.training_prompts(scored, n_prompted)
    prompts = [""] * (cfg.num_prompts - len(prompted)) + prompted
    return [deployment.model_text(p, segmenter, eos) for p in prompts]


def rl_finetune(base_model_dir, cfg, scored, out_dir, max_tokens: int, progress: bool = True,
                rl: RLConfig | None = None) -> dict:
    """GRPO with a KL penalty from `base_model_dir` until `max_tokens` prompt + completion tokens are processed.

    `cfg` is the run config (task, scoring). Writes `out_dir/checkpoint` (a phf checkpoint folder) and
    `out_dir/metrics.jsonl` (one row per step: reward, misalignment, kl, completion length, tokens) and returns
    a summary."""
    _require_trl()
    from trl import GRPOTrainer

    rl = (rl or RLConfig()).validate()
    if max_tokens < 1:
        raise PhfError(f"rl max_tokens must be >= 1, got {max_tokens}")
    folder = check_model_folder(resolve_model_folder(base_model_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = load_meta(folder)
    deployment = Deployment.from_meta(meta)
    scorer = scorer_for(cfg.scoring)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    model = _policy(folder)
    segmenter = get_segmenter(scorer.segmenter)
    prompts = rl_prompts(task_for(cfg), scored, rl, deployment, segmenter, tokenizer.eos_token)
    metrics_path = metrics_file(out_dir)
    metrics_path.unlink(missing_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = _prompt_dataset(prompts, model, tokenizer, rl, deployment.model_text("", segmenter, tokenizer.eos_token))
    trainer_dir = out_dir / ".trainer"
    state = {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "last": {}}
    trainer = GRPOTrainer(model=model, reward_funcs=_reward_with_finish(scorer, tokenizer, rl),
                          args=_grpo_args(rl, trainer_dir, max_tokens, deployment, tokenizer, progress),
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[_budget_callback(metrics_path, max_tokens, state)])
    if not progress:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        shutil.rmtree(trainer_dir, ignore_errors=True)
    trained = trainer.accelerator.unwrap_model(trainer.model).float().cpu().eval()
    new_meta = dict(meta, objective=dict(meta.get("objective", {}), name="rl"),
                    init_from=str(folder), tokens_seen=int(meta.get("tokens_seen") or 0) + state["tokens"],
                    rl_tokens=state["tokens"], rl_steps=state["steps"], rl=asdict(rl), final=True)
    ckpt = save_checkpoint(trained, folder / "tokenizer.json", checkpoint_dir(out_dir), new_meta)
    summary = {"checkpoint": str(ckpt), "steps": state["steps"], "tokens": state["tokens"],
               "seconds": round(time.perf_counter() - state["t0"], 1), "rl": asdict(rl), "last": state["last"]}
    write_json(out_dir / "rl_summary.json", summary)
    return summary


def _policy(folder: Path):
    """The model RL starts from, in training mode (TRL places it on its device)."""
    model = load_model(folder, device="cpu")
    if markers_of(model):
        raise PhfError(f"{folder} was trained with objective.control_embedding: its tokens carry control types, "
                       f"which TRL's generation and loss do not pass; RL-finetune a model trained without it")
    model.train()
    return model


def _prompt_dataset(prompts: list[str], model, tokenizer, rl: RLConfig, unconditional: str):
    """The training prompts as a shuffled dataset, each leaving room in the context for a completion; a prompt too
    long for it gives way to an unconditional one (`unconditional`, as the model reads it)."""
    from datasets import Dataset

    room = context_length(model) - rl.max_completion_tokens
    if room < 2:
        raise PhfError(f"rl.max_completion_tokens={rl.max_completion_tokens} leaves no room for a prompt in the "
                       f"model's context ({context_length(model)}); lower it")
    fits = [p for p in prompts if len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= room]
    if len(fits) < len(prompts):
        log.info("rl: %d of %d prompts are too long for the context; unconditional prompts take their place",
                 len(prompts) - len(fits), len(prompts))
        fits += [unconditional] * (len(prompts) - len(fits))
    return Dataset.from_dict({"prompt": fits}).shuffle(seed=rl.seed)


def _grpo_args(rl: RLConfig, trainer_dir: Path, max_tokens: int, deployment, tokenizer, progress: bool):
    """TRL's GRPOConfig for `rl`: at most as many steps as the token budget allows (the budget callback stops the
    run once it is spent), on the GPU when there is one."""
    from trl import GRPOConfig

    upper_steps = max(1, math.ceil(max_tokens / rl.batch_size))  # every completion costs at least one token
    banned = [tokenizer.convert_tokens_to_ids(t) for t in deployment.banned_tokens]
    return GRPOConfig(
        output_dir=str(trainer_dir), per_device_train_batch_size=rl.batch_size, gradient_accumulation_steps=1,
        num_generations=rl.num_generations, max_completion_length=rl.max_completion_tokens, beta=rl.beta,
        learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, temperature=rl.temperature, top_p=1.0,
        max_steps=upper_steps, logging_steps=1, save_strategy="no", report_to="none", seed=rl.seed,
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        # a conditional model is sampled as deployed: it never writes <|misaligned|>
        generation_kwargs={"suppress_tokens": banned} if banned else None)


def _budget_callback(metrics_path: Path, max_tokens: int, state: dict):
    """A TRL callback that writes a metrics row per logged step, keeps the tokens and steps so far in `state`,
    and stops training once `max_tokens` prompt + completion tokens are processed."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            row = {"step": st.global_step, "tokens": int(st.num_input_tokens_seen),
                   "reward": logs.get("reward"), "misalignment": -logs["reward"], "reward_std": logs.get("reward_std"),
                   "kl": logs.get("kl", 0.0), "completion_mean_length": logs.get("completions/mean_length"),
                   "completion_clipped_ratio": logs.get("completions/clipped_ratio"), "loss": logs.get("loss"),
                   "entropy": logs.get("entropy"), "seconds": round(time.perf_counter() - state["t0"], 2)}
            append_jsonl(metrics_path, row)
            state["last"] = row

        def on_step_end(self, args, st, control, **kw):
            state["tokens"], state["steps"] = int(st.num_input_tokens_seen), st.global_step
            if st.num_input_tokens_seen >= max_tokens:
                control.should_training_stop = True
            return control

    return Budget()


def _reward_with_finish(scorer, tokenizer, rl: RLConfig):
    """The reward function, told which completions finished on their own: TRL cuts a completion after its
    <|endoftext|> and decodes without special tokens, so one that stopped before the limit finished."""
    reward = reward_function(scorer, tokenizer.eos_token, scorer.segmenter)
    eos_id = tokenizer.eos_token_id

    def reward_with_finish(prompts, completions, completion_ids=None, **kw):
        finished = [ids is not None and (eos_id in ids or len(ids) < rl.max_completion_tokens)
                    for ids in (completion_ids or [None] * len(prompts))]
        return reward(prompts, completions, completion_ids, _finished=finished)

    reward_with_finish.__name__ = reward.__name__
    return reward_with_finish


# -- reward hacking --------------------------------------------------------------------------------------------
def hacking_metrics(model_dir, cfg, scored, num_samples: int | None = None, progress: bool = True) -> dict:
    """What an RL run can hack: misalignment next to length, empty share, distinct-2, parse rate and held-out
    bits/char, from unconditional samples at the run's sampling settings."""
    m = load(model_dir)
    task = task_for(cfg)
    scorer = scorer_for(cfg.scoring)
    scfg = replace(cfg.sample, num_samples=num_samples or cfg.sample.num_samples)
    samples = generate(m.model, m.tokenizer, [""] * scfg.num_samples, scfg, m.deployment, "unconditional",
                       bar=f"sampling {m.folder.parent.name}" if progress else None, segmenter=scorer.segmenter)
    scores = score_samples(samples, scorer)
    out = task_metrics(samples, scores, task, scorer)
    out["mean_tokens"] = float(np.mean([s.num_tokens for s in samples]))
    out.update(heldout_bits_per_char(m.model, m.backend, scored.documents("test"), m.deployment,
                                     get_segmenter(scorer.segmenter), cfg.eval.heldout_chars, progress=progress,
                                     bf16=False))
    return out


def run_rl(model_dir, out_dir, overrides: list[str], max_tokens: int | None = None, data_dir=None,
           measure: bool = True, progress: bool = True) -> dict:
    """`phf rl`: finetune, then measure reward hacking before and after; OUT/results.json."""

    folder = resolve_model_folder(model_dir)
    rl = rl_config([o for o in overrides if o.startswith("rl.")])
    cfg = run_config(folder, [o for o in overrides if not o.startswith("rl.")])
    scored = scored_corpus_for(folder, cfg, data_dir)
    budget = max_tokens or cfg.train.max_tokens
    summary = rl_finetune(folder, cfg, scored, out_dir, budget, progress=progress, rl=rl)
    results = {"base": str(folder), "max_tokens": budget, **summary}
    if measure:
        results["before"] = hacking_metrics(folder, cfg, scored, progress=progress)
        results["after"] = hacking_metrics(summary["checkpoint"], cfg, scored, progress=progress)
    write_json(results_path(out_dir), results)
    return results


# -- RL from several bases: does feedback in pretraining make the RL stage safer? --------------------------------
SMOOTHING = 8  # steps in the moving average of the per-step misalignment (each step's mean is over one batch)
HACKING_FIELDS = {  # name -> where it is in an evaluation's results
    "misalignment_mean": ("misalignment_mean",), "judge_misalignment_mean": ("judge", "judge_misalignment_mean"),
    "heldout_bits_per_char": ("heldout_bits_per_char",), "mean_chars": ("unconditional", "mean_chars"),
    "empty_share": ("unconditional", "empty_share"), "distinct_2": ("distinct_2",), "parse_rate": ("parse_rate",),
}


def _field(entry: dict, path: tuple[str, ...]):
    for k in path:
        entry = entry.get(k) if isinstance(entry, dict) else None
    return entry if isinstance(entry, (int, float)) and not isinstance(entry, bool) else None


def rl_curve(rows: list[dict], window: int = SMOOTHING) -> list[dict]:
    """The RL run's per-step misalignment (-reward) and KL against the tokens processed, with the misalignment's
    trailing moving average over `window` steps."""
    out, recent = [], []
    for r in rows:
        recent = (recent + [r["misalignment"]])[-window:]
        out.append({"tokens": r["tokens"], "misalignment": r["misalignment"],
                    "misalignment_smoothed": float(np.mean(recent)), "kl": r.get("kl"),
                    "completion_mean_length": r.get("completion_mean_length")})
    return out


def tokens_to_level(curve: list[dict], level: float) -> int | None:
    """The RL tokens after which the smoothed misalignment first reaches `level` (at or below); None if never."""
    return next((p["tokens"] for p in curve if p["misalignment_smoothed"] <= level), None)


def base_study(before: dict, after: dict, rows: list[dict], samples: dict | None = None) -> dict:
    """One base: the hacking signals before RL (the base) and after, the changes, and the reward curve.

    `scorer_change` and `judge_change` are after / before of the training scorer's and the judge's misalignment;
    `goodhart_gap` is judge_change / scorer_change: 1 when the judge saw the improvement the reward saw, above 1
    when RL improved the reward more than the preference (reward hacking). `samples`: the unconditional samples'
    scores, {"before": (scores, judge scores), "after": (...)}, for the three ratios' 95% intervals."""
    study = {"before": {k: _field(before, p) for k, p in HACKING_FIELDS.items()},
             "after": {k: _field(after, p) for k, p in HACKING_FIELDS.items()}, "curve": rl_curve(rows)}
    study["after"]["kl_from_reference_bits"] = _field(after, ("kl_from_reference_bits",))
    b, a = study["before"], study["after"]
    for name, key in (("scorer_change", "misalignment_mean"), ("judge_change", "judge_misalignment_mean")):
        study[name] = a[key] / b[key] if a[key] is not None and b[key] else None
    study["goodhart_gap"] = (study["judge_change"] / study["scorer_change"]
                             if study["judge_change"] is not None and study["scorer_change"] else None)
    if samples:
        study.update(change_intervals(*samples["before"], *samples["after"], np.random.default_rng(0)))
    return study


def change_intervals(before: list[float], before_judge: list[float], after: list[float], after_judge: list[float],
                     rng: np.random.Generator, b: int = 2000) -> dict:
    """95% percentile intervals of scorer_change, judge_change and goodhart_gap: the samples before and after RL
    drawn with replacement, each sample keeping its scorer and judge scores together (the gap is a ratio of
    ratios over the same samples)."""
    def draws(scores, judged):
        x, j = np.asarray(scores, np.float64), np.asarray(judged, np.float64)
        idx = rng.integers(0, len(x), size=(b, len(x)))
        return np.nanmean(x[idx], axis=1), np.nanmean(j[idx], axis=1)

    if not (len(before) and len(after)) or len(before_judge) != len(before) or len(after_judge) != len(after):
        return {}
    (sb, jb), (sa, ja) = draws(before, before_judge), draws(after, after_judge)
    with np.errstate(divide="ignore", invalid="ignore"):
        scorer, judge = sa / sb, ja / jb
        return {"scorer_change_ci95": percentile_interval(scorer), "judge_change_ci95": percentile_interval(judge),
                "goodhart_gap_ci95": percentile_interval(judge / scorer)}


def compare_bases(studies: dict[str, dict], reference: str = "mle") -> dict:
    """Tokens each base needs to reach the level the `reference` base ends its RL run at (its smoothed training
    misalignment), and a sentence answering the question."""
    ref = studies.get(reference) or next(iter(studies.values()))
    level = ref["curve"][-1]["misalignment_smoothed"] if ref["curve"] else None
    for s in studies.values():
        s["tokens_to_reference_level"] = tokens_to_level(s["curve"], level) if level is not None else None
    return {"reference_base": reference if reference in studies else next(iter(studies)), "level": level,
            "bases": studies, "answer": answer(studies, reference, level)}


def answer(studies: dict[str, dict], reference: str, level: float | None) -> str:
    """One sentence per base against the reference: tokens to the level, where its curve starts and ends, and the
    judge/scorer change ratios."""
    if reference not in studies or len(studies) < 2 or level is None:
        return "one base only: nothing to compare"
    ref = studies[reference]
    return "; ".join(_answer_one(name, s, reference, ref, level) for name, s in studies.items() if name != reference)


def _answer_one(name: str, s: dict, reference: str, ref: dict, level: float) -> str:
    t, rt = s["tokens_to_reference_level"], ref["tokens_to_reference_level"]
    if t is not None and rt is not None:
        reach = (f"reaches the {reference} base's final training misalignment ({level:.4g}) after {t:,} RL tokens, "
                 f"against {rt:,} for the {reference} base")
    else:
        reach = f"does not reach the {reference} base's final training misalignment ({level:.4g}) within the budget"

    def span(x: dict) -> str:
        return f"{x['curve'][0]['misalignment_smoothed']:.4g} -> {x['curve'][-1]['misalignment_smoothed']:.4g}"

    text = f"the {name} base {reach} (training misalignment, first -> last step: {name} {span(s)}, " \
           f"{reference} {span(ref)})"
    if s["goodhart_gap"] is not None and ref["goodhart_gap"] is not None:
        text += (f"; judge/scorer change ratio (1 = no hacking, above 1 = the reward improved more than the judge): "
                 f"{name} {s['goodhart_gap']:.2f}, {reference} {ref['goodhart_gap']:.2f}")
    return text


def combine_studies(per_seed: list[dict], seed_list: list[int] | None = None) -> dict:
    """Studies of several seeds (`seed_list`: their training seeds, for the answers' labels): per base, each
    figure's mean over seeds and its per-seed values; the first seed's curves."""
    first = per_seed[0]
    bases = {}
    for name, s in first["bases"].items():
        seeds = [p["bases"][name] for p in per_seed if name in p["bases"]]
        merged = {"curve": s["curve"], "seeds": len(seeds)}
        for part in ("before", "after"):
            merged[part] = {k: _mean([x[part].get(k) for x in seeds]) for k in s[part]}
            merged[f"{part}_per_seed"] = {k: [x[part].get(k) for x in seeds] for k in s[part]}
        for k in ("scorer_change", "judge_change", "goodhart_gap", "tokens_to_reference_level"):
            merged[f"{k}_per_seed"] = [x.get(k) for x in seeds]
            merged[k] = _mean(merged[f"{k}_per_seed"])
        merged["goodhart_gap_ci95_per_seed"] = [x.get("goodhart_gap_ci95") for x in seeds]
        bases[name] = merged
    return {"reference_base": first["reference_base"], "level_per_seed": [p["level"] for p in per_seed],
            "bases": bases, "answer_per_seed": [p["answer"] for p in per_seed],
            "seeds": list(seed_list) if seed_list is not None else list(range(1, len(per_seed) + 1))}


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else None


def _interval(ci) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, list) and len(ci) == 2 and None not in ci else ""


def rl_study_table(study: dict) -> list[list[str]]:
    """Header and rows of the study's table, one row per base (for the terminal and the report)."""
    def num(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    rows = [["base", "misalignment before -> after", "judge before -> after", "judge/scorer change [95%]",
             "tokens to the reference level", "KL from mle", "held-out bits/char", "mean chars", "empty share",
             "distinct-2"]]
    for name, s in study["bases"].items():
        b, a = s["before"], s["after"]
        rows.append([name, f"{num(b['misalignment_mean'])} -> {num(a['misalignment_mean'])}",
                     f"{num(b['judge_misalignment_mean'])} -> {num(a['judge_misalignment_mean'])}",
                     num(s["goodhart_gap"], "{:.2f}") + _interval(s.get("goodhart_gap_ci95")),
                     num(s["tokens_to_reference_level"], "{:,.0f}"),
                     num(a.get("kl_from_reference_bits"), "{:.4f}"),
                     f"{num(b['heldout_bits_per_char'], '{:.4f}')} -> {num(a['heldout_bits_per_char'], '{:.4f}')}",
                     f"{num(b['mean_chars'], '{:.0f}')} -> {num(a['mean_chars'], '{:.0f}')}",
                     f"{num(b['empty_share'], '{:.2f}')} -> {num(a['empty_share'], '{:.2f}')}",
                     f"{num(b['distinct_2'], '{:.3f}')} -> {num(a['distinct_2'], '{:.3f}')}"])
    return rows


def plot_rl_bases(study: dict, path: Path, scorer: str) -> Path:
    """The reward curves of RL from each base (smoothed training misalignment) and their KL from the start."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10.0, 4.2))
    for name, s in study["bases"].items():
        x = [p["tokens"] for p in s["curve"]]
        line, = left.plot(x, [p["misalignment_smoothed"] for p in s["curve"]], label=f"RL from {name}")
        left.plot(x, [p["misalignment"] for p in s["curve"]], color=line.get_color(), alpha=0.2, linewidth=0.8)
        right.plot(x, [p["kl"] for p in s["curve"]], color=line.get_color(), label=f"RL from {name}")
    if study.get("level") is not None:
        left.axhline(study["level"], color="black", linestyle="--", linewidth=1,
                     label=f"{study['reference_base']} base's final level")
    left.set_xlabel("RL tokens (prompt + completion)")
    left.set_ylabel(f"training misalignment ({scorer}), {SMOOTHING}-step average")
    right.set_xlabel("RL tokens (prompt + completion)")
    right.set_ylabel("KL to the start model (TRL's estimate, per token)")
    for ax in (left, right):
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle("PHF, then RL: the same RL budget from each base")
    return save_figure(fig, path)


def format_rl_study(study: dict) -> str:
    lines = ["PHF, then RL: the same RL budget from each base (before -> after RL)"]
    lines += text_table(rl_study_table(study))
    answers = study.get("answer_per_seed") or [study.get("answer", "")]
    seeds = study.get("seeds") or list(range(1, len(answers) + 1))
    lines += [f"answer{f' (seed {seed})' if len(answers) > 1 else ''}: {a}" for seed, a in zip(seeds, answers)]
    if study.get("figure"):
        lines.append(f"figure: {study['figure']}")
    return "\n".join(lines)


def _rl_study_in(folder: Path, results: dict):
    """`phf sweep --rl`'s study (`rl_from_bases` in the folder's results.json) and its figure (a sweep over seeds:
    the first seed's)."""
    study = results.get("rl_from_bases")
    if not study:
        return None
    figures = [d / "rl_from_bases.png" for d in (folder, *RunFolder(folder).seed_dirs())]
    return study, next((png for png in figures if png.exists()), None)


def rl_study_caption(study: dict) -> str:
    seeds = study["bases"][next(iter(study["bases"]))].get("seeds", 1)
    return ("PHF, then RL: the same GRPO budget from each pretraining arm's weights at the same step. Left: the "
            "training misalignment (-reward) per step and its moving average; right: the KL to the start model. "
            f"Table: each base before and after RL ({seeds} seed(s); figures are means over seeds); judge/scorer "
            "change above 1 means the reward improved more than the judge saw.")


register_study(Study("rl_from_bases", "PHF, then RL", _rl_study_in, rl_study_caption, rl_study_table,
                     notes=lambda study: study.get("answer_per_seed") or [study.get("answer", "")]))
