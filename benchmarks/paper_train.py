"""`phf bench train --device cuda`: phf's training beside the code a user could write instead, on the paper's shape
(GPT-2 small, vocabulary 32,770, batch 16 x 1,024 x grad_accum 4, bf16), in one process, one contender at a time:

    phf_eager, phf_compiled   phf's own setup_model + train_step (train.compile false / true), its batches
                              prepared ahead as run_training prepares them, the shipped paper-124m config as it
                              is (train.fused_loss: auto, resolved for the device)
    plain_eager, plain_compiled  a plain PyTorch loop on transformers' GPT2LMHeadModel: bf16 autocast, fused
                              AdamW, gradient clipping, the model's own loss; the second under torch.compile
    hf_trainer                transformers' Trainer, bf16=True, fused AdamW

Data are uniformly random tokens (speed does not depend on which tokens are read): phf reads them from a token
stream on disk as it reads a real one; the references draw them in memory. Each contender: warm-up steps (torch.compile
compiles in them), then a window timed to at most max_steps steps or `seconds`. tokens/s, MFU against the bf16 matmul
peak measured in the same run, peak GPU memory. On a GPU, phf's steps also run under torch.cuda.set_sync_debug_mode
("warn"), which counts the host-device synchronisations a step makes.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.paper_shape import (
    Shape,
    measure,
    peak_matmul,
    ratios,
    save_partial,
    selected,
    shape,
    sync,
    synthetic_stream,
    synthetic_tokenizer,
    timed_window,
    train_flops_per_token,
)
from phf.tasks import task_for
from phf.training.distributed import Dist
from phf.training.objectives import get_objective
from phf.training.prefetch import Prefetcher
from phf.training.trainer import PreparedData, setup_model, step_batches, to_device, train_step

PHF = ["phf_eager", "phf_compiled"]
REFERENCES = ["plain_eager", "plain_compiled", "hf_trainer"]
ORDER = ["phf_eager", "plain_eager", "phf_compiled", "plain_compiled", "hf_trainer"]  # a time limit cuts the last
NOTE = "synthetic random tokens; tokens/s over a timed window after warm-up steps"


def run(device: str, quick: bool, skip: str = "", out: Path | None = None, figures: dict | None = None) -> dict:
    dev = torch.device(device)
    s = shape(quick)
    section = {"shape": describe(s), "note": NOTE, "contenders": {}}
    figures = figures if figures is not None else {}
    figures["train"] = section
    peak, section["peak_dtype"] = peak_matmul(dev, quick)
    section["peak_tflops"] = round(peak, 3)
    for name in selected(ORDER, skip):
        result = measure(name, lambda: CONTENDERS[name](s, dev), dev)
        if result.get("tokens_per_s") and result.get("flops_per_token"):
            achieved = result["tokens_per_s"] * result["flops_per_token"]
            result["mfu"] = round(achieved / (section["peak_tflops"] * 1e12), 4)
        section["contenders"][name] = result
        section["ratios"] = ratios(section["contenders"], PHF, REFERENCES)
        section["sync_check"] = {k: v["sync_check"] for k, v in section["contenders"].items() if "sync_check" in v}
        save_partial(out, figures)
    return section


def describe(s: Shape) -> dict:
    m, t = s.cfg.model, s.cfg.train
    return {"name": s.name, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "vocab": s.vocab,
            "context": m.block_size, "batch": t.batch_size, "grad_accum": t.grad_accum, "dtype": t.dtype,
            "dropout": m.dropout, "tokens_per_step": s.tokens_per_step, "warmup_steps": s.warmup_steps,
            "max_steps": s.max_steps, "max_seconds": s.seconds,
            "summary": f"{s.name}: {m.n_layer} layers x {m.n_embd}, vocabulary {s.vocab:,}, batch {t.batch_size} x "
                       f"{m.block_size:,} x grad_accum {t.grad_accum}, {t.dtype}"}


# -- phf ------------------------------------------------------------------------------------------------------------
def synthetic_data(cfg, s: Shape, folder: Path) -> PreparedData:
    """What prepare_data returns, for a stream of random tokens and a tokenizer of the shape's vocabulary."""
    windows = max(64, 4 * (s.warmup_steps + s.max_steps))  # distinct windows enough that no batch repeats often
    stream = synthetic_stream(folder / "train", windows * cfg.train.batch_size * (cfg.model.block_size + 1), s.vocab)
    return PreparedData(None, synthetic_tokenizer(folder / "tokenizer.json", s.vocab),
                        get_objective(cfg.objective, task_for(cfg)), {"train": stream})


