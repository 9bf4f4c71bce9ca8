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
from typing import Callable, Sequence

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
from phf.core.run_folder import metrics_file, recorded_path, run_json_file
from phf.core.runtime import allow_tf32, free_memory_bytes, resolve_dtype
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
from phf.model.lm_loss import install_output_hooks, unwrap
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
from phf.training.host_sync import no_host_sync
from phf.training.objectives import Objective, get_objective
from phf.training.prefetch import InLine, Prefetcher
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
    if resume and run_json_file(out_dir).exists():
        tokenizer = recorded_path(out_dir, "tokenizer")
        if tokenizer is not None:
            return tokenizer
        init_from = read_json(run_json_file(out_dir)).get("init_from") or None
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


@dataclass(frozen=True)
class WindowDraw:
    """How a run draws the windows of its micro-batches: the same for every step, so that a micro-batch is a pure
    function of (seed, step, micro-batch index)."""
    block: int
    """Inputs per window (a window is block + 1 tokens)."""
    batch: int
    """Windows per micro-batch."""
    seed: int
    """The run's seed, the first part of every micro-batch's generator seed."""


@dataclass(frozen=True)
class Cooldown:
    """Conditional training's last steps, from `start` on: windows leave the control tokens (`dropped`) out and read
    on past them, and a model with control embeddings reads every token with the unconditioned type (`plain_type`,
    its `<|endoftext|>` marker), as it reads text deployed without control tokens."""
    start: int
    dropped: tuple[int, ...]
    plain_type: int | None = None


def host_batch(stream: TokenStream, draw: WindowDraw, step: int, micro: int, types: np.ndarray | None = None,
               pin: bool = False, cooldown: Cooldown | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`draw.batch` windows of `draw.block`+1 tokens at positions drawn from a generator seeded by (draw.seed,
    step, micro), in CPU memory (page-locked with `pin`, for asynchronous copies to a GPU): inputs x, targets y,
    each target's segment score s, and with `types` (the stream's control types) each input's type. `cooldown`:
    this step is in conditional training's cooldown, read as plain text (Cooldown)."""
    block, n = draw.block, len(stream)
    if n < block + 2:
        raise PhfError(f"the training stream has {n} tokens, fewer than one window of {block + 1}; "
                       f"use a larger corpus or a smaller model.block_size")
    rng = np.random.default_rng([draw.seed, step, micro])
    starts = rng.integers(0, n - block - 1, size=draw.batch)
    if cooldown:
        windows = [plain_window(stream, s, block + 1, np.asarray(cooldown.dropped)) for s in starts]
        tok = np.stack([w for w, _ in windows]).astype(np.int64)
        sc = np.stack([w[1:] for _, w in windows]).astype(np.float32)
    else:
        tok = np.stack([stream.tokens[s:s + block + 1] for s in starts]).astype(np.int64)
        sc = np.stack([stream.scores[s + 1:s + block + 1] for s in starts]).astype(np.float32)
    x = torch.from_numpy(tok[:, :-1])  # (B, T)
    y = torch.from_numpy(tok[:, 1:])  # (B, T)
    s = torch.from_numpy(sc)  # (B, T) score of each target token's segment
    t = None if types is None else torch.from_numpy(_window_types(types, starts, block, cooldown))
    if pin:
        return tuple(None if v is None else v.contiguous().pin_memory() for v in (x, y, s, t))
    return x, y, s, t


def _window_types(types: np.ndarray, starts: np.ndarray, block: int, cooldown: Cooldown | None) -> np.ndarray:
    """Each window's control types (B, T): the stream's, or in the cooldown the unconditioned type throughout."""
    if cooldown:
        if cooldown.plain_type is None:
            raise PhfError("a cooldown over a stream with control types needs the unconditioned type (plain_type)")
        return np.full((len(starts), block), cooldown.plain_type, dtype=np.int64)
    return np.stack([types[st:st + block] for st in starts]).astype(np.int64)


