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
from dataclasses import dataclass, replace
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
from phf.recipes.arms import ArmJob, corpus_summary, reusable, run_arm
from phf.recipes.configs import SweepConfig
from phf.recipes.demo import arm_configs
from phf.recipes.replicates import run_replicates, sample_scores
from phf.report.page import write_report
from phf.tasks import Task, score_run_corpus, task_for
from phf.training.trainer import versions

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


def plan(cfg: SweepConfig) -> tuple[Task, list[Arm], int, int]:
    """The task, the arms of a sweep, the MLE run's branch step and the tokens the finetunes start from."""
    objectives = cfg.objectives if cfg.objectives is not None else SWEEP_OBJECTIVES
    finetune = cfg.finetune if cfg.finetune is not None else FINETUNE_OBJECTIVES
    overrides = SWEEP_OVERRIDES + list(cfg.overrides)
    the_task, configs = arm_configs(cfg.task, cfg.config, objectives, overrides)
    arms = [Arm(o, o, configs[o], False) for o in objectives]
    mle = arms[0] if arms[0].name == "mle" else next(a for a in arms if a.name == "mle")
    t = mle.cfg.train
    tokens_per_step = t.batch_size * mle.cfg.model.block_size * t.grad_accum  # one process; torchrun is not used here
    total_steps = t.max_steps or -(-t.max_tokens // tokens_per_step)
    branch = max(1, round(total_steps * (1 - cfg.finetune_fraction)))
    for o in finetune:
        extra = [f"train.max_steps={total_steps - branch}"]
        arms.append(Arm(f"finetune:{o}", o, arm_configs(cfg.task, cfg.config, [o], overrides + extra)[1][o], True))
    return the_task, arms, branch, branch * tokens_per_step


@dataclass
class _Sweep:
    """One seed's sweep under way: its settings and plan, the results so far and those of an earlier run."""
    cfg: SweepConfig
    task: Task
    arms: list[Arm]
    branch: int  # the MLE run's step the finetune and RL arms start from
    branch_tokens: int
    data_dir: Path
    previous: dict
    results: dict
    progress: bool

    @property
    def out(self) -> Path:
        return self.cfg.out

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


SWEEP_TAMPER_FIELDS = ("model", "run", "arms", "out", "reference")  # the sweep's own: every arm, DIR/tamper, MLE


def check_tamper_settings(settings: dict | None) -> None:
    """The sweep's tamper settings (`--tamper-set`), checked before any arm trains: one line naming a bad one."""
    if not settings:
        return
    own = sorted(set(settings) & set(SWEEP_TAMPER_FIELDS))
    if own:
        raise PhfError(f"tamper setting {own[0]!r} is the sweep's own (every arm, DIR/tamper, the MLE arm); "
                       f"remove it")
    TamperConfig.of({**settings, "model": ["every arm"], "out": "tamper"})


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """The sweep; with `cfg.seeds` > 1, once per seed (`DIR/seed-<seed>/`, one shared data folder), its results
    combined per arm with 95% intervals (phf.recipes.replicates) and one report."""
    check_tamper_settings(cfg.tamper)
    if cfg.seeds > 1:
        return _sweep_seeds(cfg, progress)
    t0 = time.perf_counter()
    the_task, arms, branch, branch_tokens = plan(cfg)
    out = cfg.out
    previous = read_results_dict(out) if results_path(out).exists() else {}
    results: dict = {"task": the_task.name, "objectives": {}, "reference": "mle",
                     "finetune_fraction": cfg.finetune_fraction, "finetune_from_tokens": branch_tokens,
                     "wall_seconds": None}
    run = _Sweep(cfg, the_task, arms, branch, branch_tokens, cfg.data_dir or out / "data", previous, results,
                 progress)
    seed = run.arm("mle").cfg.train.seed
    results["objectives"], _ = run_replicates(out, [seed], lambda k, where: _run_arms(run))
    results["versions"] = versions()
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    results["seeds"] = [seed]
    write_results(out, results)
    if cfg.report:
        results["report"] = str(write_report([out]))
    return results


def _run_arms(run: _Sweep) -> dict:
    """Every arm trained (or reused) and measured against the MLE arm, with the RL study and the tamper probe
    where asked: the results with one entry per arm."""
    cfg, results = run.cfg, run.results
    bases = rl_bases_of(run.arms, cfg.rl_bases) if cfg.rl else []
    corpus = _train_arms(run, bases)
    rl_arms = [_rl_arm(run, run.arm(b)) for b in bases]
    _add_kl(results, run.out, run.arms + rl_arms, run.progress)
    if rl_arms:
        results["rl_from_bases"] = _rl_study(results, run.out, rl_arms, run.task.name)
    if cfg.tamper is not None:
        results["tamper"] = _tamper_every_arm(run.out, run.arms + rl_arms, cfg.tamper, run.progress)
    results["corpus"] = corpus or run.previous.get("corpus")
    return results


def _train_arms(run: _Sweep, bases: list[str]) -> dict | None:
    """The pretraining and finetune arms, each reused when its results exist for the same config; the scored
    corpus' summary when one was trained."""
    corpus = None
    snapshot = RunFolder(run.out).arm_dir(REFERENCE_ARM) / "snapshots" / f"step-{run.branch}"
    mle_yaml = config_to_yaml(run.arm("mle").cfg)
    for arm in run.arms:
        # a finetune arm depends on its base too: a changed MLE config retrains it
        key = stable_hash({"config": config_to_yaml(arm.cfg), "finetune": arm.finetune, "branch": run.branch,
                           "base": mle_yaml if arm.finetune else None})
        branches = arm.name == "mle" or arm.name in bases  # finetunes or RL start from its weights at the branch
        needed = [checkpoint_dir(run.out / arm.run_dir)]
        if branches:
            needed.append(run.out / arm.run_dir / "snapshots" / f"step-{run.branch}")
        if old := reusable(run.previous, arm.name, key, needed):
            run.results["objectives"][arm.name] = old
            continue
        log.info("== %s: %s", arm.name, f"finetuning the MLE model of step {run.branch} for "
                 f"{arm.cfg.train.max_steps} steps" if arm.finetune else
                 f"training on {arm.cfg.train.max_tokens:,} tokens")
        job = ArmJob(arm.cfg, run.out / arm.run_dir, arm.run_dir, run.data_dir,
                     init_from=snapshot if arm.finetune else None, snapshots=(run.branch,) if branches else (),
                     tokens_before=run.branch_tokens if arm.finetune else 0,
                     fields={"kind": "finetune" if arm.finetune else "pretrain", "config_hash": key},
                     flat=("distinct_2",))
        run.results["objectives"][arm.name], trained = run_arm(job, run.progress)
        corpus = corpus or corpus_summary(trained.data.scored, arm.cfg)
        write_results(run.out, run.results)  # partial results survive an interrupted sweep
    return corpus


def _sweep_seeds(cfg: SweepConfig, progress: bool) -> dict:
    """The single-seed sweep once per seed, each into DIR/seed-<seed>, their results combined."""
    t0 = time.perf_counter()
    base = next(a for a in plan(cfg)[1] if a.name == "mle").cfg
    seed_list = [base.train.seed + k for k in range(cfg.seeds)]

    def one_seed(k: int, where: Path) -> dict:
        seeded = cfg.overrides + (f"train.seed={seed_list[k]}", f"sample.seed={base.sample.seed + k}")
        return run_sweep(replace(cfg, out=where, overrides=seeded, seeds=1, report=False,
                                 data_dir=cfg.data_dir or cfg.out / "data"), progress)

    combined, per_seed = run_replicates(cfg.out, seed_list, one_seed)
    results = {key: per_seed[0][key] for key in ("task", "reference", "finetune_fraction", "finetune_from_tokens",
                                                  "corpus", "versions") if key in per_seed[0]}
    results["objectives"] = combined
    for name, entry in results["objectives"].items():  # the report reads the first seed's runs
        first = per_seed[0]['objectives'][name].get('run_dir', name)
        entry["run_dir"] = str(RunFolder(cfg.out).seed_dir(seed_list[0]).relative_to(cfg.out) / first)
    results["seeds"] = seed_list
    if all("rl_from_bases" in r for r in per_seed):
        results["rl_from_bases"] = combine_studies([r["rl_from_bases"] for r in per_seed], seed_list)
        results["rl_from_bases"]["figure"] = per_seed[0]["rl_from_bases"].get("figure")
    if all("tamper" in r for r in per_seed):
        results["tamper"] = {"per_seed": [r["tamper"] for r in per_seed], "figure": per_seed[0]["tamper"]["figure"]}
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(cfg.out, results)
    if cfg.report:
        results["report"] = str(write_report([cfg.out]))
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


def _rl_arm(run: _Sweep, base: Arm) -> Arm:
    """RL from `base`'s weights at the branch step, the step the finetune arms start from (needs the `rl` extra):
    the arm `rl` from mle, `rl:<base>` from any other."""
    name = "rl" if base.name == "mle" else f"rl:{base.name}"
    arm = Arm(name, "rl", base.cfg, True)
    out, branch, rl_tokens = run.out, run.branch, run.cfg.rl_tokens
    snapshot = out / base.run_dir / "snapshots" / f"step-{branch}"
    rl_cfg = rl_config(list(run.cfg.rl_overrides))
    key = stable_hash({"base": config_to_yaml(base.cfg), "rl": rl_cfg.__dict__, "tokens": rl_tokens,
                       "branch": branch})
    if old := reusable(run.previous, name, key, [checkpoint_dir(out / arm.run_dir),
                                                 results_path(out / arm.run_dir / "before")]):
        run.results["objectives"][name] = old
        return arm
    log.info("== %s: GRPO from the %s model of %s tokens, on %s prompt + completion tokens", name, base.name,
             f"{run.branch_tokens:,}", f"{rl_tokens:,}")
    scored = score_run_corpus(base.cfg, run.data_dir, progress=False)
    summary = rl_finetune(snapshot, base.cfg, scored, out / arm.run_dir, rl_tokens, progress=run.progress, rl=rl_cfg)
    # the base as RL found it, measured as every arm is: the "before" of the hacking signals
    evaluate_checkpoint(snapshot, base.cfg, scored, out / arm.run_dir / "before", progress=run.progress)
    res = evaluate_checkpoint(checkpoint_dir(out / arm.run_dir), base.cfg, scored, out / arm.run_dir,
                              progress=run.progress)
    res.update(train_tokens=summary["tokens"], tokens_seen_total=run.branch_tokens + summary["tokens"],
               train_seconds=summary["seconds"], objective_settings={"name": "rl", **summary["rl"]}, kind="rl",
               run_dir=arm.run_dir, config_hash=key, rl_base=base.name,
               distinct_2=res.get("unconditional", {}).get("distinct_2"))
    write_results(out / arm.run_dir, res)
    run.results["objectives"][name] = res
    write_results(out, run.results)
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
    names = {Path(a.run_dir).name: a.name for a in arms}  # the probe names a curve after its model's folder
    summary = {"figure": res["figure"], "results": str(results_path(out / "tamper")), "arms": {}}
    for label, curve in res["models"].items():  # a curve per arm, or per arm and attack (`mle lora lr=0.001`)
        name = names.get(curve["arm"], curve["arm"]) + label[len(curve["arm"]):]
        summary["arms"][name] = {
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
