"""The log-likelihood engine: token streams -> windows of the context -> batched forwards -> the log-probability of
each scored target. Every log-likelihood the toolkit reports is computed here: held-out bits per character
(phf.evaluation.evaluate), the per-segment and per-text log-likelihoods of the probes and of the KL estimate
(`segment_logprobs`, `sequence_logprobs`), and the validation loss during training (phf.training.evaluator).

    windows   a stream is read in windows of `block` inputs (block + 1 tokens). `sliding_windows` advance by
              `stride` (half a context): a later window scores only the targets the previous one did not, so
              every target is scored once and has at least block - stride tokens of history. `windows_at` are
              windows at given starts, each scoring all its targets (the validation loss's fixed windows: the
              special case stride = block).
    types     a model with control embeddings (phf.model.conditioning) also reads each token's control type,
              computed over its whole stream (phf.data.token_stream.stream_types), not per window.
    given     token ids the model reads but is never scored on: control tokens and <|endoftext|>, so that models
              with and without control tokens compare fairly.
    batches   windows are batched and right-padded; a causal model's scored positions never see the padding.
    bf16      the forward autocast to bfloat16 where the caller asks; log-probabilities are taken in float32.
    guidance  a conditional model deployed with classifier-free guidance g also reads every window as its
              *negative* (each `<|aligned|>` read as `<|misaligned|>`), and the batch's logits become
              (1 + g) log p(. | window) - g log p(. | negative): log-probabilities taken from them are those of
              the normalised guided distribution, the one `phf sample` draws from (before its banned tokens).

Callers reduce the per-batch results their own way (`sum_logprobs`, `sum_cross_entropy`, `token_logprobs`), each
the summation the number it reports has always had, so that no reported figure changes in its last digit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from phf.data.token_stream import annotate, encode_annotated, stream_types
from phf.model.conditioning import markers_of, type_inputs
from phf.model.decoding import context_length

IGNORE = -100  # a target cross_entropy skips


@dataclass(frozen=True)
class Window:
    stream: int  # index of the stream it reads
    start: int  # the stream position of its first token
    first: int  # its first scored target, as a position within the window's targets (0: all of them)


def sliding_windows(lengths: Sequence[int], block: int, stride: int | None = None) -> list[Window]:
    """Windows over streams of the given lengths, advancing by `stride` (default half a context) until one reaches
    the end of its stream; every target (stream positions 1 ... n-1) is scored by exactly one window."""
    stride = stride or block // 2
    windows = []
    for i, n in enumerate(lengths):
        start = 0
        while True:
            windows.append(Window(i, start, 0 if start == 0 else block - stride))
            if start + block + 1 >= n:
                break
            start += stride
    return windows


def windows_at(starts: Sequence[int], stream: int = 0) -> list[Window]:
    """Windows of one stream at the given starts, each scoring all its targets."""
    return [Window(stream, int(s), 0) for s in starts]


@dataclass
class WindowBatch:
    windows: list[Window]
    logits: torch.Tensor  # (B, T, V) float32, on the model's device
    targets: torch.Tensor  # (B, T), on the model's device
    scored: torch.Tensor  # (B, T) bool, on the CPU: in its window's scored range, not padding, not a given token

    def token_logprobs(self) -> torch.Tensor:
        """log p(target) (B, T), float32, on the CPU."""
        return torch.log_softmax(self.logits, -1).gather(-1, self.targets[..., None]).squeeze(-1).cpu()

    def scored_logprob_sum(self, within: torch.Tensor | None = None) -> torch.Tensor:
        """The summed log p(target) (nats) of the scored targets, a float32 0-d tensor on the model's device. On
        the CPU the exact reduction `token_logprobs()[scored].sum()`; on a GPU a masked sum, which needs no
        host round trip (boolean indexing would wait for the device to count the selected elements). With
        `within` ((B, T) bool, on the CPU): two sums from one log-softmax, all scored targets and those within."""
        lp = torch.log_softmax(self.logits, -1).gather(-1, self.targets[..., None]).squeeze(-1)
        masks = [self.scored] if within is None else [self.scored, self.scored & within]
        if lp.device.type == "cpu":
            sums = [lp[m].sum() for m in masks]
        else:
            sums = [torch.where(m.to(lp.device, non_blocking=True), lp, 0.0).sum() for m in masks]
        return sums[0] if within is None else torch.stack(sums)

    def window_mask(self, per_stream: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, T) bool on the CPU: each window's slice of its stream's per-target mask (n-1 values per stream)."""
        out = np.zeros(tuple(self.scored.shape), dtype=bool)
        for j, w in enumerate(self.windows):
            part = per_stream[w.stream][w.start:w.start + out.shape[1]]
            out[j, :len(part)] = part
        return torch.from_numpy(out)

    def cross_entropy_sum(self) -> torch.Tensor:
        """The summed cross-entropy (nats) of the scored targets, a 0-d tensor on the model's device."""
        targets = torch.where(self.scored.to(self.targets.device), self.targets, IGNORE)
        return torch.nn.functional.cross_entropy(self.logits.flatten(0, 1), targets.flatten(), reduction="sum")


