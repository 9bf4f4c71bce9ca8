"""The run's tokenizer: a byte-level BPE trained on the training split, or a tokenizer the user brings.

phf trains a byte-level BPE with the control tokens as special tokens unless the run names a tokenizer of its own
(`tokenizer.path`) or starts from a model folder (`--init-from`), whose tokenizer it then uses. A brought tokenizer
is extended, never changed: the control tokens (when the objective writes them) and, for a tokenizer without one, an
end-of-document token are appended as special tokens after its last id, so every existing token keeps its id. Each
tokenizer is saved under `<data dir>/tokenizer/<key>/tokenizer.json` with a sidecar `tokenizer.meta.json` naming
its special tokens; token streams are keyed on that folder, so models with different tokenizers share one data
folder and its scored corpus. `transformers.AutoTokenizer.from_pretrained` loads it inside a model folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from phf.core.config import TokenizerConfig
from phf.core.errors import PhfError, first_line
from phf.core.io import atomic_path, read_json, stable_hash, write_json
from phf.core.tokens import CONTROL_TOKENS, EOS, HIDDEN, SPECIAL_TOKENS

log = logging.getLogger(__name__)
HF_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the name of its end-of-document token, which phf reads from the tokenizer's own
    files rather than assuming GPT-2's `<|endoftext|>`. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Tokenizer, eos: str = EOS):
        self.tokenizer, self.eos = tokenizer, eos

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos)

    def special_ids(self) -> list[int]:
        """Ids of the end-of-document token, the control tokens and `<|hidden|>` that the tokenizer has: tokens a
        model is given, never scored on."""
        ids = [self.tokenizer.token_to_id(t) for t in (self.eos, *CONTROL_TOKENS, HIDDEN)]
        return [i for i in ids if i is not None]

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, length: int | None = None) -> TextTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return TextTokenizer(tok)


def save_tokenizer(tok: Tokenizer | TextTokenizer, path: Path, meta: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    if meta is not None:
        write_json(path.with_suffix(".meta.json"), meta)


def special_tokens(path: str | Path) -> dict[str, str]:
    """The Hugging Face special tokens (bos, eos, unk, pad) of the tokenizer at `path` (a tokenizer.json or its
    folder): from phf's sidecar `tokenizer.meta.json`, else the folder's `tokenizer_config.json`; a phf BPE names
    `<|endoftext|>` for all four."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    sidecar = file.with_suffix(".meta.json")
    named = read_json(sidecar).get("special_tokens") if sidecar.exists() else None
    if named:
        return dict(named)
    config = file.parent / "tokenizer_config.json"
    if config.exists():
        given = json.loads(config.read_text())
        named = {k: _token_text(given.get(k)) for k in HF_SPECIALS}
        if named["eos_token"]:
            return {k: v for k, v in named.items() if v}
    return {k: EOS for k in HF_SPECIALS}


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(path: str | Path, control: bool = False) -> TextTokenizer:
    """The tokenizer at `path` (a tokenizer.json or its folder); with `control`, it must have the control tokens."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise PhfError(f"cannot load tokenizer {path} ({exc}); create it with `phf tokenizer`") from None
    eos = special_tokens(path)["eos_token"]
    missing = [t for t in (eos, *(CONTROL_TOKENS if control else ())) if tok.token_to_id(t) is None]
    if missing:
        raise PhfError(f"tokenizer {path} lacks the special tokens {missing}; retrain it with `phf tokenizer`")
    return TextTokenizer(tok, eos)


def tokenizer_for(scored, cfg: TokenizerConfig, data_dir: Path, progress: bool = True) -> tuple[TextTokenizer, Path]:
    """Train (or reuse) the tokenizer of a scored corpus' training split."""
    path = bpe_path(scored, cfg, data_dir)
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


def bpe_path(scored, cfg: TokenizerConfig, data_dir: Path) -> Path:
    """Where the BPE of this scored corpus and these settings is (or will be) saved."""
    settings = {k: v for k, v in cfg.__dict__.items() if k != "path"}  # keys of BPEs saved before `path` existed
    key = stable_hash({"scored": str(Path(scored.path).name), "cfg": settings, "special": SPECIAL_TOKENS})
    return Path(data_dir) / "tokenizer" / f"{key}" / "tokenizer.json"


