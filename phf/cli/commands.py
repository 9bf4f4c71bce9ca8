"""The commands of the flow's stages and recipes (`phf score`, `train`, `demo`, `sweep`, ...): their parsers and
what each runs. phf.cli.main imports this module only when one of them is run."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from transformers import AutoTokenizer

from phf.analysis.rl import format_rl_study
from phf.analysis.tamper import format_tamper
from phf.core.config import Quantile, SampleConfig, documented_yaml, load_config
from phf.core.errors import PhfError
from phf.core.objective_specs import ARM_NAMES, OBJECTIVE_SPECS, finetune_objectives, sweep_objectives
from phf.core.io import atomic_path, read_json
from phf.core.run_folder import recorded_path, results_path, write_results
from phf.data.corpus import Corpus
from phf.data.scoring import format_distribution, record_distribution
from phf.data.tokenizer import tokenizer_for
from phf.evaluation.evaluate import evaluate_checkpoint
from phf.evaluation.kl import DeployedModel, KLReference
from phf.evaluation.sampling import Deployment, deployed_sampling, generate
from phf.model.finetune import model_source, resolve_model_folder
from phf.model.lm import load_meta, load_model
from phf.recipes.configs import DemoConfig, ScalingConfig, SweepConfig
from phf.recipes.demo import format_table, preset_path, run_demo
from phf.recipes.replicates import rejudge
from phf.recipes.scaling import format_scaling, run_scaling
from phf.recipes.sweep import run_sweep
from phf.report.page import write_report
from phf.tasks import all_sources, get_task, score_run_corpus, task_for
from phf.training.trainer import prepare_data, run_training

log = logging.getLogger("phf")


def _add_config_args(p: argparse.ArgumentParser, task_default: str | None = "pep8") -> None:
    p.add_argument("--config", type=Path, help="YAML run config (default: the task's config for the objective, "
                   "phf/tasks/<task>/configs/base.yaml with the objective's defaults for the task)")
    p.add_argument("--task", default=task_default, help="task whose shipped config to start from (default: pep8)")
    p.add_argument("--objective", help="start from the task's config for this objective "
                   f"({', '.join(ARM_NAMES)}) or a shipped config of the task (paper-124m) (default: mle)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")


def _load(args, extra: list[str] | None = None, defaults: list[str] | None = None):
    """The run config: --config FILE or the task's shipped one, then `defaults`, the --set overrides, `extra`."""
    if args.config and args.objective:
        raise PhfError("give --config FILE or --objective NAME (a shipped config of the task), not both; with your "
                       "own file, set the objective with --set objective.name=NAME")
    overrides = (defaults or []) + list(args.overrides) + (extra or [])
    if args.config:
        return load_config(args.config, overrides)
    return get_task(args.task).run_config(args.objective or "mle", overrides)


def cmd_corpus(args) -> None:
    cfg = _load(args, [f"corpus.source={args.corpus}"] if args.corpus else [])
    corpus = Corpus(cfg.corpus, all_sources(), cfg.scoring.precomputed)
    n = chars = 0
    for doc in corpus:
        n += 1
        chars += len(doc.text)
    if n == 0:
        raise PhfError(f"corpus {cfg.corpus.source} has no usable document; skipped: {dict(corpus.stats.skipped)}")
    print(json.dumps({"source": cfg.corpus.source, "chars": chars, **corpus.stats.summary()}, indent=2))


def cmd_score(args) -> None:
    extra = [f"corpus.source={args.corpus}"] if args.corpus else []
    if args.workers is not None:
        extra.append(f"scoring.workers={args.workers}")
    if args.backend:
        extra.append(f"scoring.backend={args.backend}")
    if args.scorer:
        extra.append(f"scoring.scorer={args.scorer}")
    cfg = _load(args, extra)
    scored = score_run_corpus(cfg, args.out, rescore=args.rescore)
    task = task_for(cfg)
    summary = scored.summary(task.misaligned_above)
    summary["distribution"] = record_distribution(scored, _thresholds(task, cfg), task.score_scale == "log")
    log.info("%s", format_distribution(summary["distribution"]))
    print(json.dumps(summary, indent=2))


