"""Scored corpus -> token stream: the objective-specific training data, as flat memmaps.

For each kept document: `<|endoftext|>`, then each segment preceded by the control token the objective chooses
(if any). The result is two aligned flat arrays per split: `tokens` (uint16 or uint32) and `scores` (float32,
the score of the segment each token belongs to; 0 for separators). The training loop reads windows of them by
offset and never touches a tokenizer. Written once per (scored corpus, tokenizer, objective), atomically.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from phf.core.errors import PhfError
from phf.core.io import atomic_path, read_json, write_json
from phf.core.tokens import CONTROL_TOKENS
from phf.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
ENCODE_BATCH = 128


@dataclass
class Annotated:
    """One document as the model sees it: the text with control tokens inserted, and the segment starts in it."""
    text: str
    seg_starts: list[int]
    seg_scores: list[float]
    kept: bool = True


def annotate(segments: list[str], scores: list[float], prefixes: list[str | None]) -> Annotated:
    pieces, starts, pos = [], [], 0
    for seg, prefix in zip(segments, prefixes):
        starts.append(pos)
        if prefix:
            pieces.append(prefix)
            pos += len(prefix)
        pieces.append(seg)
        pos += len(seg)
    return Annotated("".join(pieces), starts, list(scores))


def doc_rng(seed: int, doc_id: str) -> np.random.Generator:
    """Per-document randomness that does not depend on the order documents are read in."""
    return np.random.default_rng([seed, zlib.crc32(doc_id.encode("utf-8", "surrogatepass"))])


class Objective(Protocol):
    """What the token stream needs of a training objective (phf.training.objectives implements it): which
    documents it keeps and the control token, if any, before each segment."""
    line_prefix: str | None
    sampling_prefix: list[str]

    def keep_document(self, score: float) -> bool: ...

    def segment_prefix(self, score: float, rng: np.random.Generator) -> str | None: ...


def annotate_for_training(doc, objective: Objective, seed: int, keep_all: bool = False) -> Annotated:
    if not keep_all and not objective.keep_document(doc.score):
        return Annotated("", [], [], kept=False)
    rng = doc_rng(seed, doc.id)
    prefixes = [objective.segment_prefix(s, rng) for s in doc.scores]
    return annotate(doc.segments(), doc.scores, prefixes)


def annotate_for_deployment(segments: list[str], scores: list[float], objective: Objective) -> Annotated:
    """The text as the deployed model reads it: `line_prefix` (if any) before every segment."""
    return annotate(segments, scores, [objective.line_prefix] * len(segments))


def encode_annotated(tok: TextTokenizer, docs: list[Annotated]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids (with the tokenizer's end-of-document token first) and per-token segment scores of each annotated
    document."""
    eos = tok.eos_id
    encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    for d, enc in zip(docs, encodings):
        ids = np.asarray(enc.ids, dtype=np.int64)
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        seg_index = np.searchsorted(np.asarray(d.seg_starts, dtype=np.int64), starts, side="right") - 1
        seg_scores = np.asarray(d.seg_scores, dtype=np.float32)
        scores = seg_scores[np.clip(seg_index, 0, max(len(seg_scores) - 1, 0))] if len(seg_scores) else \
            np.zeros(len(ids), np.float32)
        yield np.concatenate([[eos], ids]), np.concatenate([[0.0], scores]).astype(np.float32)


class TokenStream:
    """A written token stream of one split: memmapped tokens and scores."""
    _types: np.ndarray | None = None  # control types, computed on first use (control_types)
    _types_key: tuple | None = None

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        meta_path = Path(f"{self.prefix}.json")
        if not meta_path.exists():
            raise PhfError(f"token stream {self.prefix} is missing; it is written by `phf train` before training")
        self.meta = read_json(meta_path)
        dtype = np.dtype(self.meta["dtype"])
        n = self.meta["num_tokens"]
        for suffix, size in ((".tokens.bin", n * dtype.itemsize), (".scores.bin", n * 4)):
            p = Path(f"{self.prefix}{suffix}")
            if not p.exists() or p.stat().st_size != size:
                raise PhfError(f"token stream file {p} is missing or truncated; delete {meta_path} and run again")
        if n == 0:  # numpy cannot map an empty file
            self.tokens, self.scores = np.zeros(0, dtype), np.zeros(0, np.float32)
            return
        self.tokens = np.memmap(f"{self.prefix}.tokens.bin", dtype=dtype, mode="r", shape=(n,))
        self.scores = np.memmap(f"{self.prefix}.scores.bin", dtype=np.float32, mode="r", shape=(n,))

    def __len__(self) -> int:
        return len(self.tokens)

    def control_types(self, markers: list[int]) -> np.ndarray:
        """Each token's control type (phf.model.conditioning), computed once per stream and kept in memory."""
        key = tuple(markers)
        if self._types_key != key:

            self._types, self._types_key = stream_types(self.tokens, markers), key
        return self._types


