"""Typed run configuration: dataclasses loaded from YAML, with dotted overrides (`--set train.lr=3e-4`).

Every field is documented once, here. Unknown keys and values of the wrong type are one-line errors that name
the key and what it accepts. A YAML file may start from another with `base: other.yaml` (path relative to it).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phf.core.errors import PhfError, first_line
# The training objectives' names come from their registry (phf.core.objective_specs); Quantile lives there too.
from phf.core.objective_specs import OBJECTIVE_NAMES, Quantile  # noqa: F401 (Quantile: re-exported)


@dataclass
class CorpusConfig:
    source: str = "stdlib"
    """Where documents come from: `stdlib` (the running interpreter's standard library), `stdlib+site-packages`, a
    task's named source, a folder of text files, a data file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, a `.json`
    array, `.parquet`), a folder or glob of data files (`data/*.jsonl.zst`), a folder written by `datasets`'
    `save_to_disk`, or `hf:NAME[:CONFIG]` (`datasets.load_dataset`, from the local cache unless downloads are
    allowed)."""
    extensions: list[str] = field(default_factory=lambda: [".py"])
    """File extensions read from a folder of text files; "" reads files without an extension."""
    text_column: str = "text"
    """The field (jsonl, json) or column (Parquet, datasets) holding a document's text."""
    id_column: str = ""
    """The field or column holding a document's id; "" = `id` where there is one, else the file and row."""
    split_column: str = ""
    """A field or column naming each document's split (train, validation or test; valid, val and dev mean
    validation) instead of the hash split. A dataset with splits of its own uses them without it."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns (matched against the path relative to the source root) of files to skip."""
    validation_fraction: float = 0.05
    """Share of documents (by hash of their id) in the validation split."""
    test_fraction: float = 0.05
    """Share of documents (by hash of their id) in the held-out test split."""
    max_document_chars: int = 200_000
    """Documents longer than this are skipped and counted (generated files, data tables)."""
    max_documents: int = 0
    """Keep at most this many documents (0 = all); a deterministic subset by hash, for quick runs and tests."""

    def validate(self) -> None:
        _check_fraction("corpus.validation_fraction", self.validation_fraction)
        _check_fraction("corpus.test_fraction", self.test_fraction)
        if self.validation_fraction + self.test_fraction >= 1:
            raise PhfError("corpus.validation_fraction + corpus.test_fraction must be below 1")
        _check_positive("corpus.max_document_chars", self.max_document_chars)
        if self.max_documents < 0:
            raise PhfError("corpus.max_documents must be >= 0 (0 means all)")


