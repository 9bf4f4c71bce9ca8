"""Finetuning with feedback: start a training run from an existing Hugging Face model folder.

The run's token streams are written with the run's tokenizer, so the model must share it: a folder written by
phf from the same data folder does; a folder with a different vocabulary is refused with an explanation rather
than silently misreading token ids. phf's tokenizers always contain the control tokens, but a model trained
without them (MLE, filtering, ...) has never seen them in its input. When such a model is finetuned with an
objective that uses them (conditional training), their embeddings are set to the mean embedding of the other
tokens plus small noise (std 1% of the embeddings' std), as the paper did: a neutral start that the finetune
moves apart.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from phf.core.errors import PhfError
from phf.core.tokens import CONTROL_TOKENS
from phf.data.tokenizer import load_tokenizer
from phf.model.lm import check_model_folder, load_meta, load_model

log = logging.getLogger(__name__)


def resolve_model_folder(path: str | Path) -> Path:
    """A run folder (its checkpoint/) or a model folder."""
    path = Path(path)
    if (path / "checkpoint" / "config.json").exists():
        return path / "checkpoint"
    return path


def init_from_checkpoint(path: str | Path, tokenizer_file: str | Path, device: torch.device,
                         objective=None, seed: int = 0) -> torch.nn.Module:
    folder = check_model_folder(resolve_model_folder(path))
    run_vocab = load_tokenizer(tokenizer_file).get_vocab()
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        raise PhfError(f"{folder} has no tokenizer.json; phf can only continue from a model whose tokenizer it knows")
    model_vocab = load_tokenizer(tok_file).get_vocab()
    if model_vocab != run_vocab:
        raise PhfError(f"{folder} uses a different tokenizer ({len(model_vocab)} tokens) than this run "
                       f"({len(run_vocab)} tokens, {tokenizer_file}); continue from a model trained on the same "
                       f"data folder (--data-dir), with the same tokenizer settings")
    model = load_model(folder).to(device)
    if objective is not None and uses_control_tokens(objective.describe()) and \
            not uses_control_tokens(load_meta(folder).get("objective", {})):
        init_control_embeddings(model, [run_vocab[t] for t in CONTROL_TOKENS], seed)
    return model


def uses_control_tokens(objective: dict) -> bool:
    """Whether a model trained (or to be trained) with this objective reads control tokens."""
    return bool(objective.get("line_prefix") or objective.get("sampling_prefix"))


@torch.no_grad()
def init_control_embeddings(model: torch.nn.Module, ids: list[int], seed: int = 0, noise: float = 0.01) -> None:
    """Set the input embeddings of `ids` to the mean of the other tokens' embeddings plus Gaussian noise."""
    emb = model.get_input_embeddings().weight  # (V, D); tied to the output layer in phf's models
    others = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    others[ids] = False
    mean, std = emb[others].mean(0), emb[others].std()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for i in ids:
        emb[i] = mean + noise * std * torch.randn(emb.shape[1], generator=gen).to(emb.device, emb.dtype)
    log.info("control token embeddings (ids %s) set to the mean embedding plus noise", ids)
