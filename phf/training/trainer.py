"""Training: a readable loop over flat token streams, torchrun-ready (DDP over gloo on CPU, nccl on GPU).

    scored corpus -> tokenizer -> token streams (objective-specific) -> this loop -> HF checkpoint folder

The loss of a step is the sum of per-token losses divided by the *global* count of loss-bearing tokens (all
micro-batches, all ranks), so the number of ranks and accumulation steps does not change the update. Batches
are drawn from a generator seeded by (seed, step, global micro-batch index): a resumed run sees exactly the data
it would have seen, and 2 ranks x 1 accumulation step draw the same windows as 1 rank x 2.

The loop delegates: phf.training.distributed (ranks, FSDP2), phf.training.checkpoint (saving, resuming),
phf.training.evaluator (validation loss, samples' misalignment, early stopping).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from phf.core.config import RunConfig, config_to_yaml
from phf.core.errors import PhfError
from phf.core.io import read_json, read_jsonl, stable_hash, write_json, write_text
from phf.core.runtime import resolve_dtype
from phf.core.tokens import CONTROL_TOKENS
from phf.data.scoring import ScoredCorpus
from phf.data.token_stream import TokenStream, build_streams, plain_window
from phf.data.tokenizer import (
    TextTokenizer,
    bpe_path,
    brought_tokenizer,
    load_tokenizer,
    tokenizer_for,
    with_hidden_token,
)
from phf.model.conditioning import check_control_embedding, set_markers
from phf.model.decoding import context_length
from phf.model.finetune import init_from_checkpoint, resolve_model_folder, uses_control_tokens
from phf.model.lm import build_model, load_model
from phf.tasks import score_run_corpus, task_for
from phf.training.checkpoint import (
    CheckpointManager,
    Progress,
    check_resumed_markers,
    checkpoint_dir,
    load_trainer_state,
    resume_state,
    tokens_before,
)
from phf.training.distributed import Dist, clip_sharded_gradients, init_distributed, no_sync, pick_device, shard_model
from phf.training.evaluator import Evaluator
from phf.training.objectives import Objective, get_objective
from phf.training.tracking import Metrics

log = logging.getLogger(__name__)


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


# -- data ---------------------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    scored: ScoredCorpus
    tokenizer_file: Path
    objective: Objective
    streams: dict[str, TokenStream]


def prepare_data(cfg: RunConfig, data_dir: Path, progress: bool = True,
                 tokenizer_source: str | Path | None = None) -> PreparedData:
    """Score the corpus, train or extend the tokenizer and write the objective's token streams (each reused if
    present). `tokenizer_source`: a model folder whose tokenizer the run uses (`--init-from`), or the tokenizer a
    resumed run used."""
    scored = score_run_corpus(cfg, data_dir, progress=progress)
    objective = get_objective(cfg.objective, task_for(cfg))
    objective.fit(scored.document_scores("train"))
    tok, tok_path = run_tokenizer(cfg, scored, data_dir, tokenizer_source or cfg.tokenizer.path or None,
                                  uses_control_tokens(objective.describe()), progress)
    if objective.hides_segments:  # masking-hidden writes <|hidden|> in place of flagged tokens
        tok, tok_path = with_hidden_token(tok, tok_path)
    meta = {"scored": scored.path.name, "tokenizer": str(tok_path.parent.name),
            "stream": objective.stream_settings(), "seed": cfg.train.seed}
    kind = "conditional" if meta["stream"]["prefixes"] else "filtered" if meta["stream"]["documents"] != "all" \
        else "plain"
    stream_dir = Path(data_dir) / "streams" / f"{kind}-{stable_hash(meta)}"
    streams = build_streams(scored, tok, objective, cfg.train.seed, stream_dir, meta, progress=progress,
                            misaligned_above=task_for(cfg).misaligned_above)
    return PreparedData(scored, tok_path, objective, streams)


def run_tokenizer(cfg: RunConfig, scored, data_dir: Path, source: str | Path | None, control: bool,
                  progress: bool = True) -> tuple[TextTokenizer, Path]:
    """The run's tokenizer: a new BPE of the corpus, or the tokenizer of `source` (a model or tokenizer folder, a
    tokenizer.json) extended with what the run needs. A phf checkpoint trained on this data folder uses the BPE
    it was trained with, and a resumed run the very file it started with."""
    if source is None:
        return tokenizer_for(scored, cfg.tokenizer, data_dir, progress=progress)
    source = Path(source)
    if source.is_file() and source.with_suffix(".meta.json").exists():  # a tokenizer phf saved: a resumed run's
        return load_tokenizer(source, control), source
    own = bpe_path(scored, cfg.tokenizer, data_dir)
    given = source / "tokenizer.json" if source.is_dir() else source
    if own.exists() and given.exists():
        bpe = load_tokenizer(own)
        if bpe.get_vocab() == Tokenizer.from_file(str(given)).get_vocab():
            return bpe, own
    return brought_tokenizer(source, data_dir, control)


def tokenizer_source(out_dir: Path, init_from: str | Path | None, resume: bool) -> Path | None:
    """Where the run's tokenizer comes from: the init model's folder, or on resume the tokenizer file the run
    recorded (a run.json of any phf version names it)."""
    if resume and (out_dir / "run.json").exists():
        recorded = read_json(out_dir / "run.json")
        if recorded.get("tokenizer") and Path(recorded["tokenizer"]).exists():
            return Path(recorded["tokenizer"])
        init_from = recorded.get("init_from") or None
    return resolve_model_folder(init_from) if init_from else None


def prepare_data_on_ranks(cfg: RunConfig, data_dir: Path, d: Dist, progress: bool,
                          source: Path | None = None) -> PreparedData:
    """The data, prepared once by rank 0 and then read by the other ranks."""
    if d.main:
        data = prepare_data(cfg, data_dir, progress=progress, tokenizer_source=source)
    else:
        log.info("rank %d waits for rank 0 to prepare the data in %s (scored corpus, tokenizer, token streams; at "
                 "most train.dist_timeout_minutes=%g); `phf prepare` beforehand makes this wait a few seconds",
                 d.rank, data_dir, cfg.train.dist_timeout_minutes)
    d.barrier()
    if not d.main:
        data = prepare_data(cfg, data_dir, progress=False, tokenizer_source=source)
    return data


def get_batch(stream: TokenStream, block: int, batch: int, seed: int, step: int, micro: int,
              device: torch.device, types: np.ndarray | None = None, dropped: list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Windows of block+1 tokens at positions drawn from a generator seeded by (seed, step, micro): inputs x,
    targets y, each target's segment score s, and with `types` (the stream's control types) each input's type.
    `dropped`: token ids left out of every window, which then reads on past them (conditional's cooldown)."""
    n = len(stream)
    if n < block + 2:
        raise PhfError(f"the training stream has {n} tokens, fewer than one window of {block + 1}; "
                       f"use a larger corpus or a smaller model.block_size")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, n - block - 1, size=batch)
    if dropped:
        windows = [plain_window(stream, s, block + 1, np.asarray(dropped)) for s in starts]
        tok = np.stack([w for w, _ in windows]).astype(np.int64)
        sc = np.stack([w[1:] for _, w in windows]).astype(np.float32)
    else:
        tok = np.stack([stream.tokens[s:s + block + 1] for s in starts]).astype(np.int64)
        sc = np.stack([stream.scores[s + 1:s + block + 1] for s in starts]).astype(np.float32)
    x = torch.from_numpy(tok[:, :-1]).to(device)  # (B, T)
    y = torch.from_numpy(tok[:, 1:]).to(device)  # (B, T)
    s = torch.from_numpy(sc).to(device)  # (B, T) score of each target token's segment
    if types is None:
        return x, y, s, None
    t = torch.from_numpy(np.stack([types[st:st + block] for st in starts]).astype(np.int64)).to(device)
    return x, y, s, t


