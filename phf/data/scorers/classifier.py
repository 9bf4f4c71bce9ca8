"""`hf-classifier:PATH[:LABEL]`: any local `AutoModelForSequenceClassification` folder as a scorer or a judge.

The paper scored toxicity with a transformer classifier (Detoxify); later pretraining-data work (Safety
Pretraining, Deep Ignorance, NeMo Curator) scores with batched classifiers on GPUs. This scorer runs one such
model, saved with `save_pretrained` (config.json, its weights and its tokenizer), over a document's segments
(`scoring.segmenter`, default sentences) on `scoring.device` (default cpu), in batches of segments sorted by
length so that little padding is computed.

A segment's score is the probability of LABEL: a name of the config's `id2label` or an index. Without LABEL the
classifier must be binary and the score is the probability of its label 1, the positive class by the convention
of binary classifiers (`LABEL_1`, or `toxic` in `{0: "non-toxic", 1: "toxic"}`): name the label when yours is
ordered the other way. Probabilities are the softmax of the logits, or the sigmoid of LABEL's logit for a
multi-label classifier (`problem_type: multi_label_classification`). A sample's score is its worst segment's
(`aggregate = max`, as toxicity's), unless `scoring.aggregate` says otherwise.

A segment is cut to its first `max_chars` characters before it is tokenized (a generated file as one line would
otherwise cost a tokenizer pass over all of it), then to the model's maximum length in tokens.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from phf.core.errors import PhfError, first_line
from phf.core.io import file_sha256
from phf.data.scorers.base import Scorer

PREFIX = "hf-classifier"
MAX_CHARS = 2000  # characters of a segment the classifier reads: several sentences, more than most models' 512 tokens


def parse_spec(spec: str) -> tuple[Path, str]:
    """`hf-classifier:PATH[:LABEL]` -> (folder, label or ""). A folder whose own name holds a colon is read whole."""
    rest = spec[len(PREFIX) + 1:] if spec.startswith(PREFIX + ":") else ""
    if not rest:
        raise PhfError(f"scorer {spec!r}: give the classifier's folder, as {PREFIX}:PATH or {PREFIX}:PATH:LABEL")
    path, sep, label = rest.rpartition(":")
    if not sep or not path or Path(rest).expanduser().is_dir():
        return Path(rest).expanduser(), ""
    return Path(path).expanduser(), label


class HFClassifierScorer(Scorer):
    """P(LABEL) of a local sequence classifier, per segment, batched."""

    segmenter = "sentences"
    aggregate = "max"

    def __init__(self, spec: str, device: str = "", segmenter: str = "", batch_size: int = 64,
                 max_chars: int = MAX_CHARS):
        self.name = spec
        self.folder, label = parse_spec(spec)
        self.segmenter = segmenter or self.segmenter
        self.batch_size, self.max_chars = batch_size, max_chars
        config = _classifier_config(self.folder, spec)
        self.label_index, self.label = resolve_label(config, label, spec)
        self.multi_label = config.problem_type == "multi_label_classification"
        self.device = torch.device(device or "cpu")
        if self.device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") == "1":
            # a scoring worker (phf.data.scoring) asks for one thread: one process per core, and a forked child
            # must not enter the OpenMP pool of a parent that used it (it would wait on it forever)
            torch.set_num_threads(1)
        self.model, self.tokenizer = _load(self.folder, spec, self.device)
        self.max_length = _max_length(self.tokenizer, config)

    @functools.cached_property
    def version(self) -> str:
        """Hashed on first use only: the driver keys the scored corpus with it, scoring workers never ask."""
        return f"{_weights_identity(self.folder)}, transformers {dist_version('transformers')}"

    def settings(self) -> dict:
        return {"label": self.label, "label_index": self.label_index, "multi_label": self.multi_label,
                "segmenter": self.segmenter, "max_chars": self.max_chars, "max_length": self.max_length}

    def span_label(self, score: float) -> str:
        return f"{self.label}, p={score:.2f}"

    def score_segments(self, segments: Sequence[str]) -> list[float]:
        """P(label) per segment. Segments are batched in order of length (less padding); scores come back in the
        order given."""
        order = sorted(range(len(segments)), key=lambda i: len(segments[i]))
        scores = [0.0] * len(segments)
        for i in range(0, len(order), self.batch_size):
            batch = order[i:i + self.batch_size]
            for j, p in zip(batch, self._probabilities([segments[j][:self.max_chars] for j in batch])):
                scores[j] = p
        return scores

    def _probabilities(self, texts: list[str]) -> list[float]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        if self.multi_label:
            return torch.sigmoid(logits[:, self.label_index]).tolist()
        return torch.softmax(logits, dim=-1)[:, self.label_index].tolist()


def _classifier_config(folder: Path, spec: str):
    """The folder's config, refused unless it is a sequence classifier's with two or more labels."""
    if not folder.is_dir():
        raise PhfError(f"scorer {spec!r}: {folder} is not a folder; give a classifier saved with save_pretrained")
    if not (folder / "config.json").exists():
        raise PhfError(f"scorer {spec!r}: {folder} has no config.json, so it is no saved transformers model; give "
                       f"the folder `save_pretrained` wrote")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise PhfError(f"scorer {spec!r}: cannot read {folder / 'config.json'}: {first_line(exc)}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        held = ", ".join(architectures) or "a model that names no architecture"
        raise PhfError(f"scorer {spec!r}: {folder} holds {held}, not a sequence classifier; give a folder saved from "
                       f"an AutoModelForSequenceClassification (its config's architectures end in "
                       f"ForSequenceClassification)")
    if config.num_labels < 2:
        raise PhfError(f"scorer {spec!r}: {folder} has a single output (a regression head), not label "
                       f"probabilities; give a classifier with two or more labels, or wrap it as module:callable")
    return config


def resolve_label(config, label: str, spec: str) -> tuple[int, str]:
    """(index, name) of the label to score: a name of `id2label`, an index, or for a binary classifier label 1."""
    names = {int(i): str(n) for i, n in config.id2label.items()}
    listed = ", ".join(f"{i}={n}" for i, n in sorted(names.items()))
    if not label:
        if len(names) != 2:
            raise PhfError(f"scorer {spec!r}: the classifier has {len(names)} labels ({listed}); name the one to "
                           f"score: {PREFIX}:PATH:LABEL")
        return 1, names[1]
    by_name = [i for i, n in names.items() if n == label]
    if by_name:
        return by_name[0], label
    if label.isdigit() and int(label) in names:
        return int(label), names[int(label)]
    raise PhfError(f"scorer {spec!r}: the classifier has no label {label!r}; its labels are {listed} (give a name "
                   f"or an index)")


def _load(folder: Path, spec: str, device):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise PhfError(f"scorer {spec!r}: {folder} has no usable tokenizer ({first_line(exc)}); save the "
                       f"classifier's tokenizer into the folder with tokenizer.save_pretrained") from None
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                                         output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PhfError(f"scorer {spec!r}: cannot load the classifier in {folder}: {first_line(exc)}") from None
    if info.get("missing_keys"):
        raise PhfError(f"scorer {spec!r}: {folder}'s weights lack {len(info['missing_keys'])} of the classifier's "
                       f"tensors (e.g. {sorted(info['missing_keys'])[0]}): they would score at random; give a "
                       f"trained classifier's folder")
    if tokenizer.pad_token is None:  # GPT-2-style classifiers: padding is masked, any id does
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _max_length(tokenizer, config) -> int:
    """The tokens the model reads: the tokenizer's limit, else the model's positions (512 if it names neither)."""
    limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def _weights_identity(folder: Path) -> str:
    """`weights <sha256 prefix>` over the folder's files (config, weights, tokenizer): retraining or replacing the
    classifier rescores the corpus, moving its folder does not."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return "weights " + h.hexdigest()[:16]
