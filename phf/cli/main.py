"""The `phf` command: one sub-command per stage of the flow, plus `demo` that runs them all.

    phf score      corpus -> segments -> scored corpus (Parquet + manifest)
    phf tokenizer  scored corpus -> byte-level BPE with control tokens
    phf prepare    config -> scored corpus, tokenizer, token streams (before a multi-process training job)
    phf train      config -> token stream -> model (HF folder)
    phf sample     model -> samples.jsonl
    phf evaluate   model -> samples, scores, held-out bits/char -> results.json
    phf demo       all of the above for MLE, filtering and conditional training, and a table
    phf sweep      all objectives, pretraining vs. finetuning with feedback, KL from MLE, table + report
    phf scaling    an objective's misalignment ratio to MLE over a grid of token budgets and model sizes, with seeds
    phf judge      a demo or sweep folder's samples scored by a held-out judge, results recombined with intervals
    phf bench      throughput figures of scoring, training and sampling
    phf config     show the resolved config of a task or file, each field with its documentation
    phf report     result folders -> report.html (figures, table, sample browser) + figures/*.png
    phf probe      what a model does and simulates, with numbers: masks, reweighting, attribution, tamper,
                   guidance, ... (`phf probe --help` lists every probe)
    phf redteam    automated adversarial prompt search against a model, per round
    phf rl         RL finetuning baseline (GRPO with a KL penalty, the scorer as reward)

`phf COMMAND --help` shows a command's options.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from phf.core.errors import PhfError

# Each command's module: the parser and the command are imported only for the command that runs, so that
# `phf --help` and a mistyped command answer at once instead of after importing torch and transformers.
COMMANDS = {
    "corpus": "phf.cli.commands", "score": "phf.cli.commands", "tokenizer": "phf.cli.commands",
    "prepare": "phf.cli.commands", "train": "phf.cli.commands", "sample": "phf.cli.commands",
    "evaluate": "phf.cli.commands", "demo": "phf.cli.commands", "judge": "phf.cli.commands",
    "scaling": "phf.cli.commands", "sweep": "phf.cli.commands", "bench": "phf.cli.bench",
    "config": "phf.cli.commands", "report": "phf.cli.commands", "probe": "phf.cli.probe",
    "redteam": "phf.cli.probe", "rl": "phf.cli.probe",
}


def command_in(argv: list[str]) -> str | None:
    """The sub-command named on the command line: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `phf` parser. Only `command`'s module adds its full parsers; every other command is listed by name."""
    parser = argparse.ArgumentParser(prog="phf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module = COMMANDS.get(command)
    for name, home in COMMANDS.items():
        if home != module:
            sub.add_parser(name, add_help=False)
    if module:
        importlib.import_module(module).add_parsers(sub)
    return parser


def _offline_unless_allowed(argv: list[str]) -> None:
    """Before transformers is imported (it reads these once): nothing is downloaded unless the user allows it
    (--allow-download, or HF_HUB_OFFLINE=0)."""
    if "--allow-download" in argv:
        os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _offline_unless_allowed(argv)
    args = build_parser(command_in(argv)).parse_args(argv)
    runtime = importlib.import_module("phf.core.runtime")  # it imports torch: only once a command runs
    runtime.tune_allocator()  # large tensors stay on the heap between training steps
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="phf: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        args.func(args)
    except PhfError as exc:
        print(f"phf: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("phf: interrupted; completed files were kept (run the same command again to resume)", file=sys.stderr)
        sys.exit(130)