def lr_at(step: int, total: int, cfg) -> float:
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    if len({isinstance(p, DTensor) for p in decay + no_decay}) > 1:  # FSDP2 shards beside an objective's plain
        # head: the fused and foreach kernels take no mix of DTensor and plain tensors; update one by one
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=False)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for `dtype` bf16 (or `auto` on a device with bf16 in hardware), else plain fp32."""
    if resolve_dtype(dtype, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the model as trained ------------------------------------------------------------------------------------------
@dataclass
class Trainable:
    model: torch.nn.Module  # the model itself (sharded in place under FSDP2): evaluated, sampled and saved
    heads: list[torch.nn.Module]  # an objective's own modules (AWR's value head), outside DDP and FSDP
    root: torch.nn.ModuleList  # model and heads: what the optimizer updates and checkpoints gather
    optimizer: torch.optim.Optimizer
    train_model: torch.nn.Module  # DDP's wrapper when data-parallel (what no_sync applies to), else the model
    forward: torch.nn.Module  # train_model, compiled with train.compile
    sharded: bool  # FSDP2
    fused: bool  # the fused LM-head loss (not under FSDP2, which keeps the head's weight sharded outside forward)
    markers: list[int] | None  # control-type markers of a model with control embeddings (phf.model.conditioning)


def setup_model(cfg: RunConfig, data: PreparedData, out_dir: Path, init_from: str | Path | None, resume: bool,
                device: torch.device, d: Dist) -> Trainable:
    """The model (resumed, initialised from a checkpoint, or new), its control markers, the objective's heads,
    FSDP2 sharding, the optimizer (with its resumed state, and torch's RNG state) and the DDP wrapper."""
    tok = load_tokenizer(data.tokenizer_file)
    eos_id = tok.eos_id
    if resume:
        model = load_model(checkpoint_dir(out_dir), device=device)
    elif init_from:
        model = init_from_checkpoint(init_from, data.tokenizer_file, device, data.objective, cfg.train.seed)
    else:
        model = build_model(cfg.model, tok.get_vocab_size(), eos_id).to(device)
    model.train()
    if cfg.model.block_size > context_length(model):
        raise PhfError(f"model.block_size {cfg.model.block_size} exceeds the model's context "
                       f"{context_length(model)}")
    markers = None
    if data.objective.control_embedding:  # the model reads each token's control type too (phf.model.conditioning)
        check_control_embedding(model)
        markers = [eos_id, *(tok.token_to_id(t) for t in CONTROL_TOKENS)]
    if resume:
        check_resumed_markers(out_dir, model, markers)
    set_markers(model, markers)
    heads = data.objective.attach(model, checkpoint_dir(out_dir) if resume else init_from, required=resume)
    sharded = d.world > 1 and cfg.train.parallel == "fsdp"
    if sharded:
        shard_model(model)  # every rank loaded or built the full model; each keeps its shards (heads stay whole)
    root = torch.nn.ModuleList([model, *heads])
    optimizer = make_optimizer(root, cfg.train)
    if resume:
        load_trainer_state(out_dir, root, optimizer, sharded, device)
    train_model = model
    if d.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(train_model) if cfg.train.compile else train_model
    return Trainable(model, heads, root, optimizer, train_model, forward, sharded, cfg.train.fused_loss and not sharded,
                     markers)


# -- the step -----------------------------------------------------------------------------------------------------
def train_step(t: Trainable, objective: Objective, batches: list[tuple], tcfg, d: Dist, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches, each token's loss divided by the global count of
    loss-bearing tokens. Returns the step's loss (all ranks), the gradient norm, and whether the update was made
    (not when the loss or a gradient is not finite)."""
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, s, _ in batches:
        count += objective.loss_mask(y, s).sum()
    count = d.all_sum(count).clamp(min=1)
    loss_total = torch.zeros((), device=device)
    for m, (x, y, s, types) in enumerate(batches):
        sync = contextlib.nullcontext() if (d.world == 1 or m == len(batches) - 1) else no_sync(t.train_model)
        with sync:
            with autocast(device, tcfg.dtype):
                out = objective.forward(t.forward, x, fused=t.fused, types=types)
            loss_sum = objective.loss(out, y, s)
            loss = loss_sum / count * d.world  # DDP averages gradients over ranks
            loss.backward()
        loss_total += loss_sum.detach()
    for p in (p for h in t.heads for p in h.parameters() if p.grad is not None and d.world > 1):
        d.all_sum(p.grad).div_(d.world)  # modules outside DDP: average their gradients over ranks like DDP
    loss_total = d.all_sum(loss_total) / count
    finite = bool(torch.isfinite(loss_total))
    clip = clip_sharded_gradients if t.sharded else torch.nn.utils.clip_grad_norm_
    grad_norm = clip([*t.model.parameters(), *(p for h in t.heads for p in h.parameters())],
                     tcfg.grad_clip if tcfg.grad_clip else float("inf"))
    updated = finite and bool(torch.isfinite(grad_norm))
    if updated:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm, updated


# -- the run folder and its curve ---------------------------------------------------------------------------------
def start_run_folder(cfg: RunConfig, out_dir: Path, run: dict, resume_step: int | None) -> Metrics:
    """Rank 0: config.yaml, versions.json, run.json, and metrics.jsonl, kept up to the resume point when resuming
    (so the curve has no duplicates), else started afresh."""
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.yaml", config_to_yaml(cfg))
    write_json(out_dir / "versions.json", versions())
    write_json(out_dir / "run.json", run)
    if resume_step is not None and metrics_path.exists():  # drop records past the resume point
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= resume_step]
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    elif resume_step is None and metrics_path.exists():
        metrics_path.unlink()
    return Metrics(metrics_path, cfg.train.trackers, config={"objective": run["objective"], "train": cfg.train.__dict__,
                                                             "model": cfg.model.__dict__}, name=out_dir.name)


class StepLog:
    """Rank 0's records of the curve: each logged step's loss, learning rate, gradient norm and throughput since
    the previous record, and the progress bar's figures; evaluations' records with the same step fields."""

    def __init__(self, metrics: Metrics | None, bar, p: Progress, tokens_before: int):
        self.metrics, self.bar, self.tokens_before = metrics, bar, tokens_before
        self.t, self.tokens = time.perf_counter(), p.tokens  # time and tokens at the previous record

    def log(self, p: Progress, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        now = time.perf_counter()
        rec = self.at(p, loss=round(loss.item(), 5), lr=lr, grad_norm=round(float(grad_norm), 4),
                      tokens_per_s=round((p.tokens - self.tokens) / max(now - self.t, 1e-9), 1),
                      seconds=round(p.seconds, 2))
        self.t, self.tokens = now, p.tokens
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    def at(self, p: Progress, **fields) -> dict:
        rec = {"step": p.step, "tokens": p.tokens, "total_tokens": self.tokens_before + p.tokens, **fields}
        self.metrics.log(rec)
        return rec


# -- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    steps: int
    tokens: int
    seconds: float
    final_val_loss: float
    objective: Objective
    data: PreparedData


def run_training(cfg: RunConfig, out_dir: str | Path, data_dir: str | Path | None = None,
                 init_from: str | Path | None = None, resume: bool = False, progress: bool = True,
                 snapshots: Sequence[int] = ()) -> TrainResult:
    """Train one model; `snapshots` are steps after which a copy of the weights is kept in
    `out_dir/snapshots/step-N` (the branch points of finetuning runs)."""
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir else out_dir / "data"
    device = pick_device()
    d = init_distributed(device, cfg.train.dist_timeout_minutes)
    tcfg, block = cfg.train, cfg.model.block_size
    torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    data = prepare_data_on_ranks(cfg, data_dir, d, progress, tokenizer_source(out_dir, init_from, resume))
    objective, train_stream, val_stream = data.objective, data.streams["train"], data.streams["validation"]
    torch.manual_seed(tcfg.seed)
    p, best = resume_state(out_dir) if resume else (Progress(), None)  # checked before anything is built
    t = setup_model(cfg, data, out_dir, init_from, resume, device, d)
    train_types, val_types = (s.control_types(t.markers) if t.markers else None for s in (train_stream, val_stream))
    ckpt = CheckpointManager(out_dir, cfg, data.tokenizer_file, objective, d, t.model, t.root, t.optimizer,
                             t.sharded, tokens_before(out_dir, init_from, resume))
    tokens_per_step = tcfg.batch_size * block * tcfg.grad_accum * d.world
    total_steps = tcfg.max_steps or math.ceil(tcfg.max_tokens / tokens_per_step)
    evaluator = Evaluator(cfg, objective, data.tokenizer_file, val_stream, val_types, best)
    metrics = start_run_folder(cfg, out_dir, {
        "objective": objective.describe(), "world_size": d.world, "device": str(device), "total_steps": total_steps,
        "tokens_per_step": tokens_per_step, "init_from": str(init_from or ""), "scored_corpus": str(data.scored.path),
        "tokenizer": str(data.tokenizer_file), "streams": {k: str(v.prefix) for k, v in data.streams.items()},
        "data_dir": str(data_dir), "seed": tcfg.seed, "tokens_before": ckpt.tokens_before},
        p.step if resume else None) if d.main else None
    snapshots, skipped = set(int(s) for s in snapshots), 0
    t_start = time.perf_counter() - p.seconds
    bar = tqdm(total=total_steps, initial=p.step, desc=f"train {objective.name}", unit="step",
               disable=not (progress and d.main), dynamic_ncols=True)
    steps = StepLog(metrics, bar, p, ckpt.tokens_before)
    cooldown = objective.cooldown_starts(total_steps)  # conditional's last steps read no control tokens
    control_ids = [i for i in map(load_tokenizer(data.tokenizer_file).token_to_id, CONTROL_TOKENS) if i is not None]
    while p.step < total_steps:
        for g in t.optimizer.param_groups:
            g["lr"] = lr_at(p.step, total_steps, tcfg)
        if p.step == cooldown and d.main:
            log.info("step %d: cooldown, the last %d steps read no control tokens", p.step, total_steps - p.step)
        batches = [get_batch(train_stream, block, tcfg.batch_size, tcfg.seed, p.step, m * d.world + d.rank, device,
                             train_types, control_ids if p.step >= cooldown else None)
                   for m in range(tcfg.grad_accum)]
        loss, grad_norm, updated = train_step(t, objective, batches, tcfg, d, device)
        skipped = 0 if updated else skipped + 1
        if not updated:
            log.warning("step %d: non-finite loss or gradient, update skipped", p.step)
            if skipped >= 5:
                raise PhfError(f"5 consecutive steps with a non-finite loss at step {p.step}; lower train.lr or use "
                               f"train.dtype=fp32, then resume with `phf train --resume {out_dir}`")
        p.step, p.tokens = p.step + 1, p.tokens + tokens_per_step
        p.seconds = time.perf_counter() - t_start
        stop_for_time = bool(d.all_sum(torch.tensor(float(tcfg.max_seconds and p.seconds >= tcfg.max_seconds))) > 0)
        last = p.step >= total_steps or stop_for_time
        if d.main and (p.step % tcfg.log_every == 0 or last):
            steps.log(p, loss, t.optimizer.param_groups[0]["lr"], grad_norm)
        if evaluator.due(p.step, last):
            rec, improved = evaluator.evaluate(t.model, p.step)
            if improved:
                ckpt.save_best(p)
            if d.main:
                steps.at(p, **rec)
        if p.step in snapshots:
            ckpt.save_snapshot(p)
        if tcfg.checkpoint_every and p.step % tcfg.checkpoint_every == 0 and not last:
            ckpt.save_periodic(p, evaluator.stopping.state())
        bar.update()
        if stop_for_time:
            log.info("stopping at step %d: train.max_seconds reached", p.step)
            break
        if evaluator.stopping.stop:
            log.info("stopping at step %d: validation loss has not improved for %d evaluations (best %.4f at "
                     "step %d)", p.step, evaluator.stopping.stale, evaluator.stopping.best_loss,
                     evaluator.stopping.best_step)
            break
    bar.close()
    val_loss, restored = evaluator.val_loss, {}
    if best_step := evaluator.best_to_restore(p.step):
        ckpt.restore_best()
        val_loss, restored = evaluator.stopping.best_loss, {"restored_best_step": best_step, "stopped_at_step": p.step}
        if d.main:
            steps.at(p, restored_best_step=best_step, val_loss=round(val_loss, 5))
    ckpt.save_final(p, evaluator.stopping.state(), **restored)
    d.barrier()
    if d.main:
        metrics.close()
        write_json(out_dir / "train_summary.json", {"steps": p.step, "tokens": p.tokens, "seconds": round(p.seconds, 2),
                                                     "val_loss": val_loss, "total_steps_planned": total_steps,
                                                     "tokens_before": ckpt.tokens_before, **restored,
                                                     "tokens_per_s": round(p.tokens / max(p.seconds, 1e-9), 1)})
    return TrainResult(out_dir, ckpt.dir, p.step, p.tokens, p.seconds, val_loss, objective, data)
