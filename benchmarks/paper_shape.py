"""What the device benchmarks share: the shape measured (the paper's 124M PEP8 config, or a tiny one that runs in
seconds on a CPU), a synthetic token stream and tokenizer of the shape's vocabulary, the device's measured bf16
matmul peak, a timed window of steps, figures written after each contender, and the table of phf's ratios."""
from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from phf.core.config import RunConfig, load_config
from phf.core.io import write_json
from phf.core.runtime import cpu_has_native_bf16
from phf.core.tokens import CONTROL_TOKENS, EOS
from phf.tasks import get_task

PAPER_CONFIG = "paper-124m"  # phf/tasks/pep8/configs/paper-124m.yaml: GPT-2 small, batch 16 x 1,024 x grad_accum 4
PAPER_VOCAB = 32_770  # the paper's tokenizer (32,768) and phf's two control tokens
TINY_OVERRIDES = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                  "train.batch_size=4", "train.grad_accum=2"]


@dataclass
class Shape:
    """One measured shape: the run config phf trains with and how long each contender is timed."""
    name: str
    cfg: RunConfig
    vocab: int
    warmup_steps: int  # training steps before the timed window (compilation happens here)
    max_steps: int  # the timed window ends after this many steps ...
    seconds: float  # ... or once it has lasted this long
    sync_check_steps: int  # phf's training steps under torch.cuda.set_sync_debug_mode (GPU only)
    sample_shapes: list[tuple[int, int]] = field(default_factory=list)  # (rows, new tokens), smallest first
    # each sampler's whole budget (both sizes, its process' start included), in the order sampled; the last
    # stands for all after it
    sample_budgets: tuple[float, ...] = (60.0,)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.model.block_size


def shape(quick: bool) -> Shape:
    """The paper's shape (minutes on an H100/H200), or with `quick` a tiny one (seconds on a CPU)."""
    path = get_task("pep8").config_path(PAPER_CONFIG)
    if quick:
        tiny = load_config(path, TINY_OVERRIDES)
        return Shape("tiny", tiny, 512, 1, 3, 5.0, 2, [(4, 8), (8, 16)], (50.0, 50.0, 40.0))  # 220 s at most
    sample = load_config(path).sample
    # on an H100/H200: training about 3.5 minutes (two of the five contenders compile), sampling at most 3.75:
    # phf's default sampler 90 s (a first and a second call at 4,096 x 640), the compiled generate 75, others 20
    return Shape(PAPER_CONFIG, load_config(path), PAPER_VOCAB, 3, 30, 10.0, 3,
                 [(64, 256), (sample.num_samples, sample.max_new_tokens)], (90.0, 75.0, 20.0))


def machine(device: str) -> dict:
    out = {"device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
           "platform": platform.platform(),
           "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return out


# -- synthetic data: speed does not depend on which tokens are read ---------------------------------------------
def synthetic_tokenizer(path: Path, vocab: int) -> Path:
    """A real word-level tokenizer of `vocab` entries (phf's special tokens first): the vocabulary size the model
    is built with, without training a BPE on a corpus of the paper's size."""
    from tokenizers import Tokenizer, models

    specials = [EOS, *CONTROL_TOKENS]
    words = {t: i for i, t in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab)})
    Tokenizer(models.WordLevel(words, unk_token=EOS)).save(str(path))
    return path


def synthetic_stream(prefix: Path, tokens: int, vocab: int, seed: int = 0):
    """A token stream in phf's format (memmapped tokens and zero scores) of uniformly random tokens."""
    from phf.data.token_stream import TokenStream

    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    rng.integers(0, vocab, size=tokens).astype(dtype).tofile(f"{prefix}.tokens.bin")
    np.zeros(tokens, np.float32).tofile(f"{prefix}.scores.bin")
    write_json(Path(f"{prefix}.json"), {"dtype": np.dtype(dtype).name, "num_tokens": tokens, "synthetic": True})
    return TokenStream(prefix)


