"""The model: a GPT-2 architecture built from a config (no downloaded weights), saved as a Hugging Face folder.

A checkpoint folder holds `model.safetensors`, `config.json`, `generation_config.json`, the tokenizer
(`tokenizer.json` with the control tokens as special tokens) and `phf.json` (objective, step, tokens seen, how
to condition the model). Plain `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it.
A model trained with AWR also has `value_head.safetensors`: its value head, in a file of its own that
`transformers` never reads, so the folder stays a plain causal LM.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from phf.core.config import ModelConfig
from phf.core.errors import PhfError, first_line
from phf.core.io import replace_dir, write_json
from phf.core.runtime import default_device
from phf.core.tokens import CONTROL_TOKENS
from phf.data.tokenizer import load_tokenizer, special_tokens

log = logging.getLogger(__name__)
# no progress bars for loading and writing the weights of models this small: they would drown phf's own
hf_logging.disable_progress_bar()
PHF_META = "phf.json"
WEIGHTS = "model.safetensors"
VALUE_HEAD = "value_head.safetensors"


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """A new model of `cfg.arch` with `transformers`' own initialisation (the seed is set by the caller)."""
    config = AutoConfig.for_model(cfg.arch, **architecture_sizes(cfg), vocab_size=vocab_size, bos_token_id=eos_id,
                                  eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=cfg.tie_word_embeddings)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def architecture_sizes(cfg: ModelConfig) -> dict:
    """ModelConfig's sizes under each architecture's own config names."""
    if cfg.arch == "gpt2":
        return dict(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=cfg.intermediate_size or None, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                    attn_pdrop=cfg.dropout)
    common = dict(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  max_position_embeddings=cfg.block_size, attention_dropout=cfg.dropout)
    if cfg.arch == "llama":  # SwiGLU's three matrices at 8/3 the width hold as many weights as a 4x MLP's two
        width = cfg.intermediate_size or -(-8 * cfg.n_embd // 3 // 32) * 32
        return dict(common, intermediate_size=width, num_key_value_heads=cfg.n_kv_head or cfg.n_head)
    if cfg.arch == "gpt_neox":
        return dict(common, intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd, hidden_dropout=cfg.dropout)
    raise PhfError(f"model.arch {cfg.arch!r} is not one phf builds from scratch")


class ValueHead(torch.nn.Linear):
    """A linear value head: hidden state (..., n_embd) -> predicted reward (...). Starts at zero (weights and bias),
    so an untrained head predicts reward 0, the reward of aligned text."""

    def __init__(self, n_embd: int):
        super().__init__(n_embd, 1)
        torch.nn.init.zeros_(self.weight)
        torch.nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1)  # (..., C) -> (...)


def save_value_head(head: ValueHead, folder: str | Path) -> Path:
    """Write the head into a model folder (call it on save_checkpoint's temporary folder, via `extra`)."""

    path = Path(folder) / VALUE_HEAD
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata={"format": "pt", "n_embd": str(head.in_features)})
    return path


def load_value_head(folder: str | Path, n_embd: int) -> ValueHead | None:
    """The value head saved in a model folder, or None if the folder has none."""

    path = Path(folder) / VALUE_HEAD
    if not path.exists():
        return None
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise PhfError(f"value head {path} is damaged or truncated ({exc}); restore it from an earlier checkpoint "
                       f"or delete it to start a new head") from None
    if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (1, n_embd):
        raise PhfError(f"value head {path} does not fit a model of width {n_embd}; delete it to start a new head")
    head = ValueHead(n_embd)
    head.load_state_dict(state)
    return head


def hf_tokenizer(tokenizer_file: str | Path) -> PreTrainedTokenizerFast:
    """The run's tokenizer as `transformers` loads it from a checkpoint: its own special tokens (a phf BPE's
    `<|endoftext|>`, a brought tokenizer's as it named them) and the control tokens it has."""
    tok = load_tokenizer(tokenizer_file)
    controls = [t for t in CONTROL_TOKENS if tok.token_to_id(t) is not None]
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **special_tokens(tokenizer_file),
                                   additional_special_tokens=controls, clean_up_tokenization_spaces=False)


def save_checkpoint(model: torch.nn.Module, tokenizer_file: str | Path, out: str | Path, meta: dict,
                    extra=None) -> Path:
    """Write an HF model folder atomically: into a temporary folder, then renamed over `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = hf_tokenizer(tokenizer_file)
        model.generation_config = generation_config(model, tok, meta)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / PHF_META, meta)
        if extra is not None:
            extra(tmp)  # more files that must land together with the weights (trainer state)
        for f in tmp.iterdir():  # make the folder's content durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except Exception as exc:  # OSError, or a library's own error type wrapping one (safetensors)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise PhfError(f"could not write checkpoint {out} ({reason}); free disk space and resume with "
                       f"`phf train --resume {out.parent}`: the previous checkpoint, if any, was kept") from exc
    return out


def generation_config(model, tok: PreTrainedTokenizerFast, meta: dict) -> GenerationConfig:
    """generation_config.json as the model is deployed, as far as `transformers` can express it: sampling at the
    stored temperature, top-p and length, the banned control tokens never generated. It cannot express the
    control-token prefix (put it in the prompt), guidance, or control tokens standing outside the nucleus
    (phf.evaluation.sampling.sample_next); phf's own sampler applies all of them from phf.json."""
    sample = meta.get("sample") or {}
    banned = [[tok.convert_tokens_to_ids(t)] for t in meta.get("objective", {}).get("banned_tokens", [])]
    config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                              pad_token_id=model.config.pad_token_id, bad_words_ids=banned or None)
    if sample:
        config.update(do_sample=True, temperature=sample["temperature"], top_p=sample["top_p"], top_k=0,
                      max_new_tokens=sample["max_new_tokens"])
    return config


def check_model_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise PhfError(f"model folder {path} does not exist")
    if not (path / "config.json").exists():
        raise PhfError(f"{path} is not a Hugging Face model folder (no config.json)")
    weights = path / WEIGHTS
    if not weights.exists() and not list(path.glob("model-*.safetensors")):
        raise PhfError(f"{path} has no safetensors weights ({WEIGHTS}); phf loads weights only from safetensors")
    if weights.exists():
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise PhfError(f"weights file {weights} is damaged or truncated ({exc}); restore it from an earlier "
                           f"checkpoint or retrain") from None
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.nn.Module:
    """The model in a folder, in eval mode, on `device` (default: the GPU when there is one, else the CPU)."""
    path = check_model_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        model.to(device or default_device())
    except Exception as exc:
        raise PhfError(f"cannot load the model in {path} ({first_line(exc)}); phf loads causal LMs that transformers' "
                       f"AutoModelForCausalLM knows, without remote code") from None
    model.eval()
    return model


def load_meta(path: str | Path) -> dict:
    p = Path(path) / PHF_META
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def count_parameters(model: torch.nn.Module, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return n
