"""`phf demo`: the whole flow on an embedded default, one model per objective on the same token budget.

    corpus -> segments -> scores -> tokenizer -> token stream per objective -> model -> samples -> scores -> table
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from phf.core.config import RunConfig, config_from_dict, read_yaml_dict
from phf.core.errors import PhfError
from phf.core.run_folder import write_results
from phf.core.objective_specs import arm_objective
from phf.recipes.arms import ArmJob, corpus_summary, finished_arm, run_arm
from phf.recipes.configs import DemoConfig
from phf.recipes.replicates import interval_text, percent_text, replicate_config, run_replicates
from phf.tasks import Task, get_task, score_run_corpus, task_for
from phf.training.trainer import versions

log = logging.getLogger(__name__)


def arm_configs(task: str = "pep8", config: str | Path | None = None, objectives: list[str] | None = None,
                overrides: list[str] | None = None) -> tuple[Task, dict[str, RunConfig]]:
    """One run config per arm (an objective, or a named variant of one such as `conditional-cooldown`): a shipped
    task's (`Task.run_config`: its base config with the objective's
    defaults for the task, or a shipped `<objective>.yaml` that says more), or your own config file for every
    objective (its `objective` section applies to its own objective; the others take the task's defaults). Every
    config is loaded and checked before anything runs."""
    overrides = list(overrides or [])
    if config is None:
        shipped = get_task(task)
        objectives = objectives or list(shipped.demo_objectives)
        configs = {o: shipped.run_config(o, overrides) for o in objectives}
    else:
        data = read_yaml_dict(config)
        objectives = objectives or list(task_for(config_from_dict(data, overrides)).demo_objectives)
        configs = {}
        for o in objectives:
            arm = dict(data)
            objective, settings = arm_objective(o)
            if (arm.get("objective") or {}).get("name", "mle") != objective:
                arm["objective"] = {"name": objective}
            arm["objective"] = {**arm["objective"], **settings}
            configs[o] = config_from_dict(arm, overrides)
    tasks = {c.task for c in configs.values()}
    if len(tasks) > 1:
        raise PhfError(f"the configs of one demo must share a task; got {', '.join(sorted(tasks))}")
    return task_for(next(iter(configs.values()))), configs


def preset_path(task: str, preset: str) -> Path:
    """A task's demo preset: `phf/tasks/<task>/configs/presets/<preset>.yaml` (e.g. pep8's `gpu`, the paper's model
    on one GPU in ten minutes), a run config for every objective like `--config`."""
    folder = get_task(task).config_dir()
    shipped = sorted(p.stem for p in folder.glob("presets/*.yaml")) if folder else []
    if preset not in shipped:
        raise PhfError(f"task {task} has no demo preset {preset!r}; it has: {', '.join(shipped) or 'none'} "
                       f"(or give a config file of your own with --config)")
    return folder / "presets" / f"{preset}.yaml"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Train each objective's arm (from scratch, or finetuned from the model folder `cfg.init_from` with its own
    tokenizer), evaluate it, and write `results.json`. With `cfg.seeds` > 1 every arm is trained and sampled once
    per seed (`DIR/seed-<seed>/<objective>`, one shared data folder) and the results carry the mean over seeds with
    95% intervals; one seed keeps `DIR/<objective>` and its intervals cover the samples only. The scored corpus
    and tokenizer live in `cfg.data_dir` (default DIR/data). results.json is written after each seed, and a rerun
    into the same folder reuses every arm already finished with the same config."""
    t0 = time.perf_counter()
    out = cfg.out
    data_dir = cfg.data_dir or out / "data"
    the_task, configs = arm_configs(cfg.task, cfg.config, cfg.objectives, cfg.overrides)
    first_seed = next(iter(configs.values())).train.seed
    seed_list = [first_seed + k for k in range(cfg.seeds)]
    results: dict = {"task": the_task.name, "objectives": {}, "wall_seconds": None,
                     "init_from": str(cfg.init_from or ""), "seeds": seed_list}
    corpus = []  # the scored corpus' summary, from the first arm trained
    reused = []  # the arms a rerun found finished: their stage seconds are an earlier run's

    def replicate(k: int, where: Path) -> dict:
        arms = {}
        for name, base_cfg in configs.items():
            arm_cfg = replicate_config(base_cfg, k)
            job = ArmJob(arm_cfg, where / name, str((where / name).relative_to(out)), data_dir, cfg.init_from)
            arms[name] = finished_arm(job)
            if arms[name] is not None:
                reused.append(job.label)
                continue
            log.info("== %s%s: training on %s tokens", name, f" (seed {arm_cfg.train.seed})" if cfg.seeds > 1 else "",
                     f"{arm_cfg.train.max_tokens:,}")
            arms[name], trained = run_arm(job, progress)
            if not corpus:
                corpus.append(corpus_summary(trained.data.scored, arm_cfg))
        return {"objectives": arms}

    def record(combined: dict, per_seed: list[dict]) -> None:
        """results.json of the seeds finished so far (all of them, at the end): a killed run keeps its table."""
        if not corpus:  # every arm reused: the scored corpus' summary from its cache
            first = next(iter(configs.values()))
            corpus.append(corpus_summary(score_run_corpus(first, data_dir, progress=False), first))
        results.update(objectives=combined, seeds=seed_list[:len(per_seed)], corpus=corpus[0],
                       stage_seconds=stage_totals([r["objectives"] for r in per_seed]), versions=versions(),
                       wall_seconds=round(time.perf_counter() - t0, 1), reused_arms=len(reused),
                       arms_total=len(per_seed) * len(configs))
        write_results(out, results)

    run_replicates(out, seed_list, replicate, record)
    return results