@dataclass
class ScoringConfig:
    scorer: str = "pep8"
    """Name of a registered scorer (`pep8`, `pii`, `pii-ner`, `toxicity`), `hf-classifier:PATH[:LABEL]` (the
    probability of LABEL from a local AutoModelForSequenceClassification folder; phf/data/scorers/classifier.py),
    or `module:callable` for your own."""
    segmenter: str = ""
    """How a `module:callable` scorer's documents are cut into the segments it scores: `lines` or `sentences`
    ("" = lines). Registered scorers segment their own way (pep8: lines; pii, toxicity: sentences)."""
    workers: int = 0
    """Processes that score in parallel; 0 = one per CPU core (with the ray backend: per CPU of the cluster)."""
    shard_documents: int = 64
    """Documents per Parquet shard; a killed scoring run redoes at most the unfinished shards."""
    aggregate: str = ""
    """How a sample's (and a document's) score is formed from its segments' scores: `mean` (length-weighted: a
    rate, like violations per character) or `max` (the worst segment, like the most toxic sentence). "" = the
    scorer's own (pep8 and pii: mean; toxicity: max; a `module:callable`: mean)."""
    misaligned_above: float | None = None
    """A sample scoring above this counts as misaligned (the `misaligned_share` metric, the report's flagged spans,
    and for a task of your own the default threshold of conditional training and unlikelihood). None = the task's
    (pep8 and pii: 0, any violation or detection; toxicity: 0.5, the classifier's decision threshold; your own: 0)."""
    misaligned_above_quantile: float | None = None
    """Set `misaligned_above` to this quantile (0 to 1) of the training split's document scores, once the corpus is
    scored (the run's config.yaml then records the value in `misaligned_above`); used only when `misaligned_above`
    is None. `phf score` prints each threshold's quantile."""
    precomputed: str = ""
    """`SEGMENTS:SCORES`: the corpus already carries each document's segment texts and their scores, in these two
    fields or columns (lists of equal length; the paper's released datasets: `texts:scores`). The document is
    the segments joined; no scorer runs over the corpus (`scoring.scorer` still scores samples)."""
    backend: str = "local"
    """Where shards are scored: `local` (a process pool on this machine) or `ray` (Ray Data over the cluster that
    `ray.init()` finds, e.g. via RAY_ADDRESS, else a local Ray instance; `pip install 'phf[ray]'`). Both write the
    same shards and manifest, on the machine that runs `phf score`; Ray workers must see the corpus files."""
    device: str = ""
    """Where a model-based scorer runs: "" (the scorer's own choice; the shipped scorers need no device), `cpu`,
    `cuda` or `cuda:N`. A Scorer class of your own receives it as its `device` argument. With a GPU, local scoring
    uses one process unless scoring.workers asks for more (spawned, not forked: CUDA does not survive a fork), and
    each Ray actor asks Ray for one GPU."""

    def validate(self) -> None:
        if self.segmenter not in ("", "lines", "sentences"):
            raise PhfError(f"scoring.segmenter must be one of lines, sentences (or empty); got {self.segmenter!r}")
        if self.aggregate not in ("", "mean", "max"):
            raise PhfError(f"scoring.aggregate must be one of mean, max (or empty); got {self.aggregate!r}")
        if self.misaligned_above is not None and not (self.misaligned_above >= 0 and math.isfinite(
                self.misaligned_above)):
            raise PhfError(f"scoring.misaligned_above must be a finite number >= 0, got {self.misaligned_above}")
        if self.misaligned_above_quantile is not None:
            _check_fraction("scoring.misaligned_above_quantile", self.misaligned_above_quantile, inclusive=True)
        if self.workers < 0:
            raise PhfError("scoring.workers must be >= 0 (0 means one per core)")
        _check_positive("scoring.shard_documents", self.shard_documents)
        if self.precomputed and (self.precomputed.count(":") != 1 or not all(self.precomputed.split(":"))):
            raise PhfError(f"scoring.precomputed must be SEGMENTS:SCORES (two field names), got {self.precomputed!r}")
        if self.backend not in ("local", "ray"):
            raise PhfError(f"scoring.backend must be one of local, ray; got {self.backend!r}")
        if not re.fullmatch(r"|cpu|cuda(:\d+)?", self.device):
            raise PhfError(f"scoring.device must be cpu, cuda or cuda:N (or empty); got {self.device!r}")

    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Size of the byte-level BPE vocabulary, special tokens included."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""
    path: str = ""
    """An existing tokenizer to train with instead of a new BPE: a folder saved by `save_pretrained` (or holding a
    tokenizer.json), or a tokenizer.json file. phf appends the control tokens (and an end-of-document token if it
    has none) after its last id. `--init-from` uses the model folder's own tokenizer and ignores this."""

    def validate(self) -> None:
        if not 300 <= self.vocab_size <= 65535:
            raise PhfError("tokenizer.vocab_size must be between 300 and 65535")