# -- the device ----------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_memory(device: torch.device) -> None:
    """Free what the previous contender left, and start the peak of this one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since start_memory; None on a CPU (see `phf bench` without --device)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def peak_matmul(device: torch.device, quick: bool) -> tuple[float, str]:
    """The device's matmul peak (TFLOP/s) measured now, the best of a few large square matmuls, and the precision
    it was measured in: bf16 on a GPU and on a CPU that has bf16 in hardware; fp32 on a CPU without it, which
    converts bf16 products in software (~1 GFLOP/s against fp32's ~80 on a 2-core AVX2 machine), so that an MFU
    against its bf16 "peak" would exceed 1."""
    dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    n = 1024 if quick or device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for i in range(4 if quick else 12):
        sync(device)
        t = time.perf_counter()
        for _ in range(1 if device.type == "cpu" else 10):
            a @ b
        sync(device)
        if i:  # the first is a warm-up
            best = min(best, (time.perf_counter() - t) / (1 if device.type == "cpu" else 10))
    return 2 * n**3 / best / 1e12, "bf16" if dtype == torch.bfloat16 else "fp32"


def train_flops_per_token(model, context: int) -> float:
    """6 x parameters (forward and backward of every weight) + attention's scores and values, per token: 779M
    for GPT-2 small at vocabulary 32,770 and context 1,024 (111.0M parameters, the position embeddings counted)."""
    cfg = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.n_layer * context * cfg.n_embd


def timed_window(step: Callable[[int], None], s: Shape, device: torch.device) -> dict:
    """`step(i)` for the shape's warm-up steps, then timed for at most `max_steps` steps or `seconds`."""
    for i in range(s.warmup_steps):
        step(i)
    sync(device)
    t = time.perf_counter()
    n = 0
    while n < s.max_steps and (n == 0 or time.perf_counter() - t < s.seconds):
        step(s.warmup_steps + n)
        n += 1
    sync(device)
    seconds = time.perf_counter() - t
    return {"steps_timed": n, "seconds_timed": round(seconds, 3),
            "tokens_per_s": round(n * s.tokens_per_step / seconds, 1)}


# -- contenders ----------------------------------------------------------------------------------------------------
def selected(names: list[str], skip: str) -> list[str]:
    """`names` without those `skip` names (comma-separated names or parts of names, e.g. `compiled`)."""
    parts = [p.strip() for p in skip.split(",") if p.strip()]
    return [n for n in names if not any(p in n for p in parts)]


def measure(name: str, run: Callable[[], dict], device: torch.device) -> dict:
    """One contender's figures, its peak memory added; an error is recorded, not raised, so that one failing
    contender (out of memory, a compiler error) leaves the others' figures."""
    start_memory(device)
    t = time.perf_counter()
    try:
        out = run()
    except Exception as exc:  # recorded in the figures: the run goes on with the next contender
        out = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
    out["wall_s"] = round(time.perf_counter() - t, 1)
    out["peak_memory_gb"] = peak_memory_gb(device)
    print(f"bench {name}: " + json.dumps(out), file=sys.stderr, flush=True)
    return out


def save_partial(out: Path | None, figures: dict) -> None:
    """The figures so far, so that a run stopped by a time limit keeps what it measured."""
    if out is not None:
        write_json(out, figures)


def ratios(section: dict, phf_keys: list[str], reference_keys: list[str]) -> dict:
    """phf's tokens/s over each reference's, for every pair that was measured."""
    rate = {k: v.get("tokens_per_s") for k, v in section.items() if isinstance(v, dict)}
    return {f"{p}/{r}": round(rate[p] / rate[r], 3) for p in phf_keys for r in reference_keys
            if rate.get(p) and rate.get(r)}


def format_ratios(figures: dict) -> str:
    """A table: each contender's tokens/s, MFU and peak memory, then phf's ratio to each reference."""
    m = figures["machine"]
    lines = [f"device: {m.get('gpu', m['device'])}, torch {m['torch']}, transformers {m.get('transformers')}"]
    for section in ("train", "sample"):
        if section not in figures:
            continue
        f = figures[section]
        lines.append(f"{section} ({f['shape']['summary']}; {f['note']}):")
        for name, c in f["contenders"].items():
            for key, v in ([(name, c)] if section == "train" else sorted(c.get("shapes", {}).items())):
                label = name if section == "train" else f"{name} {key}"
                if "tokens_per_s" not in v:
                    lines.append(f"  {label:<44} {v.get('error') or v.get('status', 'not measured')}")
                    continue
                mfu = f", MFU {100 * v['mfu']:.0f}%" if v.get("mfu") is not None else ""
                mem = f", peak {v['peak_memory_gb']} GiB" if v.get("peak_memory_gb") is not None else ""
                lines.append(f"  {label:<44} {v['tokens_per_s']:>12,.0f} tokens/s{mfu}{mem}")
        for pair, r in f.get("ratios", {}).items():
            lines.append(f"  {pair:<44} {r:.2f}x")
        for name, check in f.get("sync_check", {}).items():
            lines.append(f"  {name}: {check['syncs']} host-device synchronisations in {check['steps']} steps "
                         f"(torch.cuda.set_sync_debug_mode), at {json.dumps(check['where'])}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.paper_shape FILE.json ...: the table of saved figures
    for arg in sys.argv[1:]:
        print(format_ratios(json.loads(Path(arg).read_text())))