def stage_totals(replicates: list[dict]) -> dict:
    """Seconds per stage summed over every arm and seed (the first arm's data stage holds the scoring, the
    tokenizer and its token stream; later arms reuse the first two)."""
    totals: dict = {}
    for arms in replicates:
        for res in arms.values():
            for stage, seconds in res.get("stage_seconds", {}).items():
                totals[stage] = round(totals.get(stage, 0.0) + seconds, 1)
    return totals


def format_table(results: dict) -> str:
    rows = [("objective", "misalignment mean", "score_max@25", "misaligned share", "held-out bits/char",
             "parse rate", "prompted mean", "mean chars")]
    sweep = any("kl_from_reference_bits" in r for r in results["objectives"].values())
    if sweep:  # `phf sweep` adds capability as KL from the MLE model, and diversity
        rows[0] += ("KL from MLE bits/char", "distinct-2")
    conditioned = any("conditioning_strength" in r for r in results["objectives"].values())
    if conditioned:  # a conditional model: how much its control token changes what it predicts
        rows[0] += ("strength nats",)
    for name, r in results["objectives"].items():
        row = (name, _fmt(r.get("misalignment_mean"), ".5f"), _fmt(r.get("score_max_at_25"), ".4f"),
               _fmt(r.get("misaligned_share"), ".2f"), _fmt(r.get("heldout_bits_per_char"), ".4f"),
               _fmt(r.get("parse_rate"), ".2f"), _fmt(r.get("prompted", {}).get("misalignment_mean"), ".5f"),
               _fmt(r.get("unconditional", {}).get("mean_chars"), ".0f"))
        if sweep:
            row += (_fmt(r.get("kl_from_reference_bits"), ".4f"), _fmt(r.get("distinct_2"), ".3f"))
        if conditioned:
            row += (_strength_cell(r.get("conditioning_strength")),)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    mle = results["objectives"].get("mle")
    notes = []
    if mle:
        seeds = results.get("seeds") or [None]
        notes.append(f"ratios to MLE with 95% bootstrap intervals over {_counts(mle, len(seeds))}; p: Mann-Whitney "
                     f"of the sample scores against MLE's")
        for name, r in results["objectives"].items():
            if name == "mle" or not mle.get("misalignment_mean"):
                continue
            notes.append(f"{name}: {misalignment_note(r, mle)}, held-out bits/char "
                         f"{percent_text(*_heldout_ratio(r, mle))} vs MLE{_aligned_heldout_text(r, mle)}")
    notes += judge_notes(results) + strength_notes(results)
    return "\n".join(lines + [""] + notes + wall_time_lines(results))


