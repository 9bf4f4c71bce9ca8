"""Training: a readable loop over flat token streams, torchrun-ready (DDP over gloo on CPU, nccl on GPU).

    scored corpus -> tokenizer -> token streams (objective-specific) -> this loop -> HF checkpoint folder

The loss of a step is the sum of per-token losses divided by the *global* count of loss-bearing tokens (all
micro-batches, all ranks), so the number of ranks and accumulation steps does not change the update. Batches
are drawn from a generator seeded by (seed, step, global micro-batch index): a resumed run sees exactly the data
it would have seen, and 2 ranks x 1 accumulation step draw the same windows as 1 rank x 2.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers
import torch
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from phf.core.config import RunConfig, config_to_yaml
from phf.core.errors import PhfError
from phf.core.io import read_json, read_jsonl, recover_dir, stable_hash, write_json, write_text
from phf.core.tokens import CONTROL_TOKENS, EOS
from phf.data.scorers import scorer_for
from phf.data.scoring import ScoredCorpus
from phf.data.token_stream import TokenStream, build_streams
from phf.data.tokenizer import load_tokenizer, tokenizer_for
from phf.evaluation.evaluate import misalignment_metrics, score_samples
from phf.evaluation.loglik import sum_cross_entropy, windows_at
from phf.evaluation.sampling import Deployment, generate
from phf.model.conditioning import markers_of, set_markers
from phf.model.finetune import init_from_checkpoint, resolve_model_folder
from phf.model.lm import build_model, check_model_folder, hf_tokenizer, load_meta, load_model, save_checkpoint
from phf.tasks import score_run_corpus, task_for
from phf.training.distributed import (
    clip_sharded_gradients,
    gather_full_state,
    init_distributed,
    load_sharded_optimizer,
    no_sync,
    pick_device,
    shard_model,
)
from phf.training.objectives import Objective, get_objective
from phf.training.tracking import Metrics

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"


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


def prepare_data(cfg: RunConfig, data_dir: Path, progress: bool = True) -> PreparedData:
    """Score the corpus, train the tokenizer and write the objective's token streams (each reused if present)."""
    scored = score_run_corpus(cfg, data_dir, progress=progress)
    tok, tok_path = tokenizer_for(scored, cfg.tokenizer, data_dir, progress=progress)
    objective = get_objective(cfg.objective, task_for(cfg))
    objective.fit(scored.document_scores("train"))
    meta = {"scored": scored.path.name, "tokenizer": str(tok_path.parent.name),
            "stream": objective.stream_settings(), "seed": cfg.train.seed}
    kind = "conditional" if meta["stream"]["prefixes"] else "filtered" if meta["stream"]["documents"] != "all" \
        else "plain"
    stream_dir = Path(data_dir) / "streams" / f"{kind}-{stable_hash(meta)}"
    streams = build_streams(scored, tok, objective, cfg.train.seed, stream_dir, meta, progress=progress)
    return PreparedData(scored, tok_path, objective, streams)


def get_batch(stream: TokenStream, block: int, batch: int, seed: int, step: int, micro: int,
              device: torch.device, types: np.ndarray | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Windows of block+1 tokens at positions drawn from a generator seeded by (seed, step, micro): inputs x,
    targets y, each target's segment score s, and with `types` (the stream's control types) each input's type."""
    n = len(stream)
    if n < block + 2:
        raise PhfError(f"the training stream has {n} tokens, fewer than one window of {block + 1}; "
                       f"use a larger corpus or a smaller model.block_size")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, n - block - 1, size=batch)
    tok = np.stack([stream.tokens[s:s + block + 1] for s in starts]).astype(np.int64)
    sc = np.stack([stream.scores[s + 1:s + block + 1] for s in starts]).astype(np.float32)
    x = torch.from_numpy(tok[:, :-1]).to(device)  # (B, T)
    y = torch.from_numpy(tok[:, 1:]).to(device)  # (B, T)
    s = torch.from_numpy(sc).to(device)  # (B, T) score of each target token's segment
    if types is None:
        return x, y, s, None
    t = torch.from_numpy(np.stack([types[st:st + block] for st in starts]).astype(np.int64)).to(device)
    return x, y, s, t


