"""Start a training run from an existing Hugging Face model folder: phf's own, or any causal LM the user brings.

The run's token streams are written with the run's tokenizer: the model folder's own tokenizer, extended by
phf.data.tokenizer.brought_tokenizer with the tokens the run needs that it lacks (the control tokens, an
end-of-document token), appended after its last id. So every token the model knows keeps its id, and only the
appended tokens need new embedding rows. Those rows, and the control tokens of a phf model trained without them
(MLE, filtering, ...: it has the tokens but never read them), start at the mean of the other rows plus small noise
(std 1% of the rows' std), as the paper did when it added control tokens to a pretrained GPT-2: a neutral start that
the finetune moves apart. The input embeddings and, when the model does not tie them, the output layer get this.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer

from phf.core.errors import PhfError, first_line
from phf.core.run_folder import checkpoint_dir
from phf.core.tokens import CONTROL_TOKENS
from phf.data.tokenizer import TextTokenizer, load_tokenizer
from phf.model.lm import check_model_folder, load_meta, load_model

log = logging.getLogger(__name__)


def resolve_model_folder(path: str | Path) -> Path:
    """A run folder (its checkpoint/) or a model folder."""
    path = Path(path)
    if (checkpoint_dir(path) / "config.json").exists():
        return checkpoint_dir(path)
    return path


def model_source(name: str | Path, allow_download: bool = False) -> Path:
    """The local folder of a model: `name` itself (a run or model folder), or a Hugging Face hub id found in the
    local cache, or downloaded when the user allows it (`--allow-download`, or HF_HUB_OFFLINE=0)."""
    path = Path(name)
    if path.exists():
        return resolve_model_folder(path)
    text = str(name)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise PhfError(f"model folder {name} does not exist")
    allowed = allow_download or os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False")
    try:
        return Path(snapshot_download(text, local_files_only=not allowed,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:
        if allowed:
            raise PhfError(f"could not download {text} from the Hugging Face hub ({first_line(exc)})") \
                from None
        raise PhfError(f"model folder {name} does not exist, and hub id {text} is not in the local cache; give a "
                       f"local folder, or allow the download with --allow-download") from None


def init_from_checkpoint(path: str | Path, tokenizer_file: str | Path, device: torch.device,
                         objective=None, seed: int = 0) -> torch.nn.Module:
    """The model in `path`, its embeddings fitted to the run's tokenizer (`tokenizer_file`)."""
    folder = check_model_folder(resolve_model_folder(path))
    tok = load_tokenizer(tokenizer_file)
    fresh = new_token_ids(folder, tok, tokenizer_file)
    model = load_model(folder, device=device)
    rows = model.get_input_embeddings().weight.shape[0]
    if tok.get_vocab_size() > rows:
        model.resize_token_embeddings(tok.get_vocab_size(), mean_resizing=False)
        log.info("embeddings of %s resized from %d to %d rows for the run's tokenizer", folder, rows,
                 tok.get_vocab_size())
    if objective is not None and uses_control_tokens(objective.describe()) and \
            not uses_control_tokens(load_meta(folder).get("objective", {})):
        fresh |= {tok.token_to_id(t) for t in CONTROL_TOKENS}  # tokens the model has but never read
    if fresh:
        init_new_embeddings(model, sorted(fresh), seed)
    model.config.eos_token_id = tok.eos_id
    for key in ("bos_token_id", "pad_token_id"):  # absent, or an id the tokenizer does not have: the eos
        if not isinstance(getattr(model.config, key, None), int) or getattr(model.config, key) >= len(tok.get_vocab()):
            setattr(model.config, key, tok.eos_id)
    return model


def new_token_ids(folder: Path, tok: TextTokenizer, tokenizer_file: str | Path) -> set[int]:
    """Ids of the run tokenizer's tokens that the model's own tokenizer lacks; refuses a run tokenizer that gives
    any of the model's tokens another id."""
    if not (folder / "tokenizer.json").exists():
        raise PhfError(f"{folder} has no tokenizer.json; phf continues only from a model whose tokenizer it can "
                       f"read: save one into the folder with `tokenizer.save_pretrained` (a fast tokenizer)")
    try:
        model_vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    except Exception as exc:
        raise PhfError(f"cannot load the tokenizer of {folder} ({first_line(exc)})") from None
    run_vocab = tok.get_vocab()
    moved = [t for t, i in model_vocab.items() if run_vocab.get(t) != i]
    if moved:
        raise PhfError(f"{folder} uses a different tokenizer ({len(model_vocab)} tokens) than this run "
                       f"({len(run_vocab)} tokens, {tokenizer_file}): {len(moved)} of its tokens have other ids "
                       f"(e.g. {moved[0]!r}); continue from a model trained on the same data folder (--data-dir), "
                       f"with the same tokenizer settings")
    return {i for t, i in run_vocab.items() if t not in model_vocab}


def uses_control_tokens(objective: dict) -> bool:
    """Whether a model trained (or to be trained) with this objective reads control tokens."""
    return bool(objective.get("line_prefix") or objective.get("sampling_prefix"))


@torch.no_grad()
def init_new_embeddings(model: torch.nn.Module, ids: list[int], seed: int = 0, noise: float = 0.01) -> None:
    """Set the rows `ids` of the input embeddings, and of the output layer when it has its own weights, to the mean
    of the other rows plus Gaussian noise (std `noise` times the rows' std)."""
    inputs = model.get_input_embeddings().weight  # (V, D)
    output = model.get_output_embeddings()
    matrices = [inputs] + ([output.weight] if output is not None and output.weight is not inputs else [])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for weight in matrices:
        others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        others[ids] = False
        mean, std = weight[others].mean(0), weight[others].std()
        for i in ids:
            weight[i] = mean + noise * std * torch.randn(weight.shape[1], generator=gen).to(weight.device,
                                                                                           weight.dtype)
    log.info("embeddings of token ids %s set to the mean embedding plus noise", ids)