@dataclass(frozen=True)
class WindowReading:
    """How `window_batches` reads its windows: batching, which targets count, the forward's precision, guidance.
    The reductions (`sum_logprobs`, `sum_cross_entropy`, `token_logprobs`) take these fields as keywords."""
    block: int | None = None
    """Inputs per window (None: the model's context)."""
    given: Sequence[int] = ()
    """Token ids never scored (control tokens, <|endoftext|>)."""
    pad_id: int = 0
    """The right padding of a batch's shorter windows."""
    batch_size: int | None = None
    """Windows per forward (None: `batch_size_for` the model's device)."""
    attention_mask: bool = True
    """Pass an all-ones mask (held-out bits/char and the validation loss do; the probes' log-likelihoods pass
    none)."""
    bf16: bool = False
    """Autocast the forward to bfloat16 (log-probabilities are still taken in float32)."""
    progress: bool = False
    """Show a progress bar over the batches."""
    desc: str = "log-likelihoods"
    """The progress bar's label."""
    guidance: float = 0.0
    """Classifier-free guidance g > 0 (with `negative`): the guided distribution's logits (the module's notes)."""
    negative: dict[int, int] | None = None
    """With guidance, the token swap that makes each window's negative (<|aligned|> -> <|misaligned|>)."""


@torch.no_grad()
def window_batches(model, streams: Sequence[np.ndarray], windows: Sequence[Window],
                   reading: WindowReading = WindowReading(),
                   types: Sequence[np.ndarray] | None = None) -> Iterator[WindowBatch]:
    """The engine: the model's logits over `windows` of `streams` (token id arrays), read as `reading` says, a
    batch of windows at a time.

    `types`: each stream's control types, for a model with control embeddings (computed from the model's markers
    when not given). The model is evaluated in eval mode and left in the mode it was in."""
    block = reading.block or context_length(model)
    batch_size = reading.batch_size or batch_size_for(model, block + 1)
    markers = markers_of(model)  # a model with control embeddings reads each token's control type too
    if markers and types is None:
        types = [stream_types(s, markers) for s in streams]
    given = torch.tensor(list(reading.given), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(0, len(windows), batch_size), desc=reading.desc, leave=False,
                      disable=not reading.progress, unit="batch"):
            group = list(windows[b:b + batch_size])
            x, x_types, scored = _pack(group, streams, types if markers else None, block, reading.pad_id,
                                       markers[0] if markers else None)
            if len(given):
                scored &= ~torch.isin(x[:, 1:], given)
            logits = _forward(model, x[:, :-1], None if x_types is None else x_types[:, :-1], reading)
            yield WindowBatch(group, logits.float(), x[:, 1:].to(next(model.parameters()).device), scored)
    finally:
        model.train(was_training)