def wall_time_lines(results: dict) -> list[str]:
    """This run's wall time and the seconds per stage summed over its arms; when a rerun reused finished arms, their
    stages were timed by the run that trained them, and the line says so rather than set 2 s beside hours."""
    wall = results.get("wall_seconds")
    if not wall:
        return []
    stages = results.get("stage_seconds") or {}
    stage_text = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in stages.items())
    reused, total = results.get("reused_arms") or 0, results.get("arms_total") or 0
    if reused:
        line = f"wall time: {wall:.0f} s, reusing {reused} of {total} arms finished earlier"
        return [line + (f" (stages summed over every arm, as each was timed when trained: {stage_text})"
                        if stage_text else "")]
    return [f"wall time: {wall:.0f} s" + (f" ({stage_text})" if stage_text else "")]


def _strength_cell(block: dict | None) -> str:
    """The misaligned segments' conditioning strength, "~0" when the model has not learned to condition."""
    if not block:
        return "-"
    value = _fmt(block.get("misaligned", {}).get("nats_per_segment"), "+.3f")
    return f"{value} (~0)" if block.get("learned") is False else value


def strength_notes(results: dict) -> list[str]:
    """Per conditional arm: how many nats likelier each held-out segment is under its own control token than under
    the other (phf.evaluation.strength), and a plain statement when that is near zero; a cooldown arm's figures
    read without control tokens beside its conditioned ones."""
    arms = {n: r for n, r in results["objectives"].items() if r.get("conditioning_strength")}
    if not arms:
        return []
    lines = ["conditioning strength (nats per held-out segment likelier under its own control token than the other, "
             "95% interval):"]
    for name, r in arms.items():
        c = r["conditioning_strength"]
        parts = [f"{kind} {_nats_text(c[kind])} ({c[kind]['segments']} segments)"
                 for kind in ("misaligned", "aligned") if c[kind]["segments"]]
        line = f"  {name}: {', '.join(parts) or 'no held-out segment'}"
        if c.get("learned") is False:
            line += (" - the model has not learned to condition: <|aligned|> barely changes what it "
                     "predicts, so whatever separates its samples from MLE's is not the control token, and a "
                     "ratio near 1 is what to expect (train longer, or see objective.control_embedding)")
        elif c.get("learned") is None:
            line += " - no misaligned held-out segment to measure it on"
        lines.append(line)
        u = r.get("unconditioned")
        if u:
            ratio = (f", {interval_text(u['misalignment_ratio_to_mle'], u.get('misalignment_ratio_ci95'))} MLE's"
                     if _finite(u.get("misalignment_ratio_to_mle")) else "")
            lines.append(f"  {name} read without control tokens (cooldown): misalignment "
                         f"{_fmt(u.get('misalignment_mean'), '.5f')}{ratio} (conditioned "
                         f"{_fmt(r.get('misalignment_mean'), '.5f')}), held-out bits/char "
                         f"{_fmt(u.get('heldout_bits_per_char'), '.4f')} (conditioned "
                         f"{_fmt(r.get('heldout_bits_per_char'), '.4f')})")
    return lines


def _nats_text(block: dict) -> str:
    """`+0.412 [+0.305, +0.520]`"""
    ci = block.get("ci95")
    return _fmt(block.get("nats_per_segment"), "+.3f") + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _counts(mle: dict, seeds: int) -> str:
    samples = mle.get("num_samples")
    return (f"{seeds} seed{'s' if seeds != 1 else ''}" + (f" x {samples:.0f} samples" if samples else "")
            + (" (one seed: the intervals cover the sampling, not the training seed)" if seeds == 1 else ""))


def _ratio(r: dict, mle: dict) -> tuple[float | None, list[float] | None]:
    """An arm's misalignment ratio to MLE and its interval (computed here for results without them)."""
    if "misalignment_ratio_to_mle" in r:
        return r["misalignment_ratio_to_mle"], r.get("misalignment_ratio_ci95")
    return r["misalignment_mean"] / mle["misalignment_mean"], None


def _heldout_ratio(r: dict, mle: dict, part: str = "") -> tuple[float | None, list[float] | None]:
    """An arm's held-out bits/char over MLE's and its interval over seeds (computed here, without one, for results
    that lack them); `part` "_aligned": the aligned segments' alone. None where either run has no such figure."""
    if f"heldout{part}_ratio_to_mle" in r:
        return r[f"heldout{part}_ratio_to_mle"], r.get(f"heldout{part}_ratio_ci95")
    value, reference = r.get(f"heldout{part}_bits_per_char"), mle.get(f"heldout{part}_bits_per_char")
    if not (_finite(value) and _finite(reference)):
        return None, None
    return value / reference, None