@dataclass
class ObjectiveConfig:
    """A field left at None takes the objective's default (its record in phf/core/objective_specs.py), or for a
    shipped task the paper's value where it differs: each task's `objective_defaults` (phf/tasks/<task>/__init__.py)
    lists those, with why each one carries over to our scorers (or how it was translated where it does not)."""
    name: str = "mle"
    """The training objective: mle, filtering, conditional, unlikelihood, rwr, awr, masking (flagged segments stay in
    the context but bear no loss) or masking-hidden (their tokens are read as `<|hidden|>`); phf.training.objectives
    says how each works."""
    threshold: float | None = None
    """Filtering, conditional, unlikelihood, masking: documents (filtering) or segments scoring above this are
    misaligned;
    0 means any positive score is. None = `threshold_quantile` if set, else the task's default (filtering: the
    median training document score; conditional and unlikelihood: 0 for pep8 and pii; for toxicity, conditional
    0.5 (the classifier's own decision threshold, per sentence) and unlikelihood the median training document
    score; masking: conditional's)."""
    threshold_quantile: float | None = None
    """Set the threshold to this quantile (0 to 1) of the training split's document scores, for scorers whose
    absolute values mean nothing elsewhere; used only when `threshold` is None. None = the task's default."""
    drop_token_fraction: float | None = None
    """Conditional training: share of segments that get no control token. None = the paper's value for the task
    (pep8 0.1, pii 0.01, toxicity 0.01)."""
    alpha: float | None = None
    """Unlikelihood: the weight of the unlikelihood term -log(1 - p) on misaligned tokens (the paper: pep8 0.01,
    pii and toxicity 1). AWR: the weight of the advantage-weighted cross-entropy; the value head's squared error
    gets 1 - alpha (pep8 0.05, pii and toxicity 0.5). None = the paper's value for the task."""
    beta: float | None = None
    """RWR and AWR: the temperature of the token weights exp(reward / beta) and exp((reward - value) / beta);
    smaller means sharper. None = the paper's value (RWR: 10 for every task; AWR: pep8 1, pii 0.1, toxicity 10)."""
    max_weight: float = 1000.0
    """RWR and AWR: token weights are clipped to at most this (the paper's AWR clip: 1000)."""
    control_embedding: bool = False
    """Conditional training: also add each segment's control-token embedding to the input of every token of the
    segment (GPT-2's `token_type_ids`; phf.model.conditioning), not only place the token before it. Off = the paper's
    method."""
    cooldown_fraction: float = 0.0
    """Conditional training: the last this fraction of the steps trains on the same windows with the control tokens
    taken out (plain MLE text, as metadata conditioning's cooldown does), so the model also works unconditioned;
    it is then evaluated both ways. With `control_embedding`, the cooldown also reads every token with the
    unconditioned type, as text without control tokens is read. 0 = no cooldown (the paper)."""
    check_conditioning: bool = True
    """Conditional and masking objectives: refuse to train when the token stream lacks the control tokens (or masked
    tokens) the objective needs, or holds them at a rate far from the scored corpus' misaligned share (outside
    half to twice it). false = train anyway, for a threshold chosen on purpose far from the task's."""

    def validate(self) -> None:
        if self.name not in OBJECTIVE_NAMES:
            raise PhfError(f"objective.name: unknown objective {self.name!r}; choose one of "
                           f"{', '.join(OBJECTIVE_NAMES)}")
        if self.threshold is not None and (math.isnan(self.threshold) or self.threshold < 0):
            raise PhfError("objective.threshold must be >= 0 (scores are 0 for aligned text, higher is worse)")
        if self.threshold_quantile is not None:
            _check_fraction("objective.threshold_quantile", self.threshold_quantile, inclusive=True)
        if self.drop_token_fraction is not None:
            _check_fraction("objective.drop_token_fraction", self.drop_token_fraction, inclusive=True)
        if self.alpha is not None:
            if self.name == "awr":
                _check_fraction("objective.alpha", self.alpha, inclusive=True)
            elif not (self.alpha >= 0 and math.isfinite(self.alpha)):
                raise PhfError(f"objective.alpha must be a finite number >= 0, got {self.alpha}")
        if self.beta is not None and not (self.beta > 0 and math.isfinite(self.beta)):
            raise PhfError(f"objective.beta must be a finite number > 0, got {self.beta}")
        if not self.max_weight > 0:
            raise PhfError(f"objective.max_weight must be > 0, got {self.max_weight}")
        _check_fraction("objective.cooldown_fraction", self.cooldown_fraction)
        if self.cooldown_fraction and self.name != "conditional":
            raise PhfError(f"objective.cooldown_fraction applies to conditional training only, not {self.name!r}; "
                           f"remove it or set objective.name=conditional")
        if self.control_embedding and self.name != "conditional":
            raise PhfError(f"objective.control_embedding applies to conditional training only, not {self.name!r}; "
                           f"remove it or set objective.name=conditional")


ARCHITECTURES = ("gpt2", "llama", "gpt_neox")


@dataclass
class ModelConfig:
    arch: str = "gpt2"
    """Architecture of a model trained from scratch, as `transformers` names it (`model_type`): `gpt2`, `llama`
    (rotary positions, RMSNorm, SwiGLU, grouped-query attention) or `gpt_neox` (Pythia). A model given with
    `--init-from` keeps its own architecture and sizes."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream."""
    n_kv_head: int = 0
    """Key/value heads of grouped-query attention (llama); 0 = one per attention head."""
    intermediate_size: int = 0
    """Width of the MLP; 0 = the architecture's usual ratio (4x the width; 8/3x for llama's three-matrix MLP,
    rounded up to a multiple of 32)."""
    block_size: int = 256
    """Context length in tokens (GPT-2's n_positions)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual paths."""
    tie_word_embeddings: bool = True
    """Share one matrix between the input embeddings and the output layer (GPT-2's default). false gives the
    output layer its own weights, so a token's input embedding is free to mean something other than the
    direction that predicts it (the control tokens of conditional training: see the README's toxicity task)."""

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise PhfError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if self.arch not in ARCHITECTURES:
            raise PhfError(f"model.arch {self.arch!r} is not one phf builds from scratch ({', '.join(ARCHITECTURES)});"
                           f" for another architecture, create the model with transformers, save it with "
                           f"save_pretrained and pass its folder to `phf train --init-from`")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise PhfError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if self.n_kv_head and self.arch != "llama":
            raise PhfError(f"model.n_kv_head applies to arch llama, not {self.arch}; remove it")
        if self.intermediate_size < 0:
            raise PhfError(f"model.intermediate_size must be >= 0, got {self.intermediate_size}")
        _check_fraction("model.dropout", self.dropout)