def _pack(group: list[Window], streams: Sequence[np.ndarray], types: Sequence[np.ndarray] | None, block: int,
          pad_id: int, pad_type: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A batch of windows as right-padded tokens (b, length), their control types (None without `types`;
    padded with `pad_type`) and which targets (b, length - 1) lie in each window's scored range."""
    length = max(min(block + 1, len(streams[w.stream]) - w.start) for w in group)
    x = torch.full((len(group), length), pad_id, dtype=torch.long)
    x_types = torch.full_like(x, pad_type) if types is not None else None
    scored = torch.zeros((len(group), length - 1), dtype=torch.bool)
    for j, w in enumerate(group):
        tokens = np.asarray(streams[w.stream][w.start:w.start + length], dtype=np.int64)
        x[j, :len(tokens)] = torch.from_numpy(tokens)
        if types is not None:
            x_types[j, :len(tokens)] = torch.from_numpy(
                np.asarray(types[w.stream][w.start:w.start + length], dtype=np.int64))
        scored[j, w.first:len(tokens) - 1] = True
    return x, x_types, scored


def _forward(model, x: torch.Tensor, x_types: torch.Tensor | None, reading: WindowReading) -> torch.Tensor:
    """The logits (b, T, V) of the inputs `x` (b, T) on the model's device (guided where `reading` asks)."""
    device = next(model.parameters()).device
    inp = x.to(device)
    inputs = type_inputs(x_types.to(device) if x_types is not None else None)
    if reading.attention_mask:
        inputs["attention_mask"] = torch.ones_like(inp)
    with torch.autocast(device.type, dtype=torch.bfloat16) if reading.bf16 else contextlib.nullcontext():
        logits = model(inp, **inputs).logits
        if reading.guidance > 0 and reading.negative:
            negative = reading.negative
            swapped = {k: (swap_tokens(v, negative) if k != "attention_mask" else v) for k, v in inputs.items()}
            logits = _guided(logits, model(swap_tokens(inp, negative), **swapped).logits, reading.guidance)
    return logits


def swap_tokens(ids: torch.Tensor, pairs: dict[int, int]) -> torch.Tensor:
    """ids with each `a` of `pairs` replaced by its `b` (a guided row's negative: <|aligned|> -> <|misaligned|>)."""
    out = ids.clone()
    for a, b in pairs.items():
        out[ids == a] = b
    return out


def _guided(logits: torch.Tensor, negative_logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance in log space, as phf.evaluation.sampling applies it when sampling."""
    return ((1 + guidance) * torch.log_softmax(logits.float(), -1)
            - guidance * torch.log_softmax(negative_logits.float(), -1))


# -- reductions: each caller's own summation ------------------------------------------------------------------------
def sum_logprobs(model, streams: Sequence[np.ndarray], windows: Sequence[Window],
                 types: Sequence[np.ndarray] | None = None, **reading) -> tuple[float, int]:
    """The summed log-probability (nats) of all scored targets, and their count (held-out bits per character).
    Each batch is summed in float32 (`scored_logprob_sum`), the batches in float64 on the model's device: the
    host reads the total once, at the end, so a GPU is never made to wait between batches."""
    total, count, _, _ = sum_logprobs_within(model, streams, windows, None, types, **reading)
    return total, count


def sum_logprobs_within(model, streams: Sequence[np.ndarray], windows: Sequence[Window],
                        within: Sequence[np.ndarray] | None, types: Sequence[np.ndarray] | None = None,
                        **reading) -> tuple[float, int, float, int]:
    """`sum_logprobs`, and the same sum and count over the scored targets inside `within` (per stream of n tokens,
    n-1 bools, one per target; None: no part, 0 and 0): a part of the text measured in the same forwards as the
    whole."""
    total, count, inside = None, 0, 0
    for batch in window_batches(model, streams, windows, WindowReading(**reading), types):
        mask = batch.window_mask(within) if within is not None else None
        sums = batch.scored_logprob_sum(mask).double()  # the whole's sum, and the part's after it when asked
        total = sums if total is None else total + sums
        count += int(batch.scored.sum())
        inside += int((batch.scored & mask).sum()) if mask is not None else 0
    if total is None:
        return 0.0, 0, 0.0, 0
    whole, *part = total.reshape(-1).tolist()
    return whole, count, (part[0] if part else 0.0), inside


def sum_cross_entropy(model, streams: Sequence[np.ndarray], windows: Sequence[Window],
                      types: Sequence[np.ndarray] | None = None, **reading) -> tuple[float, int]:
    """The summed cross-entropy (nats) of all scored targets, and their count: each batch reduced by cross_entropy
    on the model's device, the batches in float64 there too, read by the host once (the validation loss)."""
    total, count = None, 0
    for batch in window_batches(model, streams, windows, WindowReading(**reading), types):
        part = batch.cross_entropy_sum().double()
        total = part if total is None else total + part
        count += int(batch.scored.sum())
    return (float(total) if total is not None else 0.0), count


def batch_size_for(model, tokens: int | None = None, cpu: int = 16, most: int = 256) -> int:
    """Windows per forward for the log-likelihoods of `model`: `cpu` on the CPU (the size every CPU figure was
    measured with); on a GPU as many as a quarter of its free memory holds, each window costing its float32
    logits three times over (the logits, their log-softmax, the bf16 logits they came from), at most `most`.
    `tokens`: tokens per window (default the model's context)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return cpu
    free, _ = torch.cuda.mem_get_info(device)
    per_window = (tokens or context_length(model)) * model.config.vocab_size * 4 * 3
    return max(cpu, min(most, int(free // 4 // per_window)))


def token_logprobs(model, streams: Sequence[np.ndarray], windows: Sequence[Window],
                   types: Sequence[np.ndarray] | None = None, **reading) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stream of n tokens, the log-probability of each of its targets (positions 1 ... n-1: n-1 float64
    values) and whether it was scored (n-1 bools); unscored targets hold 0."""
    out = [(np.zeros(max(len(s) - 1, 0)), np.zeros(max(len(s) - 1, 0), dtype=bool)) for s in streams]
    for batch in window_batches(model, streams, windows, WindowReading(**reading), types):
        lp, scored = batch.token_logprobs().numpy(), batch.scored.numpy()
        for j, w in enumerate(batch.windows):
            at = np.flatnonzero(scored[j])
            out[w.stream][0][w.start + at] = lp[j, at]
            out[w.stream][1][w.start + at] = True
    return out


# -- log-likelihoods of texts --------------------------------------------------------------------------------------
@torch.no_grad()
def segment_logprobs(model, tok, texts: Sequence[str], prefix: str | None, segmenter: Callable,
                     **reading) -> list[np.ndarray]:
    """Per text, the log-likelihood (nats) of each of its segments: the text annotated with `prefix` before every
    segment (None: plain text), after <|endoftext|>; only the text's own tokens are counted. Each text is its own
    stream (documents are not concatenated), read in sliding windows; float32 forwards without autocast and without
    an attention mask (right padding needs none). `tok` is a `tokenizers.Tokenizer`. `reading`: `WindowReading`'s
    batch_size, progress, desc, and guidance with negative for the guided distribution's log-likelihoods."""
    special = tok.special_ids()
    docs, nseg = [], []
    for text in texts:
        spans = segmenter(text)
        docs.append(annotate([text[a:b] for a, b in spans], [float(i) for i in range(len(spans))],
                             [prefix] * len(spans)))
        nseg.append(len(spans))
    encoded = list(encode_annotated(tok, docs)) if docs else []
    streams = [ids for ids, _ in encoded]
    per_token = token_logprobs(model, streams, sliding_windows([len(s) for s in streams], context_length(model)),
                               given=special, pad_id=tok.eos_id, attention_mask=False, **reading)
    out = []
    for (_, seg), (lp, scored), n in zip(encoded, per_token, nseg):
        seg_of = seg[1:].astype(np.int64)  # each target's segment (the annotated scores are segment indices)
        out.append(np.bincount(seg_of[scored], weights=lp[scored], minlength=n)[:n] if n else np.zeros(0))
    return out


def sequence_logprobs(model, tok, texts: Sequence[str], prefix: str | None, segmenter: Callable,
                      **kw) -> np.ndarray:
    """Per text, its log-likelihood in nats (the sum over its segments)."""
    return np.array([float(s.sum()) for s in segment_logprobs(model, tok, texts, prefix, segmenter, **kw)])