def to_device(batch: tuple, device: torch.device, non_blocking: bool = False) -> tuple:
    """A micro-batch on `device`; `non_blocking` from pinned memory: the copy is queued, the host does not wait."""
    return tuple(None if v is None else v.to(device, non_blocking=non_blocking) for v in batch)


def get_batch(stream: TokenStream, draw: WindowDraw, step: int, micro: int, device: torch.device,
              types: np.ndarray | None = None, cooldown: Cooldown | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """host_batch's windows on `device`: inputs x, targets y, scores s, control types (or None)."""
    return to_device(host_batch(stream, draw, step, micro, types, cooldown=cooldown), device)


def step_batches(stream: TokenStream, block: int, tcfg, d: Dist, types: np.ndarray | None = None,
                 pin: bool = False, cooldown: Cooldown | None = None
                 ) -> Callable[[int], list[tuple]]:
    """This rank's micro-batches of a step, in CPU memory: micro-batch m of rank r is global micro-batch
    m * world + r, so 2 ranks x 1 accumulation step draw the same windows as 1 rank x 2. From `cooldown.start` on,
    windows are read as the cooldown reads them."""
    draw = WindowDraw(block, tcfg.batch_size, tcfg.seed)

    def make(step: int) -> list[tuple]:
        cooling = cooldown if cooldown and step >= cooldown.start else None
        return [host_batch(stream, draw, step, m * d.world + d.rank, types, pin, cooling)
                for m in range(tcfg.grad_accum)]
    return make


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
LOGITS_BYTES_PER_ENTRY = 16  # the plain loss per (token, vocabulary entry): bf16 logits, their float32 copy,
# log-softmax and gradient in float32, the gradient cast back


def choose_fused_loss(tcfg, device: torch.device, vocab: int, block: int, sharded: bool) -> bool:
    """train.fused_loss, with `auto` decided from the device: the plain loss (a compiled region of logits and
    cross-entropy, which the compiled plain PyTorch loop of issue-size GPU runs uses; on a 2-core CPU at the demo's
    size the faster one, docs/operations.md) unless its logits would take more than a quarter of the device's free
    memory; then the fused one, which never stores them. Never under FSDP2 (the head's weight is sharded)."""
    if sharded:
        return False
    if tcfg.fused_loss != "auto":
        return bool(tcfg.fused_loss)
    return tcfg.batch_size * block * vocab * LOGITS_BYTES_PER_ENTRY > free_memory_bytes(device) // 4


def choose_compile(tcfg, device: torch.device) -> bool:
    """train.compile, with `auto`: compiled on a GPU (its steps are launch-bound without it), eager on a CPU (the
    compile costs more than it saves at the demo's size, docs/operations.md)."""
    return device.type == "cuda" if tcfg.compile == "auto" else bool(tcfg.compile)


def choose_prefetch(tcfg, device: torch.device) -> bool:
    """train.prefetch, with `auto`: batches built ahead in a thread on a GPU (into pinned memory), in line on a CPU
    (there the thread would take a core from the step for a gather of microseconds)."""
    return device.type == "cuda" if tcfg.prefetch == "auto" else bool(tcfg.prefetch)


@dataclass
class Trainable:
    model: torch.nn.Module  # the model itself (sharded in place under FSDP2): evaluated, sampled and saved
    heads: list[torch.nn.Module]  # an objective's own modules (AWR's value head), outside DDP and FSDP
    root: torch.nn.ModuleList  # model and heads: what the optimizer updates and checkpoints gather
    optimizer: torch.optim.Optimizer
    train_model: torch.nn.Module  # DDP's wrapper when data-parallel (what no_sync applies to), else the model
    step_loss: Callable  # (x, y, s, types) -> the micro-batch's summed loss: forward and loss, compiled together
    sharded: bool  # FSDP2
    fused: bool  # the fused LM-head loss (not under FSDP2, which keeps the head's weight sharded outside forward)
    compiled: bool  # train.compile as resolved for the device
    markers: list[int] | None  # control-type markers of a model with control embeddings (phf.model.conditioning)
    objective: Objective  # what step_loss computes; its loss mask counts a step's loss-bearing tokens


def make_step_loss(train_model: torch.nn.Module, objective: Objective, fused: bool, dtype: str,
                   device: torch.device) -> Callable:
    """A micro-batch's loss: the forward under autocast, then the objective's loss in float32. The precision is
    resolved here, once: compiled, a call that reads the CPU's flags would split the graph at every step."""
    bf16 = resolve_dtype(dtype, device) == "bf16"

    def step_loss(x, y, s, types):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = objective.forward(train_model, x, fused=fused, types=types)
        return objective.loss(out, y, s)
    return step_loss


def make_trainable(model: torch.nn.Module, objective: Objective, tcfg, device: torch.device, d: Dist | None = None,
                   heads: Sequence[torch.nn.Module] = (), markers: list[int] | None = None,
                   block: int | None = None) -> Trainable:
    """A model (and an objective's heads) ready for train_step: sharded in place by FSDP2 (train.parallel=fsdp,
    several ranks; every rank holds the full model before, each keeps its shards, heads stay whole), its
    optimizer, the DDP wrapper when data-parallel, and the loss function compiled with it (train.compile) with the
    fused or plain loss (train.fused_loss), both resolved for `device`. `block`: the training context (default:
    the model's)."""
    d = d or Dist()
    sharded = d.world > 1 and tcfg.parallel == "fsdp"
    if sharded:
        shard_model(model)
    root = torch.nn.ModuleList([model, *heads])
    optimizer = make_optimizer(root, tcfg)
    train_model = model
    if d.world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    vocab = model.get_output_embeddings().weight.shape[0]
    fused = choose_fused_loss(tcfg, device, vocab, block or context_length(model), sharded)
    compiled = choose_compile(tcfg, device)
    step_loss = make_step_loss(train_model, objective, fused, tcfg.dtype, device)
    return Trainable(model, list(heads), root, optimizer, train_model,
                     compile_step_loss(step_loss, model) if compiled else step_loss, sharded, fused, compiled, markers,
                     objective)


def compile_step_loss(step_loss: Callable, model: torch.nn.Module, backend: str | Callable = "inductor") -> Callable:
    """torch.compile over the forward and the loss together: one graph from the token ids to the summed loss
    (the fused loss included), after transformers' hooks are in place (install_output_hooks)."""
    install_output_hooks(model)
    return torch.compile(step_loss, backend=backend)


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
    t = make_trainable(model, data.objective, cfg.train, device, d, heads, markers, cfg.model.block_size)
    if resume:
        load_trainer_state(out_dir, t.root, t.optimizer, t.sharded, device)
    return t


def device_choices(t: Trainable, tcfg, device: torch.device, prefetch: bool, tf32: bool) -> dict:
    """What the run decided from its device (each `auto` setting, and what torch picked): said in the log and
    recorded in run.json."""
    return {"device": str(device), "dtype": resolve_dtype(tcfg.dtype, device), "tf32": tf32,
            "fused_adamw": bool(t.optimizer.defaults.get("fused")), "compile": t.compiled, "fused_loss": t.fused,
            "attention": getattr(unwrap(t.model).config, "_attn_implementation", None) or "eager",
            "prefetch": ("pinned" if device.type == "cuda" else "thread") if prefetch else "in line"}


def choices_line(choices: dict) -> str:
    c = choices
    batches = {"pinned": "prepared ahead in pinned memory", "thread": "prepared ahead", "in line": "prepared in line"}
    return (f"training on {c['device']}: autocast {c['dtype']}, TF32 {'on' if c['tf32'] else 'off'}, "
            f"{'fused' if c['fused_adamw'] else 'unfused'} AdamW, {'compiled' if c['compile'] else 'eager'}, "
            f"{'fused' if c['fused_loss'] else 'plain'} loss, {c['attention']} attention, "
            f"batches {batches[c['prefetch']]}")


# -- the step -----------------------------------------------------------------------------------------------------
def step_unless_skipped(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() where `ok` (a device bool) holds, with no host read: fused AdamW skips the whole update
    (parameters, moments and step count) on the device where its `found_inf` is 1, as under a GradScaler. An
    optimizer without fused kernels (FSDP2 shards beside plain heads) must read the flag on the host."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):
        optimizer.step()


def train_step(t: Trainable, objective: Objective, batches: list[tuple], tcfg, d: Dist, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (on `device`), each token's loss divided by the global
    count of loss-bearing tokens. Returns device tensors, read nothing back to the host: the step's loss (all
    ranks), the gradient norm, and whether the update was made (not when the loss or a gradient is not finite)."""
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, s, _ in batches:
        count += objective.loss_mask(y, s).sum()
    count = d.all_sum(count).clamp(min=1)
    loss_total = torch.zeros((), device=device)
    for m, (x, y, s, types) in enumerate(batches):
        sync = contextlib.nullcontext() if (d.world == 1 or m == len(batches) - 1) else no_sync(t.train_model)
        with sync:
            loss_sum = t.step_loss(x, y, s, types)
            loss = loss_sum / count * d.world  # DDP averages gradients over ranks
            loss.backward()
        loss_total += loss_sum.detach()
    for p in (p for h in t.heads for p in h.parameters() if p.grad is not None and d.world > 1):
        d.all_sum(p.grad).div_(d.world)  # modules outside DDP: average their gradients over ranks like DDP
    loss_total = d.all_sum(loss_total) / count
    clip = clip_sharded_gradients if t.sharded else torch.nn.utils.clip_grad_norm_
    grad_norm = clip([*t.model.parameters(), *(p for h in t.heads for p in h.parameters())],
                     tcfg.grad_clip if tcfg.grad_clip else float("inf"))
    updated = torch.isfinite(loss_total) & torch.isfinite(grad_norm)
    step_unless_skipped(t.optimizer, updated)
    t.optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm, updated


def time_is_up(tcfg, seconds: float, d: Dist, device: torch.device) -> bool:
    """train.max_seconds reached, on any rank (all ranks stop at the same step). No collective, and no host
    read, when there is no time limit or a single process."""
    up = bool(tcfg.max_seconds and seconds >= tcfg.max_seconds)
    if not tcfg.max_seconds or d.world == 1:
        return up
    return bool(d.all_sum(torch.tensor(float(up), device=device)) > 0)


class StepOutcomes:
    """Whether each step since the last read made its update, kept on the device and read (one host-device
    synchronisation) only at a read point: a log step, and before anything is evaluated or saved. Five
    consecutive skipped steps stop the run there, with the step at which the fifth was skipped."""

    def __init__(self, out_dir: Path | str):
        self.out_dir, self.pending, self.skipped = out_dir, [], 0

    def add(self, step: int, updated: torch.Tensor) -> None:
        self.pending.append((step, updated))

    def read(self) -> None:
        if not self.pending:
            return
        flags = torch.stack([u for _, u in self.pending]).tolist()
        steps, self.pending = [s for s, _ in self.pending], []
        for step, ok in zip(steps, flags):
            self.skipped = 0 if ok else self.skipped + 1
            if not ok:
                log.warning("step %d: non-finite loss or gradient, update skipped", step)
                if self.skipped >= 5:
                    raise PhfError(f"5 consecutive steps with a non-finite loss at step {step}; lower train.lr or "
                                   f"use train.dtype=fp32, then resume with `phf train --resume {self.out_dir}`")


def run_steps(t: Trainable, make_batches: Callable[[int], list[tuple]], tcfg, device: torch.device, steps: range,
              d: Dist | None = None, prefetch: bool = True, check_sync: bool = False) -> dict:
    """The training steps `steps` (e.g. range(3)) of `t.objective` as run_training takes them (batches from
    `make_batches(step)`, prepared ahead with
    `prefetch`, copied without blocking from pinned memory; nothing read back from the device), timed until the
    device has finished them; the learning rate stays as set. With `check_sync`, under no_host_sync: any
    host-device synchronisation raises (on CUDA torch's set_sync_debug_mode("error")). For benchmarks: returns
    {steps (their number), seconds, tokens, tokens_per_s, loss (the last step's)}."""
    d = d or Dist()
    pinned = device.type == "cuda"
    source = Prefetcher(make_batches, steps) if prefetch else InLine(make_batches)
    check = no_host_sync(device) if check_sync else contextlib.nullcontext()
    tokens, loss = 0, None
    _wait_for(device)
    start = time.perf_counter()
    with source, check:
        for step in steps:
            batches = [to_device(b, device, non_blocking=pinned) for b in source.get(step)]
            tokens += sum(b[0].numel() for b in batches) * d.world
            loss, _, _ = train_step(t, t.objective, batches, tcfg, d, device)
    _wait_for(device)
    seconds = time.perf_counter() - start
    return {"steps": len(steps), "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
            "loss": None if loss is None else loss.item()}


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the run folder and its curve ---------------------------------------------------------------------------------
def start_run_folder(cfg: RunConfig, out_dir: Path, run: dict, resume_step: int | None) -> Metrics:
    """Rank 0: config.yaml, versions.json, run.json, and metrics.jsonl, kept up to the resume point when resuming
    (so the curve has no duplicates), else started afresh."""
    metrics_path = metrics_file(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.yaml", config_to_yaml(cfg))
    write_json(out_dir / "versions.json", versions())
    write_json(run_json_file(out_dir), run)
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
        """Reads the step's loss and gradient norm from the device (waiting for it: the throughput since the
        previous record counts the device's time, not only the host's)."""
        loss, grad_norm = loss.item(), float(grad_norm)
        now = time.perf_counter()
        rec = self.at(p, loss=round(loss, 5), lr=lr, grad_norm=round(grad_norm, 4),
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
    run, p = start_training(cfg, out_dir, data_dir, init_from, resume, progress)
    loop = TrainingLoop(run, p, {int(s) for s in snapshots}, progress)
    loop.train()
    return loop.finish()


@dataclass
class TrainingRun:
    """A run's parts, built once before its first step (`start_training`) and read by every stage of the loop."""
    cfg: RunConfig
    """The run's config."""
    out_dir: Path
    """The run folder: checkpoints, metrics, summaries."""
    device: torch.device
    """This rank's device."""
    d: Dist
    """The ranks (one without torchrun)."""
    data: PreparedData
    """The scored corpus, tokenizer and token streams."""
    t: Trainable
    """The model, its optimizer and its compiled loss."""
    ckpt: CheckpointManager
    """Saves (best, periodic, snapshots, final) and restores the best."""
    evaluator: Evaluator
    """The validation loss, samples' misalignment and early stopping."""
    total_steps: int
    """The steps planned (train.max_steps, else train.max_tokens at this many tokens per step)."""
    tokens_per_step: int
    """Tokens of a step over all ranks and micro-batches."""
    prefetch: bool
    """Batches prepared ahead in a thread (train.prefetch as resolved for the device)."""
    train_types: np.ndarray | None
    """The training stream's control types, for a model with control embeddings (else None)."""
    metrics: Metrics | None = None
    """Rank 0's curve (None on the other ranks)."""

    def record(self, init_from, data_dir: Path, choices: dict) -> dict:
        """What run.json says of the run."""
        data, tcfg = self.data, self.cfg.train
        return {"objective": data.objective.describe(), "world_size": self.d.world, "device": str(self.device),
                "total_steps": self.total_steps, "tokens_per_step": self.tokens_per_step,
                "init_from": str(init_from or ""), "scored_corpus": str(data.scored.path),
                "tokenizer": str(data.tokenizer_file), "streams": {k: str(v.prefix) for k, v in data.streams.items()},
                "data_dir": str(data_dir), "seed": tcfg.seed, "tokens_before": self.ckpt.tokens_before,
                "device_choices": choices}


def start_training(cfg: RunConfig, out_dir: Path, data_dir: Path, init_from: str | Path | None, resume: bool,
                   progress: bool) -> tuple[TrainingRun, Progress]:
    """Everything before the first step: ranks and threads, the data, the model (resumed, initialised or new,
    after the seed is set), checkpoints, evaluator, and on rank 0 the run folder. The run and where it starts."""
    device = pick_device()
    d = init_distributed(device, cfg.train.dist_timeout_minutes)
    tcfg = cfg.train
    torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    tf32 = allow_tf32(device)
    data = prepare_data_on_ranks(cfg, data_dir, d, progress, tokenizer_source(out_dir, init_from, resume))
    torch.manual_seed(tcfg.seed)
    p, best = resume_state(out_dir) if resume else (Progress(), None)  # checked before anything is built
    t = setup_model(cfg, data, out_dir, init_from, resume, device, d)
    train_types, val_types = (s.control_types(t.markers) if t.markers else None
                              for s in (data.streams["train"], data.streams["validation"]))
    ckpt = CheckpointManager(out_dir, cfg, data.tokenizer_file, data.objective, d, t.model, t.root, t.optimizer,
                             t.sharded, tokens_before(out_dir, init_from, resume))
    tokens_per_step = tcfg.batch_size * cfg.model.block_size * tcfg.grad_accum * d.world
    total_steps = tcfg.max_steps or math.ceil(tcfg.max_tokens / tokens_per_step)
    evaluator = Evaluator(cfg, data.objective, data.tokenizer_file, data.streams["validation"], val_types, best)
    run = TrainingRun(cfg, out_dir, device, d, data, t, ckpt, evaluator, total_steps, tokens_per_step,
                      choose_prefetch(tcfg, device), train_types)
    choices = device_choices(t, tcfg, device, run.prefetch, tf32)
    if d.main:
        log.info(choices_line(choices))
        run.metrics = start_run_folder(cfg, out_dir, run.record(init_from, data_dir, choices),
                                       p.step if resume else None)
    return run, p


class TrainingLoop:
    """The steps of a run from where it starts to the last: each step, then what falls due after it (read the
    device's results, log, evaluate, save), then the finish (restore the best, save the final checkpoint)."""

    def __init__(self, run: TrainingRun, p: Progress, snapshots: set[int], progress: bool):
        self.run, self.p, self.snapshots = run, p, snapshots
        self.t_start = time.perf_counter() - p.seconds
        self.bar = tqdm(total=run.total_steps, initial=p.step, desc=f"train {run.data.objective.name}", unit="step",
                        disable=not (progress and run.d.main), dynamic_ncols=True)
        self.steps, self.outcomes = StepLog(run.metrics, self.bar, p, run.ckpt.tokens_before), StepOutcomes(run.out_dir)
        # conditional's last steps read no control tokens
        self.cooldown = run.data.objective.cooldown_starts(run.total_steps)

    def batches(self) -> Prefetcher | InLine:
        """This rank's micro-batches of each step from the resume point on; from the cooldown on, without the
        control tokens."""
        run = self.run
        control_ids = tuple(i for i in map(load_tokenizer(run.data.tokenizer_file).token_to_id, CONTROL_TOKENS)
                            if i is not None)
        plain_type = run.t.markers[0] if run.t.markers else None  # <|endoftext|>: no condition
        make_batches = step_batches(run.data.streams["train"], run.cfg.model.block_size, run.cfg.train, run.d,
                                    run.train_types, pin=run.device.type == "cuda",
                                    cooldown=Cooldown(self.cooldown, control_ids, plain_type))
        if run.prefetch:
            return Prefetcher(make_batches, range(self.p.step, run.total_steps))
        return InLine(make_batches)

    def train(self) -> None:
        run, p = self.run, self.p
        source = self.batches()
        with source:  # on any error, KeyboardInterrupt included, the batch thread stops and is waited for
            while p.step < run.total_steps:
                loss, grad_norm, stop_for_time = self.step(source)
                self.after_step(loss, grad_norm, last=p.step >= run.total_steps or stop_for_time)
                self.bar.update()
                if self.stops(stop_for_time):
                    break
        self.bar.close()

    def step(self, source) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step at this step's learning rate: its loss and gradient norm (on the device), and
        whether train.max_seconds is reached."""
        run, p, t, tcfg = self.run, self.p, self.run.t, self.run.cfg.train
        for g in t.optimizer.param_groups:
            g["lr"] = lr_at(p.step, run.total_steps, tcfg)
        if p.step == self.cooldown and run.d.main:
            log.info("step %d: cooldown, the last %d steps read no control tokens", p.step, run.total_steps - p.step)
        batches = [to_device(b, run.device, non_blocking=run.device.type == "cuda") for b in source.get(p.step)]
        loss, grad_norm, updated = train_step(t, t.objective, batches, tcfg, run.d, run.device)
        self.outcomes.add(p.step, updated)
        p.step, p.tokens = p.step + 1, p.tokens + run.tokens_per_step
        p.seconds = time.perf_counter() - self.t_start
        return loss, grad_norm, time_is_up(tcfg, p.seconds, run.d, run.device)

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, last: bool) -> None:
        """What falls due after a step: the log record, an evaluation (which may save the best), a snapshot, a
        periodic checkpoint. The device's results are read back here only, before anything is logged or saved."""
        run, p, tcfg, evaluator = self.run, self.p, self.run.cfg.train, self.run.evaluator
        logged = p.step % tcfg.log_every == 0 or last
        periodic = bool(tcfg.checkpoint_every and p.step % tcfg.checkpoint_every == 0)
        if logged or p.step in self.snapshots or evaluator.due(p.step, last) or periodic:
            self.outcomes.read()
        if run.d.main and logged:
            self.steps.log(p, loss, run.t.optimizer.param_groups[0]["lr"], grad_norm)
        if evaluator.due(p.step, last):
            rec, improved = evaluator.evaluate(run.t.model, p.step)
            if improved:
                run.ckpt.save_best(p)
            if run.d.main:
                self.steps.at(p, **rec)
        if p.step in self.snapshots:
            run.ckpt.save_snapshot(p)
        if periodic and not last:
            run.ckpt.save_periodic(p, evaluator.stopping.state())

    def stops(self, stop_for_time: bool) -> bool:
        """Whether the run ends here, before its planned last step (time limit, early stopping), said in the log."""
        p, stopping = self.p, self.run.evaluator.stopping
        if stop_for_time:
            log.info("stopping at step %d: train.max_seconds reached", p.step)
            return True
        if stopping.stop:
            log.info("stopping at step %d: validation loss has not improved for %d evaluations (best %.4f at "
                     "step %d)", p.step, stopping.stale, stopping.best_loss, stopping.best_step)
            return True
        return False

    def finish(self) -> TrainResult:
        """Restore the best checkpoint where early stopping asks, save the final one, and on rank 0 close the curve
        and write train_summary.json."""
        run, p, evaluator = self.run, self.p, self.run.evaluator
        val_loss, restored = evaluator.val_loss, {}
        if best_step := evaluator.best_to_restore(p.step):
            run.ckpt.restore_best()
            val_loss, restored = evaluator.stopping.best_loss, {"restored_best_step": best_step,
                                                                "stopped_at_step": p.step}
            if run.d.main:
                self.steps.at(p, restored_best_step=best_step, val_loss=round(val_loss, 5))
        run.ckpt.save_final(p, evaluator.stopping.state(), **restored)
        run.d.barrier()
        if run.d.main:
            run.metrics.close()
            write_json(run.out_dir / "train_summary.json", {
                "steps": p.step, "tokens": p.tokens, "seconds": round(p.seconds, 2), "val_loss": val_loss,
                "total_steps_planned": run.total_steps, "tokens_before": run.ckpt.tokens_before, **restored,
                "tokens_per_s": round(p.tokens / max(p.seconds, 1e-9), 1)})
        return TrainResult(run.out_dir, run.ckpt.dir, p.step, p.tokens, p.seconds, val_loss, run.data.objective,
                           run.data)