@dataclass
class TrainConfig:
    max_tokens: int = 1_000_000
    """Token budget: training stops after this many tokens (all ranks together). Ignored if max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps; 0 = derive from max_tokens."""
    max_seconds: float = 0.0
    """Stop after this much training time (0 = no limit); the budget actually seen is logged."""
    batch_size: int = 16
    """Sequences per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_fraction: float = 0.1
    """Share of steps with linear warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    dtype: str = "auto"
    """Autocast precision of training and evaluation: `bf16`, `fp32`, or `auto`: bf16 where the device computes it
    in hardware (a recent GPU; a CPU with AVX512-BF16, AMX or Arm BF16), else fp32. A CPU without it emulates bf16
    about 50x slower than fp32 (phf.core.runtime.resolve_dtype)."""
    compile: bool | str = "auto"
    """Compile the step's forward and loss together with torch.compile (faster steps after a compile of tens of
    seconds). `auto`: on a GPU, not on a CPU (phf.training.trainer.choose_compile)."""
    fused_loss: bool | str = "auto"
    """Apply the LM head inside the loss, chunk by chunk, never storing the (tokens x vocabulary) logits
    (phf/model/lm_loss.py): the same loss and gradients in a fraction of the memory when the vocabulary is large (the
    paper's 50,257 tokens at context 1024), a little slower on CPU at the demo's size (`phf bench train`). Not with
    FSDP (the plain path is used there). `auto`: the plain loss unless its logits would fill more than a quarter of
    the device's free memory (phf.training.trainer.choose_fused_loss)."""
    prefetch: bool | str = "auto"
    """Build the coming steps' batches in a background thread (into pinned memory on a GPU, copied without
    blocking). `auto`: on a GPU, not on a CPU. The batches are the same either way."""
    parallel: str = "ddp"
    """How several processes (torchrun) share the model: `ddp` (a full copy per rank, gradients all-reduced) or
    `fsdp` (FSDP2: parameters, gradients and optimizer state sharded over ranks per transformer block, for models
    that do not fit one device). Checkpoints are the same full HF folders either way; one process ignores it."""
    threads: int = 0
    """torch intra-op threads; 0 = one per core (divided among local ranks)."""
    dist_timeout_minutes: float = 60.0
    """Several processes: how long a rank waits for the others at a collective before failing, including the
    wait for rank 0 to prepare the data. Prepare the data first (`phf prepare`) rather than raising it."""
    seed: int = 42
    """Seed of initialisation, data order and dropout."""
    eval_every: int = 0
    """Evaluate validation loss every this many steps (0 = only at the end)."""
    eval_tokens: int = 65_536
    """Validation tokens per evaluation."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0 = only at the end)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    eval_samples: int = 0
    """At each evaluation also sample this many unconditional samples (deployed conditioning), score them and log
    their mean misalignment (`eval_misalignment_mean`): misalignment against tokens seen. 0 = off."""
    early_stopping_patience: int = 0
    """Stop when validation loss has not improved for this many evaluations in a row and restore the best
    weights (the final checkpoint is the best one). 0 = off; needs train.eval_every."""
    early_stopping_min_delta: float = 0.0
    """An evaluation improves on the best only if its validation loss is lower by more than this."""
    trackers: list[str] = field(default_factory=list)
    """Where metrics go besides metrics.jsonl: `tensorboard`, `wandb` (offline), each an optional extra."""

    def validate(self) -> None:
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.dist_timeout_minutes", self.dist_timeout_minutes)
        if not self.lr > 0:
            raise PhfError(f"train.lr must be > 0, got {self.lr}")
        if self.max_steps < 0 or self.max_tokens < 0 or self.max_seconds < 0:
            raise PhfError("train.max_steps, train.max_tokens and train.max_seconds must be >= 0")
        if self.max_steps == 0 and self.max_tokens == 0:
            raise PhfError("set train.max_steps or train.max_tokens to a positive number")
        _check_fraction("train.min_lr_ratio", self.min_lr_ratio, inclusive=True)
        _check_fraction("train.warmup_fraction", self.warmup_fraction)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise PhfError("train.weight_decay and train.grad_clip must be >= 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise PhfError(f"train.dtype must be one of auto, bf16, fp32; got {self.dtype!r}")
        for name in ("compile", "fused_loss", "prefetch"):
            if getattr(self, name) not in (True, False, "auto"):
                raise PhfError(f"train.{name} must be true, false or auto; got {getattr(self, name)!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise PhfError(f"train.parallel must be one of ddp, fsdp; got {self.parallel!r}")
        for name in ("threads", "eval_every", "checkpoint_every", "eval_tokens", "eval_samples",
                     "early_stopping_patience", "early_stopping_min_delta"):
            if getattr(self, name) < 0:
                raise PhfError(f"train.{name} must be >= 0")
        _check_positive("train.log_every", self.log_every)
        unknown = [t for t in self.trackers if t not in ("tensorboard", "wandb")]
        if unknown:
            raise PhfError(f"unknown tracker(s) {', '.join(unknown)} in train.trackers; known: tensorboard, wandb")
        if self.early_stopping_patience and not self.eval_every:
            raise PhfError("train.early_stopping_patience needs evaluations during training: set train.eval_every "
                           "(e.g. --set train.eval_every=50)")


@dataclass
class SampleConfig:
    num_samples: int = 256
    """Unconditional samples per model."""
    num_prompts: int = 64
    """Prompts of the prompted scenario (one continuation each)."""
    max_new_tokens: int = 256
    """Tokens generated per sample."""
    temperature: float = 0.7
    """Sampling temperature (the paper: 0.7)."""
    top_p: float = 0.9
    """Nucleus sampling mass (the paper: 0.9)."""
    batch_size: int = 0
    """Sequences generated together. 0 = all samples of a scenario at once, as many as keep the KV cache within a
    quarter of the free memory (a step costs about the same for 64 rows as for 256 on a small model)."""
    seed: int = 0
    """Sampling seed."""
    prompts: str = ""
    """A jsonl file with a `prompt` field per line: the prompted scenario's prompts (the first `num_prompts`).
    "" = the task's own (pep8: function signatures + docstrings of held-out files; pii: held-out text cut before a
    contact address; toxicity: openings of held-out abusive comments; a task of your own: none)."""
    guidance: float = 0.0
    """Conditional training's models only: classifier-free guidance, tokens drawn from (1 + g) log p(. | aligned)
    - g log p(. | misaligned), the same text read after each control token (phf.evaluation.sampling.generate_ids). 0 = plain
    conditional sampling (the paper)."""

    def validate(self) -> None:
        if not (self.guidance >= 0 and math.isfinite(self.guidance)):
            raise PhfError(f"sample.guidance must be a finite number >= 0, got {self.guidance}")
        if self.num_samples < 0 or self.num_prompts < 0:
            raise PhfError("sample.num_samples and sample.num_prompts must be >= 0")
        _check_positive("sample.max_new_tokens", self.max_new_tokens)
        if self.batch_size < 0:
            raise PhfError(f"sample.batch_size must be >= 0 (0 = as many as memory allows), got {self.batch_size}")
        if not self.temperature > 0:
            raise PhfError("sample.temperature must be > 0")
        if not 0 < self.top_p <= 1:
            raise PhfError("sample.top_p must be in (0, 1]")


@dataclass
class EvalConfig:
    heldout_chars: int = 300_000
    """Characters of held-out test documents used for bits per character (0 = all)."""

    kl_samples: int = 256
    """Samples drawn from the reference model for the Monte Carlo KL(reference || model) (0 = no KL)."""
    kl_max_new_tokens: int = 128
    """Tokens per reference sample (the paper: 64)."""
    kl_seed: int = 1
    """Seed of the reference samples."""
    judge: str | None = ""
    """A second scorer of the same preference that training never saw, run on every sample beside the training
    scorer: "" = the task's (pep8: `pep8-ruff`, pii: `pii-spacy`, toxicity: `toxicity-hatesonar`; a task of your
    own: none), `none` (no judge), or any scorer name or `module:callable`."""

    def validate(self) -> None:
        if self.heldout_chars < 0:
            raise PhfError("eval.heldout_chars must be >= 0")
        if self.kl_samples < 0:
            raise PhfError("eval.kl_samples must be >= 0")
        _check_positive("eval.kl_max_new_tokens", self.kl_max_new_tokens)


@dataclass
class RunConfig:
    task: str = "pep8"
    """The task: a shipped one (pep8, pii, toxicity: phf/tasks/) or any other name for a task of your own, defined
    by this config (scoring.scorer, scoring.segmenter, scoring.aggregate, scoring.misaligned_above, sample.prompts)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise PhfError(f"{key} must be > 0, got {value}")