def _thresholds(task, cfg) -> dict:
    """The thresholds a run of this task takes: the task's misalignment threshold, each objective's default
    threshold (a value, or a Quantile of the training document scores), and this config's own if it sets one."""
    out = {"misaligned_above": task.misaligned_above}
    for spec in OBJECTIVE_SPECS.values():
        defaults = task.defaults_for(spec.name)
        if "threshold" in defaults and spec.defaults_of is None:  # masking's is conditional training's
            out[f"{spec.name} threshold"] = defaults["threshold"]
    own = cfg.objective
    if own.threshold is not None or own.threshold_quantile is not None:
        out[f"{own.name} threshold (this config)"] = own.threshold if own.threshold is not None else \
            Quantile(own.threshold_quantile)
    return out


def cmd_tokenizer(args) -> None:
    cfg = _load(args, [f"corpus.source={args.corpus}"] if args.corpus else [])
    scored = score_run_corpus(cfg, args.out)
    tok, path = tokenizer_for(scored, cfg.tokenizer, Path(args.out))
    print(json.dumps({"tokenizer": str(path), "vocab_size": tok.get_vocab_size()}, indent=2))


def _init_from(args) -> Path | None:
    """The local folder of --init-from (a hub id only from the cache, unless --allow-download), or None."""
    return model_source(args.init_from, args.allow_download) if args.init_from else None


def cmd_prepare(args) -> None:
    cfg = _load(args)
    init_from = _init_from(args)
    data = prepare_data(cfg, Path(args.data_dir), tokenizer_source=init_from)
    print(json.dumps({"scored_corpus": str(data.scored.path), "tokenizer": str(data.tokenizer_file),
                      "streams": {k: {"path": str(v.prefix), "tokens": len(v)} for k, v in data.streams.items()}},
                     indent=2))


def cmd_train(args) -> None:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise PhfError(f"{run_dir} is not a run folder (no config.yaml); give the --out folder of a `phf train`")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        data_dir = args.data_dir or recorded_path(run_dir, "data_dir")
        result = run_training(cfg, run_dir, data_dir or run_dir / "data", resume=True)
    else:
        if not args.out:
            raise PhfError("phf train needs --out DIR (or --resume DIR)")
        cfg = _load(args)
        init_from = _init_from(args)
        result = run_training(cfg, Path(args.out), args.data_dir, init_from=init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(result.checkpoint), "steps": result.steps, "tokens": result.tokens,
                          "seconds": round(result.seconds, 1), "val_loss": result.final_val_loss}, indent=2))


def cmd_sample(args) -> None:
    model = load_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    meta = load_meta(args.model)
    dep = Deployment.from_meta(meta)
    if args.unconditioned:
        dep = Deployment([], dep.banned_tokens, None)
    prompts = [""] * args.num_samples
    if args.prompts:
        prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    cfg = SampleConfig(num_samples=len(prompts), seed=args.seed,
                       **deployed_sampling(meta, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p, guidance=args.guidance))
    if args.unconditioned:
        cfg.guidance = 0.0  # guidance is a conditioning too
    cfg.validate()
    samples = generate(model, tok, prompts, cfg, dep, "prompted" if args.prompts else "unconditional",
                       segmenter=meta.get("segmenter") or get_task(meta.get("task", "pep8")).segmenter)
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(s.__dict__) + "\n" for s in samples))
    print(f"wrote {len(samples)} samples to {args.out}")


def cmd_evaluate(args) -> None:
    # without a config of its own the model is evaluated as it was deployed (its phf.json's sampling settings)
    stored = {} if args.config else load_meta(resolve_model_folder(args.model)).get("sample") or {}
    cfg = _load(args, [f"corpus.source={args.corpus}"] if args.corpus else [],
                defaults=[f"sample.{k}={v}" for k, v in stored.items()])
    scored = score_run_corpus(cfg, args.data_dir)

    res = evaluate_checkpoint(resolve_model_folder(args.model), cfg, scored, Path(args.out))
    if args.reference:  # capability as KL(reference || model), from samples of the reference
        ref = KLReference.sample(args.reference, cfg.eval.kl_samples, cfg.eval.kl_max_new_tokens, cfg.eval.kl_seed,
                                 task_for(cfg).segmenter)
        res.update(ref.kl(DeployedModel.load(args.model)), reference=str(args.reference))
        write_results(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))


