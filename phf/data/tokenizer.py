"""Byte-level BPE trained on the training split, with the control tokens as special tokens.

Saved as a `tokenizer.json` that `tokenizers.Tokenizer.from_file` and (inside a model folder)
`transformers.AutoTokenizer.from_pretrained` load.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from phf.core.config import TokenizerConfig
from phf.core.errors import PhfError
from phf.core.io import atomic_path, read_json, stable_hash, write_json
from phf.core.tokens import SPECIAL_TOKENS

log = logging.getLogger(__name__)

def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, length: int | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path, meta: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    if meta is not None:
        write_json(path.with_suffix(".meta.json"), meta)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise PhfError(f"cannot load tokenizer {path} ({exc}); create it with `phf tokenizer`") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise PhfError(f"tokenizer {path} lacks the special tokens {missing}; retrain it with `phf tokenizer`")
    return tok


def tokenizer_for(scored, cfg: TokenizerConfig, data_dir: Path, progress: bool = True) -> tuple[Tokenizer, Path]:
    """Train (or reuse) the tokenizer of a scored corpus' training split."""
    key = stable_hash({"scored": str(Path(scored.path).name), "cfg": cfg.__dict__, "special": SPECIAL_TOKENS})
    path = Path(data_dir) / "tokenizer" / f"{key}" / "tokenizer.json"
    if path.exists() and path.with_suffix(".meta.json").exists():
        log.info("reusing tokenizer %s", path)
        return load_tokenizer(path), path

    def texts() -> Iterator[str]:
        for doc in scored.documents("train"):
            yield doc.text

    tok = train_tokenizer(texts(), cfg)
    save_tokenizer(tok, path, {"vocab_size": tok.get_vocab_size(), "config": cfg.__dict__,
                               "scored_corpus": str(scored.path)})
    return tok, path


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def read_meta(path: Path) -> dict:
    return read_json(Path(path).with_suffix(".meta.json"))
