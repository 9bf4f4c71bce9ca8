"""`phf bench`: the benchmarks of a source checkout (its `benchmarks/` folder, beside the package as nanoGPT keeps
bench.py beside its model), run from the command line. The wheel ships the library only, so an installed phf
without its checkout says where the benchmarks are instead of failing on an import."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

from phf.core.errors import PhfError
from phf.core.io import write_json

CHECKOUT = Path(__file__).resolve().parents[2]  # the folder that holds phf/ (and, in a checkout, benchmarks/)


def load_benchmark(module: str):
    """`benchmarks.<module>` of the checkout this phf runs from. The checkout goes on sys.path and PYTHONPATH, so
    the benchmarks' own processes (references in a fresh interpreter, scoring workers) import it too."""
    if not (CHECKOUT / "benchmarks" / "bench.py").is_file():
        raise PhfError(f"phf bench runs the benchmarks/ folder of a source checkout, and this phf ({CHECKOUT / 'phf'}) "
                       f"is an installed package without one: clone the phf repository and run `python -m phf bench` "
                       f"from its root")
    root = str(CHECKOUT)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])
    return importlib.import_module(f"benchmarks.{module}")


def cmd_bench(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:  # phf beside plain PyTorch, transformers' Trainer and generate, on the paper's shape
        figures = _on_device(args)
    else:
        bench = load_benchmark("bench")
        figures = bench.run(args.what, quick=args.quick, large=args.large)
    if args.out:
        write_json(Path(args.out), figures)
    if args.device and not args.json:
        print(load_benchmark("paper_shape").format_ratios(figures))
    elif args.json:  # one section: its figures at the top level, beside the machine they were measured on
        print(json.dumps(figures if args.what == "all" or args.device
                         else {**figures[args.what], "machine": figures["machine"]}, indent=2))
    else:
        print(load_benchmark("bench").format_figures(figures))


def _on_device(args) -> dict:
    if args.what not in ("train", "sample", "all"):
        raise PhfError(f"--device measures training and sampling (phf bench train|sample --device ...), not "
                       f"{args.what}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise PhfError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; run on a GPU "
                       f"machine (benchmarks/gpu_check.sh), or try the code path here with --device cpu --quick")
    shape = load_benchmark("paper_shape")
    out = Path(args.out) if args.out else None
    figures = {"machine": shape.machine(args.device)}
    if args.what in ("train", "all"):
        figures["train"] = load_benchmark("paper_train").run(args.device, args.quick, args.skip, out, figures)
    if args.what in ("sample", "all"):
        figures["sample"] = load_benchmark("paper_sample").run(args.device, args.quick, args.skip, out, figures)
    return figures


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="print throughput figures (scoring, training, sampling)",
                       description="Throughput figures of a source checkout's benchmarks/ folder. Without "
                                   "--device: scoring, training and sampling on this machine's CPU. With --device: "
                                   "phf's training and sampling beside plain PyTorch, transformers' Trainer and "
                                   "generate on the paper's 124M shape (--quick: a tiny shape, seconds on a CPU).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "score", "train", "sample"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="smaller measurements (seconds, not minutes)")
    p.add_argument("--large", action="store_true",
                   help="score: also the pipeline on generated 0.5 and 2 GB jsonl.zst corpora, peak memory of each "
                        "(minutes; needs ~1 GB of free disk)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: one per core); fewer when other processes hold cores")
    p.add_argument("--device", help="train|sample on this device (cuda, cpu) beside the references, on the "
                                    "paper-124m shape (with --quick a tiny one)")
    p.add_argument("--skip", default="", help="with --device: contenders not to run, comma-separated names or "
                                              "prefixes (e.g. compiled)")
    p.add_argument("--out", help="also write the figures to this JSON file (with --device: after each contender)")
    p.set_defaults(func=cmd_bench)