def cmd_config_show(args) -> None:
    print(documented_yaml(_load(args)), end="")


def demo_config(args) -> DemoConfig:
    """The demo's config from `phf demo`'s flags (a preset is its task's config file)."""
    config = args.config
    if args.preset:
        if config:
            raise PhfError("give --preset or --config, not both (a preset is a config file: `--set` changes it)")
        config = preset_path(args.task, args.preset)
    objectives = [n.strip() for n in args.objectives.split(",") if n.strip()] if args.objectives else None
    return DemoConfig(task=args.task, out=args.out, overrides=args.overrides, objectives=objectives, config=config,
                      init_from=_init_from(args), seeds=args.seeds)


def cmd_demo(args) -> None:
    results = run_demo(demo_config(args))
    print()
    print(format_table(results))
    print(f"\nresults: {results_path(args.out)}")


def cmd_judge(args) -> None:
    results = rejudge(args.dir, args.judge)
    print(format_table(results))
    print(f"\nresults: {results_path(args.dir)}")


def sweep_config(args) -> SweepConfig:
    """The sweep's config from `phf sweep`'s flags (`--set rl.KEY=VALUE` goes to the RL arms)."""
    def names(text):
        return [] if text in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]

    return SweepConfig(task=args.task, out=args.out, overrides=[o for o in args.overrides if not o.startswith("rl.")],
                       objectives=names(args.objectives) if args.objectives is not None else None,
                       finetune=names(args.finetune) if args.finetune is not None else None,
                       finetune_fraction=args.finetune_fraction, report=not args.no_report, rl=args.rl,
                       rl_tokens=args.rl_tokens, rl_overrides=[o for o in args.overrides if o.startswith("rl.")],
                       config=args.config, seeds=args.seeds,
                       rl_bases=names(args.rl_bases) if args.rl_bases is not None else None,
                       tamper=tamper_settings(args.tamper_settings) if args.tamper or args.tamper_settings else None)


