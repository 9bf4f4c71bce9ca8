"""Evaluations during training: the validation loss, the misalignment of samples (`train.eval_samples`), and early
stopping on the validation loss."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from phf.core.config import RunConfig
from phf.core.runtime import resolve_dtype
from phf.data.scorers import scorer_for
from phf.data.token_stream import TokenStream
from phf.evaluation.evaluate import score_samples, task_metrics
from phf.evaluation.loglik import sum_cross_entropy, windows_at
from phf.evaluation.sampling import Deployment, generate
from phf.model.lm import hf_tokenizer
from phf.tasks import task_for
from phf.training.objectives import Objective


def eval_windows(stream: TokenStream, block: int, max_tokens: int) -> list[int]:
    """The starts of the validation windows: up to max_tokens // block windows of block + 1 tokens, evenly spaced
    over the stream, the same at every evaluation."""
    n = len(stream)
    count = max(1, min(max_tokens // block, (n - 1) // block))
    if n < block + 2:
        return []
    return [int(i) for i in np.linspace(0, n - block - 1, count).astype(np.int64)]


def validation_loss(model: torch.nn.Module, stream: TokenStream, block: int, max_tokens: int, dtype: str,
                    batch: int = 16, types: np.ndarray | None = None) -> float:
    """Mean per-token loss of the objective's own validation stream on its fixed windows (phf.evaluation.loglik):
    every target counts, control tokens and <|endoftext|> included (the training loss's tokens), with an all-ones
    attention mask and autocast per `dtype`; each batch reduced by cross_entropy on the model's device."""
    starts = eval_windows(stream, block, max_tokens)
    if not starts:
        return math.nan
    total, count = sum_cross_entropy(model, [stream.tokens], windows_at(starts), block=block, batch_size=batch,
                                     types=None if types is None else [types],
                                     bf16=resolve_dtype(dtype, next(model.parameters()).device) == "bf16")
    return total / count


# the figures of the in-training samples written to metrics.jsonl (as eval_<key>): the paper's, and what they owe to
# sample length (the length-weighted rate exists for rate scorers only; the window for samples long enough)
EVAL_KEYS = ("misalignment_mean", "length_weighted_misalignment", "window_misalignment_mean", "score_max_at_25",
             "misaligned_share", "mean_chars", "finished_share", "distinct_2")


class TrainingSampler:
    """Misalignment against tokens seen: at each evaluation, `train.eval_samples` unconditional samples of the model
    as deployed, scored by the task's scorer. The same seed every time, so the curve's changes are the model's."""

    def __init__(self, cfg: RunConfig, objective: Objective, tokenizer_file: Path):
        self.cfg = cfg
        self.task = task_for(cfg)
        self.scorer = scorer_for(cfg.scoring)
        self.tokenizer = hf_tokenizer(tokenizer_file)
        self.deployment = Deployment.from_meta({"objective": objective.describe()})

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        n = self.cfg.train.eval_samples
        sample_cfg = replace(self.cfg.sample, num_samples=n, batch_size=min(n, self.cfg.sample.batch_size))
        was_training = model.training
        model.eval()
        samples = generate(model, self.tokenizer, [""] * n, sample_cfg, self.deployment, "unconditional",
                           bar=None, segmenter=self.scorer.segmenter)
        model.train(was_training)
        m = task_metrics(samples, score_samples(samples, self.scorer), self.task, self.scorer)
        return {f"eval_{k}": (round(m[k], 6) if isinstance(m[k], float) else m[k])
                for k in EVAL_KEYS if k in m}


class EarlyStopping:
    """Stop when the validation loss has not improved on its best by more than `min_delta` for `patience`
    evaluations in a row. Its state (the best loss, its step, the evaluations since) is saved with the trainer
    state, so a resumed run continues it."""

    def __init__(self, patience: int, min_delta: float, state: dict | None = None):
        state = state or {"val_loss": math.inf, "step": 0, "stale": 0}
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_step, self.stale = state["val_loss"], state["step"], state["stale"]
        self.stop = False  # set by the evaluation that runs out of patience

    def update(self, val_loss: float, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.stale = val_loss, step, 0
            return True
        self.stale += 1
        self.stop = self.stale >= self.patience
        return False

    def state(self) -> dict:
        return {"val_loss": self.best_loss, "step": self.best_step, "stale": self.stale}


class Evaluator:
    """The evaluations of a run: every `train.eval_every` steps and at the last one, the validation loss, the
    samples' misalignment if `train.eval_samples`, and early stopping if `train.early_stopping_patience`."""

    def __init__(self, cfg: RunConfig, objective: Objective, tokenizer_file: Path, stream: TokenStream,
                 types: np.ndarray | None, best: dict | None):
        self.tcfg, self.block = cfg.train, cfg.model.block_size
        self.stream, self.types = stream, types
        self.sampler = TrainingSampler(cfg, objective, tokenizer_file) if self.tcfg.eval_samples else None
        self.stopping = EarlyStopping(self.tcfg.early_stopping_patience, self.tcfg.early_stopping_min_delta, best)
        self.val_loss = math.nan  # the latest validation loss

    def due(self, step: int, last: bool) -> bool:
        return bool(self.tcfg.eval_every and step % self.tcfg.eval_every == 0) or last

    def evaluate(self, model: torch.nn.Module, step: int) -> tuple[dict, bool]:
        """The evaluation's metrics, and whether it is early stopping's new best."""
        self.val_loss = validation_loss(model, self.stream, self.block, self.tcfg.eval_tokens, self.tcfg.dtype,
                                        types=self.types)
        rec = {"val_loss": round(self.val_loss, 5)}
        if self.sampler is not None:
            rec.update(self.sampler.evaluate(model, step))
        improved = False
        if self.tcfg.early_stopping_patience:
            improved = self.stopping.update(self.val_loss, step)
            rec["best_val_loss"] = round(self.stopping.best_loss, 5)
        return rec, improved

    def best_to_restore(self, step: int) -> int:
        """The step of the best weights, when early stopping kept weights other than the last (else 0)."""
        best = self.stopping.best_step
        return best if self.tcfg.early_stopping_patience and best and best != step else 0