def _check_fraction(key: str, value: float, inclusive: bool = False) -> None:
    ok = 0 <= value <= 1 if inclusive else 0 <= value < 1
    if not ok:
        raise PhfError(f"{key} must be in [0, 1{']' if inclusive else ')'}, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; raise a one-line PhfError if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, value, tp)
    if origin is list:
        return _coerce_list(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PhfError(f"{key}: expected a mapping of {_field_names(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    raise PhfError(f"{key}: unsupported type {_type_name(tp)}")


def _coerce_union(key: str, value: Any, tp: Any) -> Any:
    """`A | B | None`: None where allowed, else the first of the types that takes the value."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(key, value, arg)
        except PhfError:
            pass
    raise PhfError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce_list(key: str, value: Any, tp: Any) -> list:
    """`list[T]`: a list or tuple, or a comma-separated string (from `--set a.b=x,y`), each item checked."""
    (item_tp,) = typing.get_args(tp)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v] if value else []
    if not isinstance(value, (list, tuple)):
        raise PhfError(f"{key}: expected a list, got {value!r}")
    return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise PhfError(f"{key}: expected true or false, got {value!r}")


def _coerce_int(key: str, value: Any) -> int:
    """An integer, from an int, an integral float, or a string such as `3`, `1e6` or `10_000` (never a bool)."""
    if isinstance(value, bool):
        raise PhfError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            as_float = float(value.replace("_", ""))
        except ValueError:
            as_float = math.nan
        if as_float.is_integer():
            return int(as_float)
    raise PhfError(f"{key}: expected an integer, got {value!r}")


def _coerce_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise PhfError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise PhfError(f"{key}: expected a number, got {value!r}")


def _coerce_str(key: str, value: Any) -> str:
    """A string; a number is taken as its text (YAML reads `name: 3` as an int), a bool is not."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise PhfError(f"{key}: expected a string, got {value!r}")


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PhfError(f"unknown config key {prefix}{unknown[0]!s}; {prefix.rstrip('.') or 'the top level'} "
                       f"accepts: {_field_names(cls)}")
    kwargs = {name: _coerce(f"{prefix}{name}", value, hints[name]) for name, value in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_dict(path: str | Path) -> dict:
    """Read a YAML config as a dict, resolving a top-level `base:` file first."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PhfError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise PhfError(f"{path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise PhfError(f"{path} must hold a mapping of config sections, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(read_yaml_dict(path.parent / str(base)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise PhfError(f"--set expects key=value (for example train.lr=3e-4), got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if value is None and raw.strip().lower() not in ("null", "none", "~"):
        value = raw
    if raw.strip().lower() == "none":
        value = None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PhfError(f"--set {text}: {part} is not a config section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or the defaults), apply dotted overrides, and validate it."""
    return config_from_dict(read_yaml_dict(path) if path else {}, overrides)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from the mapping a YAML file holds, with dotted overrides applied, validated."""
    return from_dict(RunConfig, apply_overrides(data, overrides or [])).validate()


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field of a config dataclass: the string literal written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def documented_yaml(cfg: RunConfig) -> str:
    """The config as YAML that `load_config` reads back, each field preceded by its documentation."""
    lines: list[str] = []
    top_docs = field_docs(RunConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            lines += [f"# {line}" for line in textwrap.wrap(top_docs.get(f.name, ""), 110)]
            lines.append(f"{f.name}: {_yaml_value(value)}")
            continue
        lines.append(f"{f.name}:")
        docs = field_docs(type(value))
        for sub in dataclasses.fields(value):
            lines += [f"  # {line}" for line in textwrap.wrap(docs.get(sub.name, ""), 108)]
            lines.append(f"  {sub.name}: {_yaml_value(getattr(value, sub.name))}")
    return "\n".join(lines) + "\n"