def phf_training(s: Shape, device: torch.device, compile: bool) -> dict:
    cfg = dataclasses.replace(s.cfg, train=dataclasses.replace(s.cfg.train, compile=compile))
    tcfg, block, d = cfg.train, cfg.model.block_size, Dist()
    with tempfile.TemporaryDirectory(prefix="phf-bench-") as tmp:
        data = synthetic_data(cfg, s, Path(tmp))
        torch.manual_seed(tcfg.seed)
        t = setup_model(cfg, data, Path(tmp) / "run", None, False, device, d)
        stream = data.streams["train"]

        pinned = device.type == "cuda"
        make = step_batches(stream, block, tcfg, d, pin=pinned)  # as run_training: built ahead, copied async
        with Prefetcher(make, range(s.warmup_steps + s.max_steps)) as source:
            def step(i: int) -> None:
                batches = [to_device(b, device, non_blocking=pinned) for b in source.get(i)]
                train_step(t, data.objective, batches, tcfg, d, device)

            out = timed_window(step, s, device)
        out.update(parameters=sum(p.numel() for p in t.model.parameters()),
                   flops_per_token=train_flops_per_token(t.model, block), fused_loss=t.fused)
        if device.type == "cuda":
            ready = [[to_device(b, device) for b in make(10_000 + i)] for i in range(s.sync_check_steps)]
            out["sync_check"] = sync_check(lambda i: train_step(t, data.objective, ready[i], tcfg, d, device),
                                           s.sync_check_steps, device)
    return out


def sync_check(step, n: int, device: torch.device) -> dict:
    """Host-device synchronisations in `n` steps (batches already on the device), counted by
    torch.cuda.set_sync_debug_mode("warn"), with the lines that made the most."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(n):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"steps": n, "syncs": len(syncs), "syncs_per_step": round(len(syncs) / n, 2),
            "where": dict(where.most_common(8))}


# -- the references -------------------------------------------------------------------------------------------------
def gpt2(s: Shape, device: torch.device):
    """GPT-2 of the shape, as a user builds it with transformers (sdpa attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = s.cfg.model
    config = GPT2Config(vocab_size=s.vocab, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                        n_head=m.n_head, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                        bos_token_id=0, eos_token_id=0)  # <|endoftext|> of paper_shape.synthetic_tokenizer
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device).train()


def adamw(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device without the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def plain_loop(s: Shape, device: torch.device, compile: bool) -> dict:
    """nanoGPT's loop on transformers' GPT2LMHeadModel: bf16 autocast, the model's loss, accumulation, clipping."""
    t, block = s.cfg.train, s.cfg.model.block_size
    model = gpt2(s, device)
    opt = adamw(model, t.lr, t.weight_decay)
    forward = torch.compile(model) if compile else model
    g = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> None:
        for _ in range(t.grad_accum):
            x = torch.randint(0, s.vocab, (t.batch_size, block), device=device, generator=g)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(input_ids=x, labels=x).loss
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = timed_window(step, s, device)
    out.update(parameters=sum(p.numel() for p in model.parameters()),
               flops_per_token=train_flops_per_token(model, block))
    return out


def hf_trainer(s: Shape, device: torch.device) -> dict:
    """transformers' Trainer over the same model and batch: bf16=True, fused AdamW; timed by a callback that stops
    training when the window is over."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t, block = s.cfg.train, s.cfg.model.block_size
    steps = s.warmup_steps + s.max_steps
    model = gpt2(s, device)

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return steps * t.batch_size * t.grad_accum

        def __getitem__(self, i):
            ids = torch.randint(0, s.vocab, (block,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == s.warmup_steps:
                sync(device)
                marks["start"], marks["step"] = time.perf_counter(), state.global_step
            elif "start" in marks and time.perf_counter() - marks["start"] >= s.seconds:
                control.should_training_stop = True
            marks["last_step"] = state.global_step

        def on_train_end(self, args, state, control, **kw):
            sync(device)
            marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="phf-bench-") as out_dir:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=t.batch_size,
                                 gradient_accumulation_steps=t.grad_accum, max_steps=steps, learning_rate=t.lr,
                                 weight_decay=t.weight_decay, adam_beta2=0.95, max_grad_norm=1.0, bf16=True,
                                 optim="adamw_torch_fused", use_cpu=device.type == "cpu", report_to=[],
                                 save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                 disable_tqdm=True)
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics; stdout is for the figures
            Trainer(model=model, args=args, train_dataset=Random(), callbacks=[Clock()]).train()
    n = marks["last_step"] - marks["step"]
    seconds = marks["end"] - marks["start"]
    return {"steps_timed": n, "seconds_timed": round(seconds, 3),
            "tokens_per_s": round(n * s.tokens_per_step / seconds, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": train_flops_per_token(model, block)}


CONTENDERS = {
    "phf_eager": lambda s, d: phf_training(s, d, compile=False),
    "phf_compiled": lambda s, d: phf_training(s, d, compile=True),
    "plain_eager": lambda s, d: plain_loop(s, d, compile=False),
    "plain_compiled": lambda s, d: plain_loop(s, d, compile=True),
    "hf_trainer": hf_trainer,
}