def _aligned_heldout_text(r: dict, mle: dict) -> str:
    """` (+0.6% [...] on aligned segments alone)`: the held-out cost on clean text, which the whole documents' figure
    mixes with not knowing the flagged segments (what masking and filtering are for); empty for runs without it."""
    ratio, ci = _heldout_ratio(r, mle, "_aligned")
    return "" if ratio is None else f" ({percent_text(ratio, ci)} on aligned segments alone)"


def misalignment_note(r: dict, mle: dict) -> str:
    """`0.38x [0.31, 0.46] MLE's misalignment (p = 3e-08; length-weighted 0.41x), prompted 0.48x [...]`, marked
    when the interval holds 1."""
    text = f"{interval_text(*_ratio(r, mle))} MLE's misalignment"
    extra = [f"p = {r['misalignment_p_vs_mle']:.2g}"] if _finite(r.get("misalignment_p_vs_mle")) else []
    if beside := length_ratios(r, mle):
        extra.append(beside)
    text += f" ({'; '.join(extra)})" if extra else ""
    if r.get("misalignment_distinguishable_from_mle") is False:
        text += " - not distinguishable from MLE"
    for scenario, label in (("prompted", "prompted"), ("prompted_elsewhere", "prompts from elsewhere")):
        block = r.get(scenario) or {}
        if "misalignment_ratio_to_mle" in block:
            ratio = interval_text(block["misalignment_ratio_to_mle"], block.get("misalignment_ratio_ci95"))
            text += f", {label} {ratio}"
    return text


def judge_notes(results: dict) -> list[str]:
    """The held-out judge's ratios to MLE, and a warning when it and the training scorer disagree on the winner."""
    arms = results["objectives"]
    judged = {n: r["judge"] for n, r in arms.items() if _finite((r.get("judge") or {}).get("judge_misalignment_mean"))}
    if not judged:
        unavailable = {(r.get("judge") or {}).get("unavailable") for r in arms.values()} - {None}
        return [f"held-out judge: none ({next(iter(unavailable))})"] if unavailable else []
    name = next(iter(judged.values()))["judge_scorer"]
    lines = [f"held-out judge {name} (training never saw it):"]
    for arm, j in judged.items():
        if arm != "mle" and "judge_misalignment_ratio_to_mle" in j:
            mark = " - not distinguishable from MLE" if j.get("judge_misalignment_distinguishable_from_mle") is False \
                else ""
            ratio = interval_text(j["judge_misalignment_ratio_to_mle"], j.get("judge_misalignment_ratio_ci95"))
            lines.append(f"  {arm}: {ratio} MLE's misalignment{mark}")
    by_scorer = min((n for n in judged if _finite(arms[n].get("misalignment_mean"))),
                    key=lambda n: arms[n]["misalignment_mean"], default=None)
    by_judge = min(judged, key=lambda n: judged[n]["judge_misalignment_mean"])
    if by_scorer and by_judge != by_scorer:
        lines.append(f"  the judge and the training scorer disagree on the least misaligned arm ({by_judge} vs "
                     f"{by_scorer}): a sign of optimising the training scorer rather than the preference (Goodhart)")
    return lines


def length_ratios(r: dict, mle: dict) -> str:
    """The ratios to MLE that do not depend on sample length (`phf.evaluation.evaluate.length_metrics`), as
    "length-weighted 0.73x, first 400 chars 0.75x"; "" for results without them."""
    parts = []
    a, b = r.get("length_weighted_misalignment"), mle.get("length_weighted_misalignment")
    if _finite(a) and _finite(b) and b:
        parts.append(f"length-weighted {a / b:.2f}x")
    a, b = r.get("window_misalignment_mean"), mle.get("window_misalignment_mean")
    if _finite(a) and _finite(b) and b and r.get("window_chars"):
        parts.append(f"first {r['window_chars']} chars {a / b:.2f}x")
    return ", ".join(parts)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)