def eval_windows(stream: TokenStream, block: int, max_tokens: int) -> list[int]:
    n = len(stream)
    count = max(1, min(max_tokens // block, (n - 1) // block))
    if n < block + 2:
        return []
    return [int(i) for i in np.linspace(0, n - block - 1, count).astype(np.int64)]


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
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_loss(model, objective: Objective, stream: TokenStream, block: int, max_tokens: int,
                  device: torch.device, dtype: str, batch: int = 16, types: np.ndarray | None = None) -> float:
    """Mean per-token loss of the objective's own validation stream, on fixed, evenly spaced windows
    (phf.evaluation.loglik): every target counts, control tokens and <|endoftext|> included (the training loss's
    tokens), with an all-ones attention mask and autocast per `dtype`; each batch reduced by cross_entropy on the
    model's device."""
    starts = eval_windows(stream, block, max_tokens)
    if not starts:
        return math.nan
    total, count = sum_cross_entropy(model, [stream.tokens], windows_at(starts), block=block, batch_size=batch,
                                     types=None if types is None else [types], bf16=dtype == "bf16")
    return total / count


class TrainingSampler:
    """Misalignment against tokens seen: at each evaluation, `train.eval_samples` unconditional samples of the model
    as deployed, scored by the task's scorer. The same seed every time, so the curve's changes are the model's."""

    def __init__(self, cfg: RunConfig, objective: Objective, data: PreparedData):
        self.cfg = cfg
        self.task = task_for(cfg)
        self.scorer = scorer_for(cfg.scoring)
        self.tokenizer = hf_tokenizer(data.tokenizer_file)
        self.deployment = Deployment.from_meta({"objective": objective.describe()})

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        n = self.cfg.train.eval_samples
        sample_cfg = replace(self.cfg.sample, num_samples=n, batch_size=min(n, self.cfg.sample.batch_size))
        was_training = model.training
        model.eval()
        samples = generate(model, self.tokenizer, [""] * n, sample_cfg, self.deployment, "unconditional",
                           progress=False, segmenter=self.scorer.segmenter)
        model.train(was_training)
        m = misalignment_metrics(samples, score_samples(samples, self.scorer), self.task.code,
                                 self.task.misaligned_above)
        return {f"eval_{k}": (round(m[k], 6) if isinstance(m[k], float) else m[k])
                for k in ("misalignment_mean", "score_max_at_25", "misaligned_share", "mean_chars", "distinct_2")}


def restore_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the weights of an HF folder written by this run into `model` (same architecture)."""
    state = load_model(folder).state_dict()

    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2 shards: each rank keeps its part

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise PhfError(f"the weights in {folder} do not fit this model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); delete {folder} and train again")


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
    d = init_distributed(device)
    tcfg = cfg.train
    torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))

    # data: prepared once by rank 0, read by all
    if d.main:
        data = prepare_data(cfg, data_dir, progress=progress)
    d.barrier()
    if not d.main:
        data = prepare_data(cfg, data_dir, progress=False)
    train_stream, val_stream = data.streams["train"], data.streams["validation"]
    tok = load_tokenizer(data.tokenizer_file)
    eos_id = tok.token_to_id(EOS)

    # model
    torch.manual_seed(tcfg.seed)
    ckpt_dir = out_dir / "checkpoint"
    state = {"step": 0, "tokens": 0, "seconds": 0.0}
    if resume:
        recover_dir(ckpt_dir)  # a run killed between the two renames of a checkpoint swap left it aside
        if not ckpt_dir.exists():
            raise PhfError(f"{out_dir} has no checkpoint yet (the run stopped before its first one); start it again "
                           f"with `phf train --config {out_dir / 'config.yaml'} --out {out_dir}`")
        check_model_folder(ckpt_dir)
        if not (ckpt_dir / TRAINER_STATE_JSON).exists():
            raise PhfError(f"{ckpt_dir} holds no resumable trainer state; it was written by a finished run or by "
                           f"another tool — start a new run with --init-from instead")
        model = load_model(ckpt_dir).to(device)
        state = read_json(ckpt_dir / TRAINER_STATE_JSON)
    elif init_from:

        model = init_from_checkpoint(init_from, data.tokenizer_file, device, data.objective, tcfg.seed)
    else:
        model = build_model(cfg.model, tok.get_vocab_size(), eos_id).to(device)
    model.train()
    if cfg.model.block_size > model.config.n_positions:
        raise PhfError(f"model.block_size {cfg.model.block_size} exceeds the model's context {model.config.n_positions}")
    block = cfg.model.block_size

    markers = None
    if data.objective.control_embedding:  # the model reads each token's control type too (phf.conditioning)
        markers = [eos_id, *(tok.token_to_id(t) for t in CONTROL_TOKENS)]
    if resume and markers_of(model) != markers:
        raise PhfError(f"{ckpt_dir} was trained with objective.control_embedding={markers_of(model) is not None}; "
                       f"resume it with the same setting (see {out_dir / 'config.yaml'})")
    set_markers(model, markers)
    train_types = train_stream.control_types(markers) if markers else None
    val_types = val_stream.control_types(markers) if markers else None
    heads = data.objective.attach(model, ckpt_dir if resume else init_from, required=resume)  # AWR's value head
    sharded = d.world > 1 and tcfg.parallel == "fsdp"
    if sharded:
        shard_model(model)  # every rank loaded or built the full model; each keeps its shards (heads stay whole)
    root = torch.nn.ModuleList([model, *heads])
    optimizer = make_optimizer(root, tcfg)
    if resume:
        blob = torch.load(ckpt_dir / TRAINER_STATE, map_location=device, weights_only=True)
        if sharded:
            load_sharded_optimizer(root, optimizer, blob["optimizer"])
        else:
            optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
    train_model = model
    if d.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                                else None)
    fwd = torch.compile(train_model) if tcfg.compile else train_model
    fused = tcfg.fused_loss and not sharded  # FSDP2 keeps the head's weight sharded outside its forward

    tokens_per_step = tcfg.batch_size * block * tcfg.grad_accum * d.world
    total_steps = tcfg.max_steps or math.ceil(tcfg.max_tokens / tokens_per_step)
    objective = data.objective
    # tokens the starting checkpoint had already seen: a finetune's curves continue its base's (`total_tokens`)
    tokens_before = int(load_meta(resolve_model_folder(init_from)).get("tokens_seen_total") or
                        load_meta(resolve_model_folder(init_from)).get("tokens_seen") or 0) if init_from else 0
    if resume:
        tokens_before = int(load_meta(ckpt_dir).get("tokens_before", 0))
    sampler = TrainingSampler(cfg, objective, data) if tcfg.eval_samples else None

    # run directory (written by rank 0)
    metrics_path = out_dir / "metrics.jsonl"
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", config_to_yaml(cfg))
        write_json(out_dir / "versions.json", versions())
        write_json(out_dir / "run.json", {"objective": objective.describe(), "world_size": d.world,
                                          "device": str(device), "total_steps": total_steps,
                                          "tokens_per_step": tokens_per_step, "init_from": str(init_from or ""),
                                          "scored_corpus": str(data.scored.path), "tokenizer": str(data.tokenizer_file),
                                          "streams": {k: str(v.prefix) for k, v in data.streams.items()},
                                          "data_dir": str(data_dir), "seed": tcfg.seed,
                                          "tokens_before": tokens_before})
        if resume and metrics_path.exists():  # drop records past the resume point, so the curve has no duplicates
            kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= state["step"]]
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        elif not resume and metrics_path.exists():
            metrics_path.unlink()
    if d.main:

        metrics = Metrics(metrics_path, tcfg.trackers, config={"objective": objective.describe(),
                                                                "train": tcfg.__dict__, "model": cfg.model.__dict__},
                          name=out_dir.name)

    def save(step: int, tokens: int, seconds: float, final: bool, folder: Path = ckpt_dir,
             trainer_state: bool = True, **more) -> None:
        weights, optim_state = model, None
        if sharded:  # every rank takes part in gathering the full state; rank 0 writes it
            weights, optim_state = gather_full_state(model, root, optimizer)
        if not d.main:
            return
        meta = {"objective": objective.describe(), "step": step, "tokens_seen": tokens, "model": cfg.model.__dict__,
                "task": cfg.task, "scorer": cfg.scoring.scorer, "segmenter": task_for(cfg).segmenter, "final": final, "tokens_before": tokens_before,
                "tokens_seen_total": tokens_before + tokens, **more}

        def extra(tmp: Path) -> None:
            if trainer_state:
                torch.save({"optimizer": optimizer.state_dict() if optim_state is None else optim_state,
                            "torch_rng": torch.get_rng_state()}, tmp / TRAINER_STATE)
                write_json(tmp / TRAINER_STATE_JSON, {"step": step, "tokens": tokens, "seconds": seconds,
                                                      "best": best})
            objective.save_extra(tmp)

        save_checkpoint(weights, data.tokenizer_file, folder, meta, extra=extra)

    step, tokens, elapsed = state["step"], state["tokens"], state["seconds"]
    # early stopping: the best validation loss so far, its step, and evaluations since it improved
    best = state.get("best") or {"val_loss": math.inf, "step": 0, "stale": 0}
    best_dir = out_dir / "best"
    snapshots = sorted(set(int(s) for s in snapshots))
    stop_early = False
    skipped = 0
    val_loss = math.nan
    t_start = time.perf_counter() - elapsed
    t_log, tok_log = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=step, desc=f"train {objective.name}", unit="step",
               disable=not (progress and d.main), dynamic_ncols=True)
    while step < total_steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total_steps, tcfg)
        batches = [get_batch(train_stream, block, tcfg.batch_size, tcfg.seed, step, m * d.world + d.rank, device,
                             train_types) for m in range(tcfg.grad_accum)]
        count = torch.zeros((), dtype=torch.float64, device=device)
        for x, y, s, _ in batches:
            count += objective.loss_mask(y, s).sum()
        count = d.all_sum(count).clamp(min=1)
        loss_total = torch.zeros((), device=device)
        for m, (x, y, s, t) in enumerate(batches):
            sync = contextlib.nullcontext() if (d.world == 1 or m == tcfg.grad_accum - 1) else no_sync(train_model)
            with sync:
                with autocast(device, tcfg.dtype):
                    out = objective.forward(fwd, x, fused=fused, types=t)
                loss_sum = objective.loss(out, y, s)
                loss = loss_sum / count * d.world  # DDP averages gradients over ranks
                loss.backward()
            loss_total += loss_sum.detach()
        for p in (p for h in heads for p in h.parameters() if p.grad is not None and d.world > 1):
            d.all_sum(p.grad).div_(d.world)  # modules outside DDP: average their gradients over ranks like DDP
        loss_total = d.all_sum(loss_total) / count
        finite = bool(torch.isfinite(loss_total))
        clip = clip_sharded_gradients if sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip([*model.parameters(), *(p for h in heads for p in h.parameters())],
                         tcfg.grad_clip if tcfg.grad_clip else float("inf"))
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
            skipped = 0
        else:
            skipped += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            if skipped >= 5:
                raise PhfError(f"5 consecutive steps with a non-finite loss at step {step}; lower train.lr or use "
                               f"train.dtype=fp32, then resume with `phf train --resume {out_dir}`")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        tok_log += tokens_per_step
        elapsed = time.perf_counter() - t_start
        stop_for_time = torch.tensor(float(tcfg.max_seconds and elapsed >= tcfg.max_seconds))
        stop_for_time = bool(d.all_sum(stop_for_time) > 0)
        last = step >= total_steps or stop_for_time
        if d.main and (step % tcfg.log_every == 0 or last):
            now = time.perf_counter()
            rec = {"step": step, "tokens": tokens, "total_tokens": tokens_before + tokens,
                   "loss": round(loss_total.item(), 5),
                   "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(float(grad_norm), 4),
                   "tokens_per_s": round(tok_log / max(now - t_log, 1e-9), 1), "seconds": round(elapsed, 2)}
            t_log, tok_log = now, 0
            metrics.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or last:
            val_loss = evaluate_loss(model, objective, val_stream, block, tcfg.eval_tokens, device, tcfg.dtype,
                                     types=val_types)
            rec = {"step": step, "tokens": tokens, "total_tokens": tokens_before + tokens,
                   "val_loss": round(val_loss, 5)}
            if sampler is not None:
                rec.update(sampler.evaluate(model, step))
            if tcfg.early_stopping_patience:
                if val_loss < best["val_loss"] - tcfg.early_stopping_min_delta:
                    best = {"val_loss": val_loss, "step": step, "stale": 0}
                    save(step, tokens, elapsed, final=False, folder=best_dir, trainer_state=False)
                else:
                    best["stale"] += 1
                    stop_early = best["stale"] >= tcfg.early_stopping_patience
                rec["best_val_loss"] = round(best["val_loss"], 5)
            if d.main:
                metrics.log(rec)
        if step in snapshots:
            save(step, tokens, elapsed, final=False, folder=out_dir / "snapshots" / f"step-{step}",
                 trainer_state=False)
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and not last:
            save(step, tokens, elapsed, final=False)
        bar.update()
        if stop_for_time:
            log.info("stopping at step %d: train.max_seconds reached", step)
            break
        if stop_early:
            log.info("stopping at step %d: validation loss has not improved for %d evaluations (best %.4f at "
                     "step %d)", step, best["stale"], best["val_loss"], best["step"])
            break
    bar.close()
    restored = {}
    if tcfg.early_stopping_patience and best["step"] and best["step"] != step:
        d.barrier()  # rank 0 wrote the best weights; every rank restores them
        restore_weights(model, best_dir)
        val_loss = best["val_loss"]
        restored = {"restored_best_step": best["step"], "stopped_at_step": step}
        if d.main:
            metrics.log({"step": step, "tokens": tokens, "total_tokens": tokens_before + tokens,
                         "restored_best_step": best["step"], "val_loss": round(val_loss, 5)})
    save(step, tokens, elapsed, final=True, **restored)
    d.barrier()
    if d.main:
        metrics.close()
        write_json(out_dir / "train_summary.json", {"steps": step, "tokens": tokens, "seconds": round(elapsed, 2),
                                                     "val_loss": val_loss, "total_steps_planned": total_steps,
                                                     "tokens_before": tokens_before, **restored,
                                                     "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)})
    return TrainResult(out_dir, ckpt_dir, step, tokens, elapsed, val_loss, objective, data)