# -- a tokenizer the user brings --------------------------------------------------------------------------------
def brought_tokenizer(source: str | Path, data_dir: Path, control: bool) -> tuple[TextTokenizer, Path]:
    """The tokenizer of a model folder (or a tokenizer folder or tokenizer.json file), extended for phf: with the
    control tokens when `control`, with an end-of-document token if it has none. Saved in the data folder under a
    key of its content, reused when present."""
    hf = _load_hf_tokenizer(Path(source))
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: the loaded one stays as it was
    tok.no_padding()  # a saved tokenizer.json may pad or truncate every encoding; phf's streams need neither
    tok.no_truncation()
    specials = {k: _token_text(getattr(hf, k)) for k in HF_SPECIALS}
    specials = {k: str(v) for k, v in specials.items() if v}
    added = []
    if not specials.get("eos_token"):
        specials["eos_token"] = EOS
        if tok.token_to_id(EOS) is None:
            added.append(EOS)
        log.warning("tokenizer %s has no end-of-document (eos) token; phf adds %s as one", source, EOS)
    if control:
        added += [t for t in CONTROL_TOKENS if tok.token_to_id(t) is None]
    if added:
        before = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        log.info("added %s to the tokenizer of %s as ids %s", added, source,
                 [tok.token_to_id(t) for t in added])
        if min(tok.token_to_id(t) for t in added) < before:  # never renumber a token the model knows
            raise PhfError(f"tokenizer {source} would give a new token an existing id; report this tokenizer")
    specials.setdefault("pad_token", specials["eos_token"])
    key = stable_hash({"tokenizer": tok.to_str(), "special_tokens": specials})
    path = Path(data_dir) / "tokenizer" / f"brought-{key}" / "tokenizer.json"
    if not (path.exists() and path.with_suffix(".meta.json").exists()):
        save_tokenizer(tok, path, {"vocab_size": tok.get_vocab_size(), "source": str(source),
                                   "special_tokens": specials, "added": added})
    return TextTokenizer(tok, specials["eos_token"]), path


def with_hidden_token(tok: TextTokenizer, path: Path) -> tuple[TextTokenizer, Path]:
    """The run tokenizer at `path` with `<|hidden|>` appended as a special token after its last id (masking-hidden
    writes it in place of flagged tokens), saved beside it in `<folder>-hidden/` with the same special tokens; the
    tokenizer itself when it already has the token (a resumed run's)."""
    if tok.token_to_id(HIDDEN) is not None:
        return tok, path
    out = path.parent.with_name(f"{path.parent.name}-hidden") / "tokenizer.json"
    if out.exists() and out.with_suffix(".meta.json").exists():
        return load_tokenizer(out), out
    extended = Tokenizer.from_str(tok.to_str())
    extended.add_special_tokens([AddedToken(HIDDEN, special=True, normalized=False)])
    meta = read_json(path.with_suffix(".meta.json")) if path.with_suffix(".meta.json").exists() else {}
    meta = dict(meta, vocab_size=extended.get_vocab_size(), special_tokens=special_tokens(path),
                added=[*meta.get("added", []), HIDDEN], extends=str(path))
    save_tokenizer(extended, out, meta)
    log.info("appended %s to the tokenizer %s as id %d", HIDDEN, path, extended.token_to_id(HIDDEN))
    return TextTokenizer(extended, tok.eos), out


def _load_hf_tokenizer(source: Path) -> PreTrainedTokenizerFast:
    if source.is_file():  # a bare tokenizer.json
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(source))
        except Exception as exc:
            raise PhfError(f"cannot load tokenizer {source} ({first_line(exc)}); give a tokenizer.json that "
                           f"`tokenizers` wrote, or a folder saved by `save_pretrained`") from None
    if not source.is_dir():
        raise PhfError(f"tokenizer folder {source} does not exist")
    if not any((source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                   "vocab.json")):
        raise PhfError(f"{source} has no tokenizer (tokenizer.json); save the model's tokenizer into it with "
                       f"`tokenizer.save_pretrained`")
    try:
        hf = AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise PhfError(f"cannot load the tokenizer in {source} ({first_line(exc)})") from None
    if not isinstance(hf, PreTrainedTokenizerFast):
        raise PhfError(f"the tokenizer in {source} is a slow (Python) tokenizer; phf needs a fast one: save it "
                       f"with tokenizer.json (`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained`)")
    return hf


def of_transformers(hf) -> TextTokenizer:
    """The `tokenizers.Tokenizer` inside a `transformers` fast tokenizer, with its eos token."""
    return TextTokenizer(hf.backend_tokenizer, _token_text(hf.eos_token) or EOS)

