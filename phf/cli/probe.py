"""Sub-commands `phf probe NAME` (one per probe record of phf.analysis.registry, its parser built from the
probe's config class), `phf redteam` and `phf rl` (registered by phf.cli)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from phf.analysis.redteam import RedTeamConfig, run_redteam
from phf.analysis.registry import Probe, probes, summary
from phf.analysis.rl import run_rl
from phf.core.config import field_docs
from phf.core.run_folder import results_path
from phf.report.page import write_report


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of a probe's config dataclass: `--field-name`, its documentation as the help, its
    default (shown), its type; metadata `required`, `append`, `positional`, `choices`, `metavar` (see
    phf.analysis.registry.ProbeConfig). Values left out stay None, so the config's own defaults apply."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, hint = f.metadata, hints[f.name]
        default = None if f.default is dataclasses.MISSING else f.default
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
            if isinstance(default, tuple) else default
        text = docs.get(f.name, "").replace("%", "%%").rstrip(".")
        if shown not in (None, False, "", ()):
            text += f" (default: {shown})"
        kw: dict = {"help": text, "default": None}
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=meta.get("metavar", f.name.upper()), help=text)
            continue
        if hint is bool:
            kw.update(action="store_true", default=False)
        elif meta.get("append"):
            kw.update(action="append")
        else:
            kw.update(type=_scalar(hint), choices=meta.get("choices"), metavar=meta.get("metavar"))
        parser.add_argument("--" + f.name.replace("_", "-"), required=bool(meta.get("required")), **kw)


def _scalar(hint) -> type:
    """The argparse type of a field: int or float (optionally None), else the text (a tuple of numbers is parsed
    by the config, so that a bad list is the config's one-line error)."""
    if typing.get_origin(hint) is tuple:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (int, float) else str


def _probe_command(spec: Probe):
    def command(args) -> None:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(spec.config)}
        cfg = spec.config.of({k: v for k, v in values.items() if v is not None})
        results = spec.run(cfg)
        print(spec.show(results, cfg))
        folder = spec.report_folder(cfg)
        if folder is not None:
            print(f"report: {write_report([folder])}")  # the report shows the study beside the arms

    return command


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
    print(json.dumps(summary(res), indent=2))


def add_parsers(sub) -> None:
    probe = sub.add_parser("probe", help="probe what a model simulates and does: "
                                         + ", ".join(probes()))
    psub = probe.add_subparsers(dest="probe", required=True, metavar="PROBE")
    for spec in probes().values():
        p = psub.add_parser(spec.name, help=spec.help)
        add_config_arguments(p, spec.config)
        p.set_defaults(func=_probe_command(spec))

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


__all__ = ["add_parsers", "add_config_arguments"]
