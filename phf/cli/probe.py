"""Sub-commands `phf probe masks|reweighting|attribution|lengths|ending|tamper|guidance`, `phf redteam` and `phf rl`
(registered by phf.cli)."""
from __future__ import annotations

import json
from pathlib import Path

from phf.analysis.ending import ending_probe, format_ending
from phf.analysis.guidance import DEFAULT_STRENGTHS, format_guidance, pairs_in, run_guidance
from phf.analysis.lengths import lengths_probe
from phf.analysis.probes import attribution_probe, mask_sweep, reweighting_probe
from phf.analysis.redteam import RedTeamConfig, run_redteam
from phf.analysis.rl import run_rl
from phf.analysis.tamper import DEFAULT_STEPS, format_tamper, run_tamper
from phf.core.errors import PhfError
from phf.core.run_folder import results_path
from phf.report.page import write_report


def _summary(results: dict) -> dict:
    """The figures of a results dict without its long lists (scores, pools, segments)."""
    out = {}
    for k, v in results.items():
        if isinstance(v, dict):
            v = _summary(v)
        elif isinstance(v, list) and len(v) > 12:
            continue
        out[k] = v
    return out


def cmd_probe_masks(args) -> None:
    res = mask_sweep(args.model, Path(args.out), num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(json.dumps(_summary({k: v for k, v in res.items() if k != "scores"}), indent=2))


def cmd_probe_reweighting(args) -> None:
    res = reweighting_probe(args.base, args.finetuned, Path(args.out), num_samples=args.num_samples,
                            num_heldout=args.num_heldout, max_new_tokens=args.max_new_tokens, data_dir=args.data_dir,
                            seed=args.seed)
    print(json.dumps(_summary(res), indent=2))


def cmd_probe_attribution(args) -> None:
    res = attribution_probe(args.model, Path(args.out), text_file=args.text_file, heldout_chars=args.heldout_chars,
                            data_dir=args.data_dir)
    if args.text_file:
        for row in res["text_file"]["segments"]:
            print(f"{row['attribution']:+8.3f}  {row['score']:.4f}  {row['segment'].rstrip()}")
    print(json.dumps(res["heldout"], indent=2))


def cmd_probe_lengths(args) -> None:
    res = lengths_probe(args.dirs, out=args.out, scenario=args.scenario, window_chars=args.window_chars,
                        short_chars=args.short_chars)
    print(res["table"])
    print(f"results: {res['out']}")


def cmd_probe_ending(args) -> None:
    res = ending_probe(args.model, Path(args.out), num_docs=args.num_docs, data_dir=args.data_dir)
    print(format_ending(res))
    print(f"results: {results_path(args.out)}")


def cmd_probe_tamper(args) -> None:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    res = run_tamper(args.model, Path(args.out), reference=args.reference, steps=steps, unit=args.unit,
                     share=args.share, lr=_numbers("--lr", args.lr), lora=args.lora, lora_rank=args.lora_rank,
                     batch_size=args.batch_size, num_samples=args.num_samples, heldout_chars=args.heldout_chars,
                     seed=args.seed, data_dir=args.data_dir)
    print(format_tamper(res))
    print(f"results: {results_path(args.out)}")


def _numbers(flag: str, text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PhfError(f"{flag} takes numbers separated by commas (e.g. 1e-4,1e-3), got {text!r}") from None


def cmd_probe_guidance(args) -> None:
    if args.run and (args.model or args.reference):
        raise PhfError("give either --run DIR or --model/--reference, not both")
    if args.run:
        models, references = zip(*pairs_in(args.run))
    elif args.model and args.reference:
        models, references = args.model, args.reference
    else:
        raise PhfError("give --run DIR (a demo or sweep folder) or --model CONDITIONAL --reference MLE")
    out = Path(args.out) if args.out else Path(args.run) / "guidance" if args.run else None
    if out is None:
        raise PhfError("give --out DIR for the results (with --run it defaults to RUN/guidance)")
    strengths = [float(g) for g in args.strengths.split(",") if g.strip()]
    res = run_guidance(models, references, out, strengths=strengths, num_samples=args.num_samples, seed=args.seed,
                       kl_samples=args.kl_samples, heldout_chars=args.heldout_chars, data_dir=args.data_dir)
    print(format_guidance(res))
    if args.run and out == Path(args.run) / "guidance" and results_path(args.run).exists():
        print(f"report: {write_report([args.run])}")  # the report shows the curve beside the arms
    print(f"results: {results_path(out)}")


def cmd_redteam(args) -> None:
    cfg = RedTeamConfig(rounds=args.rounds, seeds=args.seeds, candidates=args.candidates, keep=args.keep,
                        continuations=args.continuations, temperature=args.temperature, seed=args.seed)
    res = run_redteam(args.model, Path(args.out), red_model=args.red_model, cfg=cfg, data_dir=args.data_dir)
    for name, t in res["targets"].items():
        for r in t["rounds"]:
            print(f"{name:12s} round {r['round']}: pool best {r['pool_best']:.4f}  pool mean {r['pool_mean']:.4f}  "
                  f"candidates mean {r['candidates_mean']:.4f}")
    print(f"results: {results_path(args.out)}")


def cmd_rl(args) -> None:
    res = run_rl(args.model, Path(args.out), args.overrides, max_tokens=args.max_tokens, data_dir=args.data_dir,
                 measure=not args.no_measure)
    print(json.dumps(_summary(res), indent=2))


def add_parsers(sub) -> None:
    probe = sub.add_parser("probe", help="probe what a model simulates: masks, reweighting, attribution; lengths, ending")
    psub = probe.add_subparsers(dest="probe", required=True, metavar="PROBE")

    p = psub.add_parser("masks", help="sample under <|aligned|>, <|misaligned|> and no token; compare the scores")
    p.add_argument("--model", required=True, help="model folder or run folder")
    p.add_argument("--out", required=True, help="folder for results.json and masks.png")
    p.add_argument("--num-samples", type=int, default=128, help="samples per condition")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's sample.max_new_tokens")
    p.add_argument("--temperature", type=float, help="default: the run's sample.temperature")
    p.add_argument("--top-p", type=float, help="default: the run's sample.top_p")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_probe_masks)

    p = psub.add_parser("reweighting", help="is a finetune a reweighting of its base's masks? KL to the best mixture")
    p.add_argument("--base", required=True, help="the (conditional) model the finetune started from")
    p.add_argument("--finetuned", required=True)
    p.add_argument("--out", required=True, help="folder for results.json and reweighting.png")
    p.add_argument("--num-samples", type=int, default=128, help="samples of the finetuned model")
    p.add_argument("--num-heldout", type=int, default=128, help="pieces of held-out test documents")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--data-dir", help="data folder of the scored corpus (default: from the run's run.json)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_probe_reweighting)

    p = psub.add_parser("attribution", help="per segment: log p(. | aligned) - log p(. | misaligned)")
    p.add_argument("--model", required=True, help="a conditionally trained model")
    p.add_argument("--out", required=True, help="folder for results.json and attribution.png")
    p.add_argument("--text-file", type=Path, help="a text to attribute segment by segment")
    p.add_argument("--heldout-chars", type=int, default=100_000, help="held-out text for the correlation")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_probe_attribution)

    p = psub.add_parser("lengths", help="misalignment and sample length, from run folders' samples.jsonl")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (one per model) holding samples.jsonl")
    p.add_argument("--out", help="JSON file for the results (default: lengths.json beside the first DIR)")
    p.add_argument("--scenario", default="unconditional", help="which samples: unconditional or prompted")
    p.add_argument("--window-chars", type=int, help="the fixed window (default: the task's fixed_window_chars)")
    p.add_argument("--short-chars", type=int, help="the short threshold (default: the task's short_sample_chars)")
    p.set_defaults(func=cmd_probe_lengths)

    p = psub.add_parser("ending", help="probability of <|endoftext|> at segment boundaries of held-out documents")
    p.add_argument("--model", required=True, action="append", help="model or run folder (repeat to compare)")
    p.add_argument("--out", required=True, help="folder for results.json")
    p.add_argument("--num-docs", type=int, default=64, help="held-out test documents")
    p.add_argument("--data-dir", help="data folder of the scored corpus (default: from the run's run.json)")
    p.set_defaults(func=cmd_probe_ending)

    p = psub.add_parser("tamper", help="finetune models on their corpus' most misaligned text; tokens until each "
                                       "reaches the MLE model's misalignment")
    p.add_argument("--model", action="append", required=True,
                   help="a model or run folder (repeatable: e.g. the demo's mle, filtering and conditional)")
    p.add_argument("--out", required=True)
    p.add_argument("--reference", help="the model whose untampered misalignment is the level to reach (a run "
                                       "folder's name; default: the one trained with MLE, else the first)")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                   help="adversarial steps after which each model is measured (default: %(default)s)")
    p.add_argument("--unit", choices=["segments", "documents"], default="segments",
                   help="the adversary's text: every misaligned segment of the training split (default), or the "
                        "most misaligned documents (--share of them)")
    p.add_argument("--share", type=float, default=0.1,
                   help="with --unit documents: the most misaligned share of the training documents (default: 0.1)")
    p.add_argument("--lr", default="1e-3",
                   help="the adversary's constant AdamW learning rate, or several separated by commas: a grid of "
                        "attacks, each measured on every model (default: %(default)s)")
    p.add_argument("--lora", action="store_true",
                   help="attack with LoRA adapters (every linear layer, the model frozen) at every --lr too, beside "
                        "full finetuning (pip install 'phf[lora]')")
    p.add_argument("--lora-rank", type=int, default=8, help="the rank of the LoRA adapters (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows of the model's context per step")
    p.add_argument("--num-samples", type=int, default=128, help="unconditional samples per measured point")
    p.add_argument("--heldout-chars", type=int, default=0,
                   help="held-out characters for bits/char per point (default: the run's eval.heldout_chars)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="the data folder the models were trained from (default: from run.json)")
    p.set_defaults(func=cmd_probe_tamper)

    p = psub.add_parser("guidance", help="a conditional model's misalignment against KL from MLE and held-out "
                                         "bits/char over guidance strengths")
    p.add_argument("--run", help="a folder written by `phf demo` or `phf sweep`: its conditional and mle runs (every "
                                 "seed's); results go to RUN/guidance and into its report")
    p.add_argument("--model", action="append", help="a conditional model or run folder (repeatable: one per seed)")
    p.add_argument("--reference", action="append",
                   help="the MLE model to compare with (one, or one per --model, in the same order)")
    p.add_argument("--out", help="folder for results.json and guidance.png (default with --run: RUN/guidance)")
    p.add_argument("--strengths", default=",".join(f"{g:g}" for g in DEFAULT_STRENGTHS),
                   help="guidance strengths (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=256, help="unconditional samples per strength and seed")
    p.add_argument("--kl-samples", type=int, help="samples of the MLE model for the KL (default: the run's "
                                                  "eval.kl_samples)")
    p.add_argument("--heldout-chars", type=int, default=0,
                   help="held-out characters for bits/char (default: the run's eval.heldout_chars)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first replicate (+1 per replicate)")
    p.add_argument("--data-dir", help="the data folder the models were trained from (default: from run.json)")
    p.set_defaults(func=cmd_probe_guidance)

    p = sub.add_parser("redteam", help="search for prompts that make a model misbehave (red model vs target)")
    p.add_argument("--model", required=True, action="append",
                   help="target model or run folder (repeat to compare objectives in one figure)")
    p.add_argument("--out", required=True, help="folder for results.json and redteam.png")
    p.add_argument("--red-model", help="the model that writes prompts (default: the sibling `mle` run)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=16, help="held-out prompts that seed the pool")
    p.add_argument("--candidates", type=int, default=16, help="candidate prompts per round")
    p.add_argument("--keep", type=int, default=4, help="best candidates that join the pool per round")
    p.add_argument("--continuations", type=int, default=8, help="target continuations per prompt")
    p.add_argument("--temperature", type=float, default=0.1, help="few-shot weights exp(score / (T * best seed))")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_redteam)

    p = sub.add_parser("rl", help="RL finetuning baseline (GRPO, KL penalty) with the scorer as the reward")
    p.add_argument("--model", required=True, help="start model (folder or run folder)")
    p.add_argument("--out", required=True, help="folder for checkpoint/, metrics.jsonl, results.json")
    p.add_argument("--max-tokens", type=int, help="prompt + completion tokens (default: the run's train.max_tokens)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="rl.beta=0.04, rl.lr=1e-5, rl.batch_size=16, ... or a run-config field (repeatable)")
    p.add_argument("--data-dir")
    p.add_argument("--no-measure", action="store_true", help="skip the before/after reward-hacking figures")
    p.set_defaults(func=cmd_rl)


__all__ = ["add_parsers", "PhfError"]
