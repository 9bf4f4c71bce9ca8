"""`phf sweep`: every objective of a task on one token budget, feedback from the start vs. only in a late finetune,
each arm evaluated for misalignment and capability (held-out bits/char, KL from the MLE model), in one table.

    pretraining arms   mle, filtering, conditional, unlikelihood, rwr, awr, masking, masking-hidden: each trained
                       from scratch on the budget
    finetune arms      finetune:<objective>: the MLE run's weights after (1 - f) of the budget, then <objective> for
                       the last f of it (the paper's second experiment: equal total tokens)
    rl (--rl)          the same MLE weights finetuned with RL (TRL's GRPO, the scorer as reward, a KL penalty to the
                       start) on `rl_tokens` prompt + completion tokens: the optimiser among the methods
    rl:<base>          the same RL, on the same budget, from another pretraining arm's weights at the same step
                       (`rl_bases`, default mle and conditional): does feedback in pretraining make RL safer? The
                       comparison (`rl_from_bases` in results.json, `rl_from_bases.png`) puts each base's reward
                       curve, KL, judge and hacking signals before and after RL side by side
    reference          the mle arm: KL(mle || arm) from samples of the MLE model, in bits per character
    tamper (--tamper)  every arm finetuned by an adversary on the corpus' misaligned text (phf.analysis.tamper):
                       DIR/tamper, and per arm the adversarial tokens to the MLE model's untampered misalignment

Every arm's run folder is `DIR/<arm>` (`finetune-<objective>` for finetune arms); `DIR/results.json` has the
demo's schema plus `kl_from_reference_bits`, `distinct_2`, `kind` and `tokens_seen_total` per arm. An arm whose
results exist for the same config is reused, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from phf.analysis.rl import base_study, combine_studies, compare_bases, plot_rl_bases, rl_config, rl_finetune
from phf.analysis.tamper import TamperConfig, run_tamper
from phf.core.config import RunConfig, config_to_yaml
from phf.core.errors import PhfError
from phf.core.objective_specs import finetune_objectives, sweep_objectives
from phf.core.io import atomic_path, read_jsonl, stable_hash
from phf.core.run_folder import (REFERENCE_ARM, RunFolder, arm_folder_name, checkpoint_dir, metrics_file,
                                  read_results_dict, results_path, write_results)
from phf.evaluation.evaluate import evaluate_checkpoint
from phf.evaluation.kl import DeployedModel, KLReference
from phf.recipes.demo import arm_configs, corpus_line
from phf.recipes.replicates import combine, sample_scores
from phf.report.page import write_report
from phf.tasks import Task, score_run_corpus, task_for
from phf.training.trainer import run_training, versions

log = logging.getLogger(__name__)

# The default arms, from the objective registry (each record's `sweep` and `finetune`; phf.core.objective_specs).
SWEEP_OBJECTIVES = sweep_objectives()
FINETUNE_OBJECTIVES = finetune_objectives()
# The pretraining arms RL starts from with --rl, where the sweep has them: without feedback and with it from the start.
RL_BASES = ["mle", "conditional"]
# Applied to every arm before the user's --set: fewer evaluation samples than the demo (11 arms, not 3) and an
# evaluation schedule during training, for the misalignment-vs-tokens curves.
SWEEP_OVERRIDES = ["sample.num_samples=128", "sample.num_prompts=32", "eval.heldout_chars=150000", "train.eval_every=65",
                   "train.eval_samples=8"]


@dataclass
class Arm:
    name: str  # results key: "conditional", "finetune:conditional"
    objective: str
    cfg: RunConfig
    finetune: bool

    @property
    def run_dir(self) -> str:
        return arm_folder_name(self.name)


def plan(task: str, overrides: list[str] | None = None, objectives: list[str] | None = None,
         finetune: list[str] | None = None, finetune_fraction: float = 0.5, config: str | Path | None = None
         ) -> tuple[Task, list[Arm], int, int]:
    """The task, the arms of a sweep, the MLE run's branch step and the tokens the finetunes start from."""
    objectives = objectives if objectives is not None else SWEEP_OBJECTIVES
    finetune = finetune if finetune is not None else FINETUNE_OBJECTIVES
    if "mle" not in objectives:
        raise PhfError("a sweep needs the mle arm: it is the KL reference and the base of the finetune arms")
    if not 0 < finetune_fraction < 1:
        raise PhfError(f"--finetune-fraction must be between 0 and 1 (exclusive), got {finetune_fraction}")
    overrides = SWEEP_OVERRIDES + list(overrides or [])
    the_task, configs = arm_configs(task, config, objectives, overrides)
    arms = [Arm(o, o, configs[o], False) for o in objectives]
    mle = arms[0] if arms[0].name == "mle" else next(a for a in arms if a.name == "mle")
    t = mle.cfg.train
    tokens_per_step = t.batch_size * mle.cfg.model.block_size * t.grad_accum  # one process; torchrun is not used here
    total_steps = t.max_steps or -(-t.max_tokens // tokens_per_step)
    branch = max(1, round(total_steps * (1 - finetune_fraction)))
    for o in finetune:
        if o == "mle":
            raise PhfError("finetune:mle is the mle arm itself; name feedback objectives after --finetune")
        extra = [f"train.max_steps={total_steps - branch}"]
        arms.append(Arm(f"finetune:{o}", o, arm_configs(task, config, [o], overrides + extra)[1][o], True))
    return the_task, arms, branch, branch * tokens_per_step


def run_sweep(task: str = "pep8", out: str | Path = "runs/sweep", overrides: list[str] | None = None,
              objectives: list[str] | None = None, finetune: list[str] | None = None, finetune_fraction: float = 0.5,
              progress: bool = True, report: bool = True, rl: bool = False, rl_tokens: int = 60_000,
              rl_overrides: list[str] | None = None, config: str | Path | None = None, seeds: int = 1,
              data_dir: str | Path | None = None, rl_bases: list[str] | None = None,
              tamper: dict | None = None) -> dict:
    """The sweep; with `seeds` > 1, once per seed (`DIR/seed-<seed>/`, one shared data folder), its results
    combined per arm with 95% intervals (phf.recipes.replicates) and one report. `tamper`: run the tamper probe
    on every arm with these settings of phf.analysis.tamper.tamper_curve ({} = its defaults); None: not."""
    if seeds > 1:
        return _sweep_per_seed(task, Path(out), overrides, objectives, finetune, finetune_fraction, progress, report,
                               rl, rl_tokens, rl_overrides, config, seeds, rl_bases, tamper)
    if seeds < 1:
        raise PhfError(f"--seeds must be at least 1, got {seeds}")
    t0 = time.perf_counter()
    out = Path(out)
    data_dir = Path(data_dir) if data_dir else out / "data"
    the_task, arms, branch, branch_tokens = plan(task, overrides, objectives, finetune, finetune_fraction, config)
    bases = rl_bases_of(arms, rl_bases) if rl else []
    snapshot = RunFolder(out).arm_dir(REFERENCE_ARM) / "snapshots" / f"step-{branch}"
    previous = read_results_dict(out) if results_path(out).exists() else {}
    results: dict = {"task": the_task.name, "objectives": {}, "reference": "mle", "finetune_fraction": finetune_fraction,
                     "finetune_from_tokens": branch_tokens, "wall_seconds": None}
    corpus_summary = None
    mle_yaml = config_to_yaml(next(a for a in arms if a.name == "mle").cfg)
    for arm in arms:
        # a finetune arm depends on its base too: a changed MLE config retrains it
        key = stable_hash({"config": config_to_yaml(arm.cfg), "finetune": arm.finetune, "branch": branch,
                           "base": mle_yaml if arm.finetune else None})
        old = previous.get("objectives", {}).get(arm.name)
        branches = arm.name == "mle" or arm.name in bases  # finetunes or RL start from its weights at the branch
        if old and old.get("config_hash") == key and checkpoint_dir(out / arm.run_dir).exists() and \
                (not branches or (out / arm.run_dir / "snapshots" / f"step-{branch}").exists()):
            log.info("== %s: reusing its results (same config)", arm.name)
            results["objectives"][arm.name] = old
            continue
        log.info("== %s: %s", arm.name, f"finetuning the MLE model of step {branch} for {arm.cfg.train.max_steps} "
                 f"steps" if arm.finetune else f"training on {arm.cfg.train.max_tokens:,} tokens")
        trained = run_training(arm.cfg, out / arm.run_dir, data_dir, progress=progress,
                               init_from=snapshot if arm.finetune else None,
                               snapshots=[branch] if branches else ())
        if corpus_summary is None:
            # the run's config, whose scoring.misaligned_above_quantile training has resolved
            corpus_summary = trained.data.scored.summary(task_for(arm.cfg).misaligned_above)
            log.info("scored corpus: %s", corpus_line(corpus_summary))
        res = evaluate_checkpoint(trained.checkpoint, arm.cfg, trained.data.scored, out / arm.run_dir,
                                  progress=progress)
        res.update(train_tokens=trained.tokens, tokens_seen_total=trained.tokens + (branch_tokens if arm.finetune
                                                                                    else 0),
                   train_seconds=round(trained.seconds, 1), val_loss=trained.final_val_loss,
                   objective_settings=trained.objective.describe(), kind="finetune" if arm.finetune else "pretrain",
                   run_dir=arm.run_dir, config_hash=key,
                   distinct_2=res.get("unconditional", {}).get("distinct_2"))
        res.pop("kl_from_reference_bits", None)  # measured below, against this sweep's reference
        write_results(out / arm.run_dir, res)
        results["objectives"][arm.name] = res
        write_results(out, results)  # partial results survive an interrupted sweep

    rl_arms = [_rl_arm(results, previous, out, base, branch, branch_tokens, data_dir, rl_tokens, rl_overrides or [],
                       progress) for base in (next(a for a in arms if a.name == b) for b in bases)]
    _add_kl(results, out, arms + rl_arms, progress)
    if rl_arms:
        results["rl_from_bases"] = _rl_study(results, out, rl_arms, the_task.name)
    if tamper is not None:
        results["tamper"] = _tamper_every_arm(out, arms + rl_arms, tamper, progress)
    if corpus_summary is None and previous.get("corpus"):
        corpus_summary = previous["corpus"]
    results["corpus"] = corpus_summary
    results["versions"] = versions()
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    seed = next(a for a in arms if a.name == "mle").cfg.train.seed
    results["seeds"] = [seed]
    scores = {n: sample_scores(out / r.get("run_dir", n)) for n, r in results["objectives"].items()}
    results["objectives"] = combine([results["objectives"]], [scores], [seed])
    write_results(out, results)
    if report:
        results["report"] = str(write_report([out]))
    return results


def _sweep_per_seed(task, out: Path, overrides, objectives, finetune, finetune_fraction, progress, report, rl,
                    rl_tokens, rl_overrides, config, seeds: int, rl_bases, tamper) -> dict:
    t0 = time.perf_counter()
    _, arms, _, _ = plan(task, overrides, objectives, finetune, finetune_fraction, config)
    base = next(a for a in arms if a.name == "mle").cfg
    seed_list = [base.train.seed + k for k in range(seeds)]
    replicates, scores, per_seed = [], [], []
    for k, seed in enumerate(seed_list):
        where = RunFolder(out).seed_dir(seed)
        log.info("==== seed %d (%d of %d)", seed, k + 1, seeds)
        seeded = list(overrides or []) + [f"train.seed={seed}", f"sample.seed={base.sample.seed + k}"]
        r = run_sweep(task, where, seeded, objectives, finetune, finetune_fraction, progress, report=False, rl=rl,
                      rl_tokens=rl_tokens, rl_overrides=rl_overrides, config=config, data_dir=out / "data",
                      rl_bases=rl_bases, tamper=tamper)
        per_seed.append(r)
        replicates.append(r["objectives"])
        scores.append({n: sample_scores(where / e.get("run_dir", n)) for n, e in r["objectives"].items()})
    results = {key: per_seed[0][key] for key in ("task", "reference", "finetune_fraction", "finetune_from_tokens",
                                                  "corpus", "versions") if key in per_seed[0]}
    results["objectives"] = combine(replicates, scores, seed_list)
    for name, entry in results["objectives"].items():  # the report reads the first seed's runs
        first = per_seed[0]['objectives'][name].get('run_dir', name)
        entry["run_dir"] = str(RunFolder(out).seed_dir(seed_list[0]).relative_to(out) / first)
    results["seeds"] = seed_list
    if all("rl_from_bases" in r for r in per_seed):
        results["rl_from_bases"] = combine_studies([r["rl_from_bases"] for r in per_seed])
        results["rl_from_bases"]["figure"] = per_seed[0]["rl_from_bases"].get("figure")
    if all("tamper" in r for r in per_seed):
        results["tamper"] = {"per_seed": [r["tamper"] for r in per_seed], "figure": per_seed[0]["tamper"]["figure"]}
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(out, results)
    if report:
        results["report"] = str(write_report([out]))
    return results


def rl_bases_of(arms: list[Arm], wanted: list[str] | None) -> list[str]:
    """The pretraining arms RL starts from: those asked for (all must be pretraining arms of the sweep), else
    RL_BASES where the sweep has them; mle always among them, as the reference."""
    names = [a.name for a in arms if not a.finetune]
    if wanted is None:
        return [b for b in RL_BASES if b in names]
    unknown = [b for b in wanted if b not in names]
    if unknown:
        raise PhfError(f"--rl-bases {','.join(unknown)}: not a pretraining arm of this sweep ({', '.join(names)}); "
                       f"add it to --objectives")
    return ["mle"] + [b for b in wanted if b != "mle"]


def _rl_arm(results: dict, previous: dict, out: Path, base: Arm, branch: int, branch_tokens: int, data_dir: Path,
            rl_tokens: int, rl_overrides: list[str], progress: bool) -> Arm:
    """RL from `base`'s weights at the branch step, the step the finetune arms start from (needs the `rl` extra):
    the arm `rl` from mle, `rl:<base>` from any other."""
    name = "rl" if base.name == "mle" else f"rl:{base.name}"
    arm = Arm(name, "rl", base.cfg, True)
    snapshot = out / base.run_dir / "snapshots" / f"step-{branch}"
    rl_cfg = rl_config(rl_overrides)
    key = stable_hash({"base": config_to_yaml(base.cfg), "rl": rl_cfg.__dict__, "tokens": rl_tokens,
                       "branch": branch})
    old = previous.get("objectives", {}).get(name)
    if old and old.get("config_hash") == key and checkpoint_dir(out / arm.run_dir).exists() and \
            results_path(out / arm.run_dir / "before").exists():
        log.info("== %s: reusing its results (same config)", name)
        results["objectives"][name] = old
        return arm
    log.info("== %s: GRPO from the %s model of %s tokens, on %s prompt + completion tokens", name, base.name,
             f"{branch_tokens:,}", f"{rl_tokens:,}")
    scored = score_run_corpus(base.cfg, data_dir, progress=False)
    summary = rl_finetune(snapshot, base.cfg, scored, out / arm.run_dir, rl_tokens, progress=progress, rl=rl_cfg)
    # the base as RL found it, measured as every arm is: the "before" of the hacking signals
    evaluate_checkpoint(snapshot, base.cfg, scored, out / arm.run_dir / "before", progress=progress)
    res = evaluate_checkpoint(checkpoint_dir(out / arm.run_dir), base.cfg, scored, out / arm.run_dir,
                              progress=progress)
    res.update(train_tokens=summary["tokens"], tokens_seen_total=branch_tokens + summary["tokens"],
               train_seconds=summary["seconds"], objective_settings={"name": "rl", **summary["rl"]}, kind="rl",
               run_dir=arm.run_dir, config_hash=key, rl_base=base.name,
               distinct_2=res.get("unconditional", {}).get("distinct_2"))
    write_results(out / arm.run_dir, res)
    results["objectives"][name] = res
    write_results(out, results)
    return arm


def _rl_study(results: dict, out: Path, rl_arms: list[Arm], task: str) -> dict:
    """The RL arms side by side (phf.analysis.rl.compare_bases), with their figure."""
    studies = {}
    for arm in rl_arms:
        base = results["objectives"][arm.name].get("rl_base") or "mle"
        before = read_results_dict(out / arm.run_dir / "before")
        before["distinct_2"] = before.get("unconditional", {}).get("distinct_2")
        scores = {when: sample_scores(where) for when, where in (("before", out / arm.run_dir / "before"),
                                                                 ("after", out / arm.run_dir))}
        samples = {when: (s.get("unconditional", []), s.get("judge/unconditional", [])) for when, s in scores.items()}
        studies[base] = base_study(before, results["objectives"][arm.name],
                                   read_jsonl(metrics_file(out / arm.run_dir)), samples)
    study = compare_bases(studies)
    scorer = results["objectives"][rl_arms[0].name].get("scorer", task)
    study["figure"] = str(plot_rl_bases(study, out / "rl_from_bases.png", scorer))
    log.info("PHF, then RL: %s", study["answer"])
    return study


def _tamper_every_arm(out: Path, arms: list[Arm], settings: dict, progress: bool) -> dict:
    """`phf probe tamper` on every arm (DIR/tamper), the MLE arm the level to reach; per arm the adversarial tokens
    to that level, with their intervals."""
    log.info("== tamper: every arm finetuned on the corpus' misaligned text")
    res = run_tamper(TamperConfig.of({**settings, "model": [out / a.run_dir for a in arms], "out": out / "tamper",
                                      "reference": "mle"}), progress=progress)
    names = {a.run_dir: a.name for a in arms}
    summary = {"figure": res["figure"], "results": str(results_path(out / "tamper")), "arms": {}}
    for label, curve in res["models"].items():
        summary["arms"][names.get(label, label)] = {
            key: curve[key] for key in ("to_reference_level", "judge_to_reference_level") if key in curve}
    return summary


def _add_kl(results: dict, out: Path, arms: list[Arm], progress: bool) -> None:
    """KL(mle || arm) for every arm, from one set of samples of the MLE model (kept in reference_samples.jsonl)."""

    mle = next(a for a in arms if a.name == "mle")
    e = mle.cfg.eval
    if not e.kl_samples:
        return
    log.info("== KL from the MLE model: %d reference samples of %d tokens", e.kl_samples, e.kl_max_new_tokens)
    ref = KLReference.sample(checkpoint_dir(out / mle.run_dir), e.kl_samples, e.kl_max_new_tokens, e.kl_seed,
                             task_for(mle.cfg).segmenter, progress=progress)
    with atomic_path(out / "reference_samples.jsonl") as tmp:

        with open(tmp, "w", encoding="utf-8") as f:
            for t, lp in zip(ref.texts, ref.logp):
                f.write(json.dumps({"text": t, "logp_reference_nats": lp}) + "\n")
    for arm in arms:
        res = results["objectives"][arm.name]
        kl = ref.kl(DeployedModel.load(checkpoint_dir(out / arm.run_dir)))
        res.update(kl)
        write_results(out / arm.run_dir, res)
        log.info("%s: KL(mle || %s) = %.4f +- %.4f bits/char", arm.name, arm.name, kl["kl_from_reference_bits"],
                 kl["kl_stderr_bits"])