def tamper_settings(pairs: list[str]) -> dict:
    """`--tamper-set KEY=VALUE` flags as the tamper probe's settings (its config reads the values' text)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PhfError(f"--tamper-set takes KEY=VALUE (e.g. lr=1e-4,1e-3), got {pair!r}")
        settings[key.strip().replace("-", "_")] = value.strip()
    return settings


def cmd_sweep(args) -> None:
    results = run_sweep(sweep_config(args))
    print()
    print(format_table(results))
    study = results.get("rl_from_bases")
    if study:
        print()
        print(format_rl_study(study))
    if results.get("tamper", {}).get("results"):
        print()
        print(format_tamper(read_json(results["tamper"]["results"])))
    print(f"\nresults: {results_path(args.out)}")
    if results.get("report"):
        print(f"report: {results['report']}")


def scaling_config(args) -> ScalingConfig:
    """The grid's config from `phf scaling`'s flags."""
    try:
        tokens = [int(float(t)) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise PhfError(f"--tokens must be token budgets, comma-separated (e.g. 350000,700000), got {args.tokens!r}") \
            from None
    return ScalingConfig(tokens=tokens, task=args.task, out=args.out,
                         sizes=[z.strip() for z in args.sizes.split(",") if z.strip()], seeds=args.seeds,
                         objective=args.objective, overrides=args.overrides)


def cmd_scaling(args) -> None:
    results = run_scaling(scaling_config(args))
    print(format_scaling(results))
    print(f"\nresults: {results_path(args.out)}")


def cmd_report(args) -> None:
    page = write_report(args.dirs, args.out)
    print(f"report: {page}")


def add_parsers(sub) -> None:
    """The sub-commands of this module, on the `phf` parser's subparsers."""
    p = sub.add_parser("corpus", help="list a corpus: documents per split and skipped files")
    _add_config_args(p)
    p.add_argument("--corpus", help="folder of text files, .jsonl with a `text` field, .parquet, or `stdlib`")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("score", help="segment and score a corpus into Parquet shards (cached, resumable); print "
                                     "the score distribution and each threshold's quantile")
    _add_config_args(p)
    p.add_argument("--corpus", help="folder of text files, .jsonl with a `text` field, .parquet, or `stdlib`")
    p.add_argument("--scorer", help="registered scorer name, hf-classifier:PATH[:LABEL] (a local sequence "
                                    "classifier) or module:callable (default: the task's)")
    p.add_argument("--workers", type=int, help="scoring processes (default: one per core)")
    p.add_argument("--backend", choices=["local", "ray"],
                   help="local process pool (default) or Ray Data on a Ray cluster (pip install 'phf[ray]')")
    p.add_argument("--out", required=True, help="data folder; the scored corpus goes to OUT/scored/<scorer>-<hash>")
    p.add_argument("--rescore", action="store_true",
                   help="score again even when these inputs were scored (editing a corpus file or a scorer's "
                        "source rescores without it)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on the training split")
    _add_config_args(p)
    p.add_argument("--corpus")
    p.add_argument("--out", required=True, help="data folder (scores are reused from it)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("prepare", help="score, tokenizer and token streams of a run config, before training "
                                       "(so a torchrun job starts from prepared data)")
    _add_config_args(p)
    p.add_argument("--data-dir", required=True, help="the data folder `phf train --data-dir` will read")
    p.add_argument("--init-from", metavar="MODEL", help="the model the run will start from (its tokenizer)")
    p.add_argument("--allow-download", action="store_true", help="let --init-from download a hub id")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model with an objective (torchrun-ready)")
    _add_config_args(p)
    p.add_argument("--out", help="run folder: config, metrics.jsonl, checkpoint/")
    p.add_argument("--data-dir", help="where scored corpora, tokenizers and token streams are cached "
                                      "(default: OUT/data)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from a Hugging Face causal-LM folder of any architecture, with its own tokenizer "
                        "(finetuning with feedback); a hub id only from the local cache, unless --allow-download")
    p.add_argument("--allow-download", action="store_true",
                   help="let --init-from download a hub id (by default nothing is downloaded)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from a model folder as it is deployed")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="samples .jsonl")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--prompts", type=Path, help=".jsonl with a `prompt` field per line")
    deployed = " (default: as the model was evaluated, from its phf.json)"
    p.add_argument("--max-new-tokens", type=int, help="tokens per sample" + deployed)
    p.add_argument("--temperature", type=float, help="sampling temperature" + deployed)
    p.add_argument("--top-p", type=float, help="nucleus mass" + deployed)
    p.add_argument("--guidance", type=float, help="classifier-free guidance of a conditional model" + deployed)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unconditioned", action="store_true",
                   help="no control-token prefix and no guidance even if the model has them")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="sample, score and measure held-out bits/char of a model")
    _add_config_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus")
    p.add_argument("--data-dir", required=True, help="data folder holding (or to hold) the scored corpus")
    p.add_argument("--reference", help="also estimate KL(reference || model) from samples of this model folder "
                                       "or run (eval.kl_samples, eval.kl_max_new_tokens)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="score, train MLE / filtering / conditional, sample, evaluate, print a table")
    p.add_argument("--task", default=DemoConfig.task, help="a shipped task: pep8, pii, toxicity (default: "
                                                            "%(default)s)")
    p.add_argument("--config", type=Path, help="your own run config instead of the task's shipped ones (a task "
                                               "of your own: see the README); one model per objective")
    p.add_argument("--preset", metavar="NAME",
                   help="a shipped scale of the task's demo: `gpu` (pep8: GPT-2 small on the standard library and "
                        "the installed packages, evaluated as the paper does, ~10 min on one H100/H200)")
    p.add_argument("--out", default=str(DemoConfig.out))
    p.add_argument("--objectives", metavar="ARMS",
                   help="the arms, comma-separated: objectives or named variants "
                        f"({', '.join(ARM_NAMES)}; default: the task's, mle,filtering,conditional)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every objective's config (repeatable)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="finetune every arm from this Hugging Face causal-LM folder (any architecture, its own "
                        "tokenizer) instead of training from scratch")
    p.add_argument("--allow-download", action="store_true", help="let --init-from download a hub id")
    p.add_argument("--seeds", type=int, default=DemoConfig.seeds,
                   help="train and sample every arm with this many seeds (train.seed, sample.seed + 0, 1, ...); the "
                        "table shows means over seeds with 95%% intervals (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("judge", help="score the samples of a demo or sweep folder with a held-out judge (again) "
                                     "and recombine its results with intervals")
    p.add_argument("dir", help="a folder written by phf demo or phf sweep")
    p.add_argument("--judge", default="", help="a scorer name or module:callable (default: each run's eval.judge, "
                                               "else its task's)")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("scaling", help="an objective's misalignment ratio to MLE against training tokens and model "
                                       "size, over seeds, with the slope")
    p.add_argument("--task", default=ScalingConfig.task, help="a shipped task (default: %(default)s)")
    p.add_argument("--tokens", required=True, help="token budgets, comma-separated (e.g. 350000,700000,1400000)")
    p.add_argument("--sizes", default=",".join(ScalingConfig.sizes),
                   help="model sizes LAYERSxWIDTH, comma-separated (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=ScalingConfig.seeds, help="seeds per grid point (default: "
                                                                          "%(default)s)")
    p.add_argument("--objective", default=ScalingConfig.objective,
                   help="the objective compared with MLE (default: %(default)s)")
    p.add_argument("--out", default=str(ScalingConfig.out))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override every run's config (e.g. objective.control_embedding=false sample.guidance=0 for "
                        "the paper's form of conditional training)")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("sweep", help="every objective, pretraining vs. finetuning with feedback, KL from MLE, "
                                     "a table and a report")
    p.add_argument("--task", default=SweepConfig.task, help="a shipped task: pep8, pii, toxicity (default: "
                                                             "%(default)s)")
    p.add_argument("--config", type=Path, help="your own run config instead of the task's shipped ones")
    p.add_argument("--out", default=str(SweepConfig.out))
    p.add_argument("--objectives", help=f"pretraining arms, comma-separated (default: {','.join(sweep_objectives())}"
                   "; mle is required)")
    p.add_argument("--finetune", help="objectives of the finetune arms, comma-separated, or `none` "
                                      f"(default: {','.join(finetune_objectives())})")
    p.add_argument("--finetune-fraction", type=float, default=SweepConfig.finetune_fraction,
                   help="share of the budget the finetune arms train with feedback, after MLE (default: %(default)s)")
    p.add_argument("--rl", action="store_true", help="add RL arms (GRPO from the MLE weights the finetune arms start "
                                                     "from, and from the conditional arm's at the same step; needs "
                                                     "the `rl` extra)")
    p.add_argument("--rl-tokens", type=int, default=SweepConfig.rl_tokens,
                   help="prompt + completion tokens of each RL arm (default: %(default)s)")
    p.add_argument("--tamper", action="store_true",
                   help="finetune every arm on the corpus' misaligned text (phf probe tamper at its defaults): "
                        "adversarial tokens to the MLE model's misalignment, per arm")
    p.add_argument("--tamper-set", dest="tamper_settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the tamper probe, e.g. lr=1e-4,1e-3 and lora=true for a grid of full and LoRA "
                        "attacks, or num_samples=256 (repeatable; implies --tamper; see phf probe tamper --help)")
    p.add_argument("--rl-bases", help="pretraining arms RL starts from, comma-separated (default: mle,conditional "
                                      "where the sweep has them; mle is always one)")
    p.add_argument("--no-report", action="store_true", help="skip writing report.html")
    p.add_argument("--seeds", type=int, default=SweepConfig.seeds,
                   help="run the whole sweep with this many seeds (DIR/seed-<seed>/, one data folder); the table and "
                        "report show means over seeds with 95%% intervals (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every arm's config (repeatable)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("config", help="show a resolved run config with every field's documentation")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config (YAML), each field with its documentation")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("report", help="write an offline HTML report (figures, table, samples) of result folders")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders written by `phf demo` or `phf sweep`")
    p.add_argument("--out", help="where report.html and figures/ go (default: the first DIR)")
    p.set_defaults(func=cmd_report)