def write_stream(prefix: Path, annotated: Iterable[Annotated], tok: Tokenizer, meta: dict,
                 total: int | None = None, progress: bool = True) -> TokenStream:
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    control_ids = {tok.token_to_id(t): t for t in CONTROL_TOKENS}
    counts = {"documents": 0, "documents_dropped": 0, "segments": 0, "chars": 0,
              **{f"tokens_{t}": 0 for t in CONTROL_TOKENS}}
    n = 0
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(f"{prefix}.tokens.bin")) as tmp_tok, atomic_path(Path(f"{prefix}.scores.bin")) as tmp_sc:
        with open(tmp_tok, "wb") as ft, open(tmp_sc, "wb") as fs:
            batch: list[Annotated] = []

            def flush():
                nonlocal n
                for ids, scores in encode_annotated(tok, batch):
                    ft.write(ids.astype(dtype).tobytes())
                    fs.write(scores.tobytes())
                    n += len(ids)
                    for cid, name in control_ids.items():
                        counts[f"tokens_{name}"] += int((ids == cid).sum())
                batch.clear()

            for a in tqdm(annotated, total=total, desc=f"tokens {prefix.name}", unit="doc", disable=not progress,
                          leave=False):
                if not a.kept:
                    counts["documents_dropped"] += 1
                    continue
                counts["documents"] += 1
                counts["segments"] += len(a.seg_starts)
                counts["chars"] += len(a.text)
                batch.append(a)
                if len(batch) >= ENCODE_BATCH:
                    flush()
            flush()
    write_json(Path(f"{prefix}.json"), dict(meta, dtype=np.dtype(dtype).name, num_tokens=n, **counts))
    return TokenStream(prefix)


def build_streams(scored, tok: Tokenizer, objective: Objective, seed: int, out_dir: Path, meta: dict,
                  progress: bool = True) -> dict[str, TokenStream]:
    """Training and validation streams for an objective (reused if already written with the same meta)."""
    streams = {}
    for split in ("train", "validation"):
        prefix = Path(out_dir) / split
        meta_path = Path(f"{prefix}.json")
        if meta_path.exists():
            old = read_json(meta_path)
            if {k: old.get(k) for k in meta} == meta:
                try:
                    streams[split] = TokenStream(prefix)
                    continue
                except PhfError:
                    pass
        # validation keeps every document (filtering's validation loss is measured on the real distribution)
        docs = (annotate_for_training(d, objective, seed, keep_all=split != "train") for d in scored.documents(split))
        streams[split] = write_stream(prefix, docs, tok, dict(meta, split=split), progress=progress)
        if len(streams[split]) == 0:
            raise PhfError(f"the {split} token stream is empty (every document was dropped or the split is empty); "
                           f"check the corpus and the objective's threshold")
    for token in objective.sampling_prefix:  # the model is deployed conditioned on it: it must have seen it
        if not streams["train"].meta.get(f"tokens_{token}"):
            raise PhfError(f"objective {objective.name} with threshold {objective.threshold} labels no training "
                           f"segment {token}, so the model could never learn what it means; raise "
                           f"objective.threshold or check the scores (`phf score` prints a summary)")
    return streams


CONTROL_TYPE_CHUNK = 1 << 22  # stream tokens typed at a time (the index array is int64: 32 MB per chunk)


def stream_types(tokens: np.ndarray, markers: list[int]) -> np.ndarray:
    """`control_types` over a whole flat token stream (a memmap), in chunks; same dtype as the tokens."""
    out = np.empty(len(tokens), dtype=tokens.dtype)
    current = markers[0]
    for lo in range(0, len(tokens), CONTROL_TYPE_CHUNK):
        chunk = np.asarray(tokens[lo:lo + CONTROL_TYPE_CHUNK])
        is_marker = np.isin(chunk, markers)
        last = np.maximum.accumulate(np.where(is_marker, np.arange(len(chunk)), -1))
        typed = chunk[np.maximum(last, 0)]
        out[lo:lo + len(chunk)] = np.where(last >= 0, typed, current)
        current = out[lo + len(chunk) - 1] if len(chunk) else current
    return out
