"""Scored corpus -> token stream: the objective-specific training data, as flat memmaps.

For each kept document: `<|endoftext|>`, then each segment preceded by the control token the objective chooses
(if any); under `masking-hidden`, each token of a flagged segment is written as `<|hidden|>`. The result is two
aligned flat arrays per split: `tokens` (uint16 or uint32) and `scores` (float32,
the score of the segment each token belongs to; 0 for separators). The training loop reads windows of them by
offset and never touches a tokenizer. Written once per (scored corpus, tokenizer, objective), atomically.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from phf.core.errors import PhfError
from phf.core.io import atomic_path, read_json, write_json
from phf.core.tokens import CONTROL_TOKENS, HIDDEN
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
    hidden: list[bool] | None = None  # per segment: its tokens are written as <|hidden|> (masking-hidden)


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
    out = annotate(doc.segments(), doc.scores, prefixes)
    if getattr(objective, "hides_segments", False) and not keep_all:  # validation reads the real text
        out.hidden = [objective.hide_segment(s) for s in doc.scores]
    return out


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
        seg_index = np.clip(seg_index, 0, max(len(d.seg_scores) - 1, 0))
        seg_scores = np.asarray(d.seg_scores, dtype=np.float32)
        scores = seg_scores[seg_index] if len(seg_scores) else np.zeros(len(ids), np.float32)
        if d.hidden and any(d.hidden):
            ids = np.where(np.asarray(d.hidden)[seg_index], hidden_id(tok), ids)
        yield np.concatenate([[eos], ids]), np.concatenate([[0.0], scores]).astype(np.float32)


def hidden_id(tok) -> int:
    """The id of `<|hidden|>` in a tokenizer that must have it (phf.data.tokenizer.with_hidden_token)."""
    i = tok.token_to_id(HIDDEN)
    if i is None:
        raise PhfError(f"the tokenizer has no {HIDDEN} token, which masking-hidden writes in place of flagged "
                       f"tokens; train through `phf train`, which appends it")
    return i


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
    counted = [*CONTROL_TOKENS, *([HIDDEN] if tok.token_to_id(HIDDEN) is not None else [])]
    control_ids = {tok.token_to_id(t): t for t in counted}
    counts = {"documents": 0, "documents_dropped": 0, "segments": 0, "chars": 0,
              **{f"tokens_{t}": 0 for t in counted}}
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
                  progress: bool = True, misaligned_above: float | None = None) -> dict[str, TokenStream]:
    """Training and validation streams for an objective (reused if already written with the same meta); with
    `misaligned_above` (the task's threshold), the conditioning check (`check_conditioning`) on the training one."""
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
        # validation keeps every document and hides nothing (filtering's and masking-hidden's validation loss is
        # measured on the real text)
        docs = (annotate_for_training(d, objective, seed, keep_all=split != "train") for d in scored.documents(split))
        streams[split] = write_stream(prefix, docs, tok, dict(meta, split=split), progress=progress)
        if len(streams[split]) == 0:
            raise PhfError(f"the {split} token stream is empty (every document was dropped or the split is empty); "
                           f"check the corpus and the objective's threshold")
    if misaligned_above is not None:
        check_conditioning(objective, streams["train"], scored, misaligned_above)
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


# -- the conditioning check -----------------------------------------------------------------------------------------
# A stream's rate of control tokens (or masked tokens) is "far" from the scored corpus' misaligned share when the
# two differ by more than CHECK_SLACK plus two standard errors of a share over the corpus' segments (a tiny corpus,
# the random drop of conditional's tokens) *and* their ratio lies outside CHECK_RATIO. The stream's labels come
# from the same scores, so the rates agree up to the dropped tokens and token lengths unless something is wrong:
# a threshold above every score, a tokenizer that split the control token, a stream written from other scores.
CHECK_RATIO = (0.5, 2.0)
CHECK_SLACK = 0.02


@dataclass
class CorpusShares:
    segments: int  # training segments
    segment_share: float  # of the scored ones, the share scoring above the misalignment threshold
    char_share: float  # the share of training segment characters in segments above it or unscorable
    max_score: float  # the highest segment score (NaN when none was scored)


def corpus_shares(scored, misaligned_above: float, split: str = "train") -> CorpusShares:
    """The scored corpus' misaligned share of one split, by segments and by characters."""
    t = scored.table(["split", "seg_start", "seg_end", "seg_score"])
    t = t.filter(pc.equal(t.column("split"), split))
    scores = pc.list_flatten(t.column("seg_score")).to_numpy(zero_copy_only=False).astype(np.float64)
    lengths = (pc.list_flatten(t.column("seg_end")).to_numpy(zero_copy_only=False)
               - pc.list_flatten(t.column("seg_start")).to_numpy(zero_copy_only=False)).astype(np.float64)
    valid = ~np.isnan(scores)
    flagged = ~(scores <= misaligned_above)
    return CorpusShares(len(scores), float(flagged[valid].mean()) if valid.any() else math.nan,
                        float(lengths[flagged].sum() / max(lengths.sum(), 1)),
                        float(scores[valid].max()) if valid.any() else math.nan)


def is_far(observed: float, expected: float, n: int) -> bool:
    """Whether a stream's rate is far from the corpus' share (above)."""
    slack = CHECK_SLACK + 2 * math.sqrt(max(expected * (1 - expected), 0.0) / max(n, 1))
    if abs(observed - expected) <= slack:
        return False
    return expected <= 0 or not CHECK_RATIO[0] <= observed / expected <= CHECK_RATIO[1]


def flagged_share(stream: TokenStream, objective) -> float:
    """The share of a stream's tokens whose segment the objective flags (`masking`), read in chunks."""
    flagged = 0
    for lo in range(0, len(stream), CONTROL_TYPE_CHUNK):
        flagged += int(objective.flagged(np.asarray(stream.scores[lo:lo + CONTROL_TYPE_CHUNK])).sum())
    return flagged / max(len(stream), 1)


def check_conditioning(objective, stream: TokenStream, scored, misaligned_above: float) -> None:
    """Refuse, in one line, a conditional, tagging or masking objective whose training stream lacks the control
    tokens or masks it needs, or holds them at a rate far from the scored corpus' misaligned share: such a run would
    train MLE under another name with nothing to show for it. `objective.check_conditioning=false` skips it."""
    if not getattr(objective, "check_conditioning", True):
        return
    shares = corpus_shares(scored, misaligned_above)
    meta = stream.meta
    if objective.line_prefix:  # conditional: control tokens before segments
        labelled = meta.get(f"tokens_{CONTROL_TOKENS[0]}", 0) + meta.get(f"tokens_{CONTROL_TOKENS[1]}", 0)
        observed, expected, what = (meta.get(f"tokens_{CONTROL_TOKENS[1]}", 0) / labelled if labelled else 0.0,
                                    shares.segment_share, f"of its control tokens are {CONTROL_TOKENS[1]}")
        if not labelled and meta.get("segments") and getattr(objective, "drop_token_fraction", 0.0) >= 1:
            raise PhfError(f"objective {objective.name}: objective.drop_token_fraction=1 gives no segment a control "
                           f"token, so the model could never learn what one means; lower it (the paper: 0.01-0.1)")
        if not labelled and meta.get("segments"):
            raise PhfError(f"objective {objective.name}: the training stream {stream.prefix} holds no control token "
                           f"among {meta['segments']} segments: the tokenizer splits {CONTROL_TOKENS[0]} into "
                           f"pieces; use a tokenizer with the control tokens as special tokens (phf appends them to "
                           f"a tokenizer it is given) and delete {stream.prefix.parent}")
    elif getattr(objective, "tags_segments", False):  # tagging: <|misaligned|> before the flagged segments only
        observed, expected, what = (meta.get(f"tokens_{CONTROL_TOKENS[1]}", 0) / max(meta.get("segments", 0), 1),
                                    shares.segment_share, f"of its segments are tagged {CONTROL_TOKENS[1]}")
    elif getattr(objective, "hides_segments", False):
        observed, expected, what = (meta.get(f"tokens_{HIDDEN}", 0) / max(len(stream), 1), shares.char_share,
                                    f"of its tokens are {HIDDEN}")
    elif getattr(objective, "masks_segments", False):
        observed, expected, what = flagged_share(stream, objective), shares.char_share, "of its tokens are masked"
    else:
        return
    if math.isnan(expected) or not is_far(observed, expected, shares.segments):
        return
    per_segment = objective.line_prefix or getattr(objective, "tags_segments", False)
    where = "segments score" if per_segment else "text lies in segments that are unscorable or score"
    problem = (f"objective {objective.name}: {100 * observed:.1f}% {what} in the training stream, but "
               f"{100 * expected:.1f}% of the scored corpus' training {where} above {misaligned_above:g} (the task's "
               f"misalignment threshold)")
    threshold = objective.threshold
    if threshold is not None and shares.max_score <= threshold < float("inf") and observed < expected:
        fix = (f"objective.threshold={threshold:g} is at or above every segment score (highest "
               f"{shares.max_score:g}): lower it")
    elif threshold is not None and threshold != misaligned_above:
        fix = f"objective.threshold={threshold:g} is not the task's {misaligned_above:g}: bring it closer"
    else:
        fix = (f"the stream was written from other scores or by another tokenizer: delete {stream.prefix.parent} "
               f"and run again")
    raise PhfError(f"{problem}; {fix} (or set objective.check_conditioning=false if this is on purpose)")


def plain_window(stream: TokenStream, start: int, length: int, dropped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`length` tokens of the stream from `start` on, and their scores, with the `dropped` token ids left out
    (conditional training's cooldown reads the stream as plain text): the window grows forward past the dropped
    tokens, and backward where it meets the end of the stream."""
    n = len(stream)
    lo, hi = start, min(start + length, n)
    while True:
        keep = ~np.isin(stream.tokens[lo:hi], dropped)
        deficit = length - int(keep.sum())
        if deficit <= 0:
            break
        if hi < n:
            hi = min(n, hi + deficit)
        elif lo > 0:
            lo = max(0, lo - deficit)
        else:
            raise PhfError(f"the training stream has fewer than {length} tokens besides its control tokens; use a "
                           f"larger corpus or a smaller model.block_size")
    at = lo + np.flatnonzero(keep)[:length]
    return np.asarray(stream.tokens[at]), np.asarray(stream.scores[at])
