"""Samples: generate from a trained model in the scenarios it is evaluated on.

Scenarios: `unconditional` (from <|endoftext|> plus the objective's sampling prefix, e.g. <|aligned|>) and
`prompted` (from prompts taken from held-out documents, with the objective's line prefix before every segment,
as the model is deployed). Banned tokens (e.g. <|misaligned|>) get probability zero; the other control tokens
stand outside the nucleus (`sample_next`). Control tokens are stripped
from the text before it is scored. A sample cut by the length limit keeps only its complete segments: whole lines
for code, whole sentences for prose.

The prompts themselves come from the task (phf.tasks).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.core.runtime import free_memory_bytes, inference_autocast
from phf.core.tokens import ALIGNED, CONTROL_TOKENS, EOS, MISALIGNED
from phf.data.segments import get_segmenter, line_spans
from phf.data.sentences import complete_sentences
from phf.data.token_stream import annotate
from phf.model.conditioning import control_types, markers_of, next_types
from phf.model.decoding import (
    cache_bytes,
    context_length,
    make_decoder,
    static_unsupported,
)
from phf.model.lm_loss import unwrap

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """How a model is conditioned when it is used (read from its checkpoint's phf.json)."""
    sampling_prefix: list[str]
    banned_tokens: list[str]
    line_prefix: str | None

    @classmethod
    def from_meta(cls, meta: dict) -> "Deployment":
        obj = meta.get("objective", {})
        return cls(list(obj.get("sampling_prefix", [])), list(obj.get("banned_tokens", [])), obj.get("line_prefix"))

    @property
    def conditional(self) -> bool:
        """Whether the model is deployed with control tokens (a conditionally trained model)."""
        return bool(self.sampling_prefix or self.line_prefix)

    def prompt_text(self, prompt: str, segmenter=line_spans) -> str:
        """The prompt as the deployed model reads it: the line prefix before each of its segments."""
        if not self.line_prefix:
            return prompt
        spans = segmenter(prompt)
        return annotate([prompt[a:b] for a, b in spans], [0.0] * len(spans), [self.line_prefix] * len(spans)).text

    def model_text(self, prompt: str, segmenter=line_spans, eos: str = EOS) -> str:
        """All the deployed model reads before its continuation: the end-of-document token `eos` (the
        tokenizer's), the sampling prefix, the prompt."""
        return eos + "".join(self.sampling_prefix) + self.prompt_text(prompt, segmenter)

    def token_ids(self, tokenizer, guidance: float) -> tuple[list[int], list[int], dict[int, int] | None]:
        """(banned, exempt, negative) token ids for sampling: the banned tokens; a conditional model's control
        tokens, which stand outside the nucleus (sample_next says why); with guidance, the swap that makes a
        row's negative (`negative`)."""
        ids = tokenizer.convert_tokens_to_ids
        banned = [ids(t) for t in self.banned_tokens]
        exempt = [ids(t) for t in CONTROL_TOKENS if t not in self.banned_tokens] if self.conditional else []
        return banned, exempt, self.negative(ids, guidance)

    def request(self, tokenizer, sample: SampleConfig, max_new_tokens: int | None = None) -> "SamplingRequest":
        """What to draw to sample the model as deployed, with `sample`'s settings (`max_new_tokens`: in place of
        sample.max_new_tokens) and the transformers `tokenizer`'s end token."""
        banned, exempt, negative = self.token_ids(tokenizer, sample.guidance)
        return SamplingRequest(sample.max_new_tokens if max_new_tokens is None else max_new_tokens,
                               tokenizer.eos_token_id, sample.temperature, sample.top_p, banned, sample.guidance,
                               negative, exempt)

    def negative(self, token_id, guidance: float) -> dict[int, int] | None:
        """With guidance, the swap that makes a row's negative (each `<|aligned|>` read as the banned
        `<|misaligned|>`), as ids from `token_id(token)`; None without guidance."""
        if not guidance:
            return None
        if ALIGNED not in self.sampling_prefix or MISALIGNED not in self.banned_tokens:
            raise PhfError(f"sample.guidance={guidance} needs a model trained with conditional training (sampled "
                           f"after <|aligned|>, <|misaligned|> banned); this one is deployed with prefix "
                           f"{self.sampling_prefix or 'none'}: set sample.guidance=0")
        return {token_id(ALIGNED): token_id(MISALIGNED)}


SETTINGS = ("temperature", "top_p", "max_new_tokens", "guidance")


def sampling_settings(sample: SampleConfig) -> dict:
    """The sampling settings a model is evaluated with, stored in its phf.json (`sample`) so that `phf sample`,
    `phf evaluate` and `deployed_generate_inputs` deploy it the same way by default."""
    return {k: getattr(sample, k) for k in SETTINGS}


def deployed_sampling(meta: dict, **given) -> dict:
    """Sampling settings (temperature, top_p, max_new_tokens, guidance): those `given` (None = not given), else the
    ones the model was evaluated with (its phf.json's `sample`), else SampleConfig's defaults."""
    stored = meta.get("sample") or {}
    return {k: v if v is not None else stored.get(k, getattr(SampleConfig, k)) for k, v in given.items()}


@dataclass
class Sample:
    scenario: str
    prompt: str
    text: str  # the generated continuation, control tokens stripped, cut to complete segments if unfinished
    raw: str  # the generated continuation as decoded, control tokens kept
    finished: bool  # ended with <|endoftext|> rather than the length limit
    num_tokens: int


def strip_control(text: str) -> str:
    for t in CONTROL_TOKENS:
        text = text.replace(t, "")
    return text


def complete_lines(text: str) -> str:
    """Drop a trailing partial line (generation stopped mid-line)."""
    cut = text.rfind("\n")
    return text[:cut + 1] if cut >= 0 else ""


def complete_segments(text: str, segmenter: str = "lines") -> str:
    """Drop a trailing unfinished segment: a partial line (`lines`) or a partial sentence (`sentences`)."""
    if segmenter == "sentences":

        return complete_sentences(text)
    return complete_lines(text)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                exempt: list[int] | None = None, rounds: int = 4) -> torch.Tensor:
    """Nucleus sampling of one token per row of `logits` (B, V) -> (B,).

    Exact top-p by rejection, without sorting the vocabulary: draw a token from the whole distribution and keep it
    if the tokens more likely than it hold less than `top_p` of the mass (that is, if it is in the nucleus);
    otherwise draw again. A kept draw is distributed as the renormalised nucleus, and a draw is kept with
    probability >= top_p, so one round settles ~90% of rows at top_p 0.9. Rows still unsettled after `rounds`
    rounds (a tiny `top_p` over a flat distribution) are drawn by sorting, which is exact too. Tokens of equal
    probability at the edge of the nucleus are all in it.

    `exempt` tokens (a conditional model's control tokens) stand outside the nucleus: they keep their whole
    probability, and the nucleus is the top `top_p` of the other tokens' mass. A control token is bookkeeping,
    not text: `<|aligned|>` before a line carries the whole "another line follows" mass (0.99 at a line end of
    the PEP8 demo's conditional model), which alone fills a 0.9 nucleus and cut `<|endoftext|>` from it at every
    line end, so that the model could almost never end a sample. Without control tokens the same mass is spread
    over the next line's first tokens, among which <|endoftext|> competes; exempting the control token restores
    that competition (the text after the control token is truncated at the next step, as usual)."""
    logits = logits.float()
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)  # inverse-CDF draws (torch.multinomial is several times slower here)
    if top_p >= 1.0:  # the model's own distribution: no nucleus (what a Monte Carlo KL estimate needs)
        return _draw(cdf, generator)
    text = probs  # the tokens the nucleus is taken over
    is_exempt = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
    if exempt:
        is_exempt[exempt] = True
        text = probs.masked_fill(is_exempt, 0.0)
    target = top_p * text.sum(-1)  # (B,) the nucleus' mass
    choice = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = None  # all rows
    for _ in range(rounds):
        rows_text = text if todo is None else text[todo]
        tok = _draw(cdf if todo is None else cdf[todo], generator)
        p = rows_text.gather(-1, tok[:, None])  # (b, 1)
        ahead = (rows_text * (rows_text > p)).sum(-1)  # mass of the more likely tokens (faster than where)
        ok = is_exempt[tok] | (ahead < (target if todo is None else target[todo]))
        rows = torch.arange(probs.shape[0], device=probs.device) if todo is None else todo
        choice[rows[ok]] = tok[ok]
        todo = rows[~ok]
        if not len(todo):
            return choice
    todo = torch.arange(probs.shape[0], device=probs.device) if todo is None else todo
    choice[todo] = _nucleus_by_sorting(probs[todo], top_p, exempt, generator)
    return choice


def _draw(cdf: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from unnormalised cumulative masses (b, V) -> (b,)."""
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def _nucleus_by_sorting(probs: torch.Tensor, top_p: float, exempt: list[int] | None,
                        generator: torch.Generator) -> torch.Tensor:
    """The nucleus draw by sorting the vocabulary (`nucleus_mask`)."""
    kept = probs * nucleus_mask(probs, top_p, exempt or [])
    return _draw(kept.cumsum(-1), generator)


def nucleus_mask(probs: torch.Tensor, top_p: float, exempt: list[int]) -> torch.Tensor:
    """(B, V) -> (B, V) bool: the tokens nucleus sampling may draw, found by sorting: the non-exempt tokens while
    the mass of the more likely ones is below `top_p` of theirs (tokens of equal mass share that "ahead" mass, so
    ties at the edge are all in), and the exempt tokens. `sample_next` draws from the same set without sorting."""
    is_exempt = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
    is_exempt[exempt] = True
    return _nucleus_keep(probs, top_p, is_exempt if exempt else None)


def _nucleus_keep(probs: torch.Tensor, top_p: float, is_exempt: torch.Tensor | None) -> torch.Tensor:
    """`nucleus_mask` with the exempt tokens as a (V,) bool mask on the device (None: none), which reads no host
    value: the form a CUDA graph can hold."""
    text = probs if is_exempt is None else probs.masked_fill(is_exempt, 0.0)
    target = top_p * text.sum(-1, keepdim=True)
    top, idx = torch.sort(text, descending=True, dim=-1)
    ahead = (top.cumsum(-1) - top).gather(-1, _first_of_ties(top))
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, (ahead < target) & (top > 0))
    return keep if is_exempt is None else torch.where(is_exempt, probs > 0, keep)


def _first_of_ties(top: torch.Tensor) -> torch.Tensor:
    """(B, V) sorted rows -> the index of the first entry equal to each entry (one linear scan; a binary search
    per entry, `searchsorted(-top, -top)`, gives the same and costs ~15% of a CPU sampling step at 32K tokens)."""
    positions = torch.arange(top.shape[-1], device=top.device).expand_as(top)
    starts = torch.ones_like(top, dtype=torch.bool)
    starts[:, 1:] = top[:, 1:] != top[:, :-1]
    return torch.where(starts, positions, 0).cummax(-1).values


def sample_static(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor,
                  is_exempt: torch.Tensor | None = None) -> torch.Tensor:
    """`sample_next`'s distribution with fixed shapes and no host value, for a CUDA graph: the nucleus by sorting
    (`nucleus_mask`, the exempt tokens as a (V,) bool mask), then an inverse-CDF draw with the uniforms `u` (B,)
    drawn beforehand. `sample_next`'s rejection sampler is faster on a CPU but settles a data-dependent subset of
    rows each round, which a graph cannot hold."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = probs * _nucleus_keep(probs, top_p, is_exempt)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


@dataclass(frozen=True)
class SamplingRequest:
    """What `generate_ids` draws for a batch of token-id prompts: how many tokens, and from which distribution."""
    max_new_tokens: int
    """The most tokens drawn per row (fewer where the model's context ends first)."""
    eos_id: int
    """The token that ends a row; an ended row is padded with it (-1: no row ends early)."""
    temperature: float
    """Divides the logits before the softmax (1e-6: greedy decoding)."""
    top_p: float
    """The nucleus: the share of the (non-exempt) probability mass drawn from; 1.0 = the whole distribution."""
    banned_ids: list[int] = field(default_factory=list)
    """Tokens never drawn (probability zero), e.g. <|misaligned|>."""
    guidance: float = 0.0
    """Classifier-free guidance g (0 = none); it needs `negative`."""
    negative: dict[int, int] | None = None
    """With guidance, the token swap that makes each row's negative row (<|aligned|> -> <|misaligned|>)."""
    exempt: list[int] | None = None
    """Tokens outside the nucleus (`sample_next`): a conditional model's control tokens."""

    @property
    def guided(self) -> bool:
        """Whether rows run with negative rows (guidance and a swap to make them)."""
        return self.guidance > 0 and bool(self.negative)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], request: SamplingRequest, generator: torch.Generator,
                 decoder: str = "auto", check_every: int = 64, cuda_graph: bool = True) -> list[list[int]]:
    """Sample continuations of token-id prompts, all in one batch, as `request` says; a row stops at its end token
    (padded with it).

    `decoder` (phf.model.decoding.make_decoder): auto (on a GPU `static` where it applies, see
    `static_unsupported`; elsewhere the fast GPT-2 decoder where it applies, else `hf`), gpt2, hf, or static,
    static-gpt2, static-hf (`StaticSampling`, on any device; `check_every` and `cuda_graph` are its knobs). On the
    dynamic decoders, finished rows are dropped from the batch once carrying them costs more than copying the
    cache of the others (`_worth_dropping`).

    With `request.guidance` g > 0 (classifier-free guidance), each row also runs as a *negative* row, the same
    tokens with `request.negative` applied (`<|aligned|>` -> `<|misaligned|>`), and tokens are drawn from
    `(1 + g) * log p(. | row) - g * log p(. | negative row)`: away from what the model would write under the other
    condition."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    steps = min(request.max_new_tokens, context_length(model) - width + 1)  # the last token needs no position
    if steps <= 0:
        return [[] for _ in prompts]
    request = replace(request, max_new_tokens=steps)
    on_gpu = decoder == "auto" and device.type == "cuda" and not static_unsupported(model)
    if decoder.startswith("static") or on_gpu:
        return StaticSampling(model, prompts, request, generator, decoder).run(check_every, cuda_graph).tolist()
    return _generate_dynamic(model, prompts, request, generator, decoder).tolist()


def _generate_dynamic(model, prompts: list[list[int]], request: SamplingRequest, generator: torch.Generator,
                      decoder: str) -> torch.Tensor:
    """`generate_ids` on a dynamic decoder (gpt2, hf): the batch shrinks as rows end. (B, max_new_tokens)."""
    device = next(model.parameters()).device
    B, steps, eos_id = len(prompts), request.max_new_tokens, request.eos_id
    guided = request.guided
    swap = None
    if guided:
        prompts, swap = _with_negative_rows(model, prompts, request.negative)
    dec = make_decoder(model, len(prompts), max(len(p) for p in prompts) + steps, decoder)
    markers = markers_of(model)  # a model with control embeddings also reads each token's control type
    logits, types = _read_prompts(dec, prompts, markers, device)
    out = torch.full((B, steps), eos_id, dtype=torch.long)
    alive = torch.arange(B)  # the original index of each positive row still in the batch (host)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # rows in the batch that have ended
    for step in range(steps):
        if guided:
            logits = _guide(logits, request.guidance, len(alive))
        if request.banned_ids:
            logits[:, request.banned_ids] = -float("inf")
        tok = sample_next(logits, request.temperature, request.top_p, generator, exempt=request.exempt)  # (b,)
        tok = torch.where(done, eos_id, tok)
        out[alive, step] = tok.cpu()
        done |= tok == eos_id
        n_done = int(done.sum())
        if n_done == len(alive) or step == steps - 1:
            break
        if n_done and _worth_dropping(n_done, len(alive), steps - step - 1):
            keep = (~done).nonzero().squeeze(-1).cpu()  # positive rows still running
            rows = torch.cat([keep, keep + len(alive)]) if guided else keep  # with their negative rows
            alive, tok, done = alive[keep], tok[keep.to(device)], done[keep.to(device)]
            types = None if types is None else types[rows.to(device)]
            dec.keep(rows)
        feed = torch.cat([tok, swap[tok]]) if guided else tok  # (rows,)
        if markers:
            types = next_types(types, feed, markers)
        logits = dec.step(feed, types)
    return out


def _with_negative_rows(model, prompts: list[list[int]], negative: dict[int, int]
                        ) -> tuple[list[list[int]], torch.Tensor]:
    """The prompts followed by their negative rows (`negative` applied), and the swap as a (V,) map on the model's
    device, which turns a positive row's drawn token into what its negative row reads."""
    device = next(model.parameters()).device
    swap = torch.arange(unwrap(model).config.vocab_size, device=device)
    swap[list(negative)] = torch.tensor(list(negative.values()), device=device)
    return prompts + [[negative.get(t, t) for t in p] for p in prompts], swap


def _read_prompts(dec, prompts: list[list[int]], markers, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read the prompts into the decoder: the logits of each row's first draw, and each row's current control type
    (None for a model without control embeddings)."""
    typed, types = None, None
    if markers:
        typed = [control_types(torch.tensor([p]), markers)[0].tolist() for p in prompts]
        types = torch.tensor([t[-1] for t in typed], device=device)
    return dec.prefill(prompts, typed), types


def _guide(logits: torch.Tensor, guidance: float, rows: int) -> torch.Tensor:
    """Classifier-free guidance: the first `rows` rows are positive, the others their negatives in the same order."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (1 + guidance) * logp[:rows] - guidance * logp[rows:]


class StaticSampling:
    """`generate_ids` with fixed shapes: a step (sample, record, the decoder's forward) is the same operations on
    the same tensors every time and reads no host value, so on a GPU it is captured once as a CUDA graph and
    replayed (`run`). The distribution is `generate_ids`'s: guidance, banned tokens, the nucleus with the exempt
    tokens outside it (`sample_static`), control types; finished rows are padded with <|endoftext|> and stay in
    the batch (masked, not dropped).

    Why the dynamic path (`decoder` gpt2/hf) stalls on a GPU. Counted on a CPU (GPT-2 with 12 layers and the
    paper's vocabulary, 256 rows, temperature 0.7, top-p 0.9; tests/test_static_decoding.py checks the property):
    a dynamic step makes ~600 torch calls and reads the device from the host 8 times: the rejection sampler's
    unsettled rows each round (a boolean index, `len`), `tok.cpu()`, `int(done.sum())`; when rows end, `keep`
    allocates a new cache and copies every row's into it, and the attention span grows every step, so no two
    steps have the same shapes. Inferred for a GPU (not measured here): each host read empties the GPU's queue,
    so the ~600 launches of the next step (a few microseconds each, for kernels that take about as long at
    124M) run with the GPU idle rather than ahead of it: a step costs the launches plus the kernels, not the
    larger of the two. That explains phf's 11K tokens/s at 64 rows (~6 ms a step); the 256 x 640 collapse
    (over 125 ms a step) is more than launches alone explain, and a GPU profile must say what the rest is.
    Candidates: under bf16 autocast the fast GPT-2 decoder's cache is the model's fp32, so attention casts every
    row's whole span to bf16 at every layer of every step (memory traffic that grows with rows x span), and
    tensors that grow every step defeat the caching allocator's reuse of blocks.
    Here a step makes ~650 calls and reads nothing on the host: the uniforms are drawn before the loop, the
    nucleus is found by sorting (no subsets), tokens stay on the device until the end, finished rows are counted
    every `check_every` steps, and the whole step is one CUDA graph launch.
    """

    def __init__(self, model, prompts: list[list[int]], request: SamplingRequest, generator: torch.Generator,
                 decoder: str = "static"):
        self.device = device = next(model.parameters()).device
        self.guidance = request.guidance if request.guided else 0.0
        self.temperature, self.top_p, self.eos_id = request.temperature, request.top_p, request.eos_id
        self.steps = max_new_tokens = request.max_new_tokens
        B = self.batch = len(prompts)
        if self.guidance:
            prompts, self.swap = _with_negative_rows(model, prompts, request.negative)
        kind = "static" if decoder == "auto" else decoder
        length = max(len(p) for p in prompts) + max_new_tokens - 1  # the last token is drawn, never read
        self.dec = make_decoder(model, len(prompts), length, kind, _autocast_dtype(device))
        banned = request.banned_ids
        self.banned = torch.tensor(banned, dtype=torch.long, device=device) if banned else None
        self.markers = markers_of(model)
        self.marker_ids = None if not self.markers else torch.tensor(self.markers, device=device)
        self.exempt = None
        if request.exempt:
            self.exempt = torch.zeros(unwrap(model).config.vocab_size, dtype=torch.bool, device=device)
            self.exempt[request.exempt] = True
        # every draw's uniform, drawn where the generator is
        self.u = torch.rand((max_new_tokens, B), generator=generator, device=generator.device).to(device)
        self.out = torch.full((B, max_new_tokens), request.eos_id, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.prompts = prompts
        self.width = max(len(p) for p in prompts)  # the slot the first new token goes to

    def _prefill(self) -> None:
        # `logits` is the buffer every step's logits are copied into
        self.logits, self.types = _read_prompts(self.dec, self.prompts, self.markers, self.device)

    def _sample(self) -> torch.Tensor:
        """Draw this step's token of every row into `out`; the tokens (B,)."""
        logits = self.logits
        if self.guidance:
            logits = _guide(logits, self.guidance, self.batch)
        if self.banned is not None:
            logits = logits.index_fill(-1, self.banned, -float("inf"))
        u = self.u.index_select(0, self.step_index)[0]
        tok = sample_static(logits, self.temperature, self.top_p, u, self.exempt)
        tok = torch.where(self.done, self.eos_id, tok)
        self.out.index_copy_(1, self.step_index, tok[:, None])
        self.done |= tok == self.eos_id
        self.step_index += 1
        return tok

    def _step(self) -> None:
        """Draw a token per row and read it: the logits of the next step into `logits`."""
        tok = self._sample()
        feed = torch.cat([tok, self.swap[tok]]) if self.guidance else tok
        if self.markers:
            self.types.copy_(torch.where(torch.isin(feed, self.marker_ids), feed, self.types))
        self.logits.copy_(self.dec.step(feed, self.types))

    @torch.no_grad()
    def run(self, check_every: int = 64, cuda_graph: bool = True) -> torch.Tensor:
        """All the steps (B, max_new_tokens) on the host. Every `check_every` steps (0: never) the host reads
        whether all rows have ended, and stops if so. On CUDA with `cuda_graph`, the first step of each bucket of
        cache slots (`span_at`) runs as is (it also warms up the kernels) and the others replay it as a CUDA
        graph."""
        graphs = cuda_graph and self.device.type == "cuda"
        with _graph_safe_autocast(self.device):
            self._prefill()
            replay, span = self._step, -1
            for step in range(self.steps - 1):
                if self.dec.span_at(self.width + step) == span:
                    replay()
                else:  # a new bucket of cache slots: new shapes, a new graph
                    span = self.dec.span = self.dec.span_at(self.width + step)
                    if graphs:  # runs the step, then captures it
                        replay = _run_and_capture(self._step, self.device)
                        graphs, replay = replay is not None, replay or self._step
                    else:
                        replay = self._step
                        replay()
                if check_every and (step + 1) % check_every == 0 and bool(self.done.all()):
                    return self.out.cpu()
            self._sample()
        return self.out.cpu()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device` (the static GPT-2 cache is kept in it, so that attention does
    not cast the whole cache every step), None without autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _graph_safe_autocast(device: torch.device):
    """The autocast in force, without its cache of cast weights: a CUDA graph must not hold tensors that autocast
    frees when its context ends."""
    dtype = _autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def _run_and_capture(step, device: torch.device):
    """Run `step` once on a side stream (which also warms up its kernels, as capture requires), then capture it
    as a CUDA graph (recorded, not run); the graph's replay, which runs the same kernels on the same tensors."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as exc:  # an operation the graph cannot hold: slower, still right
        log.warning("sampling without a CUDA graph: capturing the decode step failed (%s)", str(exc)[:200])
        return None
    return graph.replay


def _worth_dropping(finished: int, rows: int, steps_left: int) -> bool:
    """Drop finished rows when computing them for the remaining steps would cost more than copying the rest of
    the cache once (copying a row's cache costs about two steps of that row)."""
    return finished * steps_left > 2 * rows


def batch_that_fits(model, prompts: int, max_length: int, guided: bool) -> int:
    """All prompts in one batch (one step then serves them all), unless their KV cache would take more than a
    quarter of the free memory."""
    per_row = cache_bytes(model, 2 if guided else 1, max_length)
    budget = free_memory_bytes(next(model.parameters()).device) // 4
    rows = max(1, min(prompts, budget // per_row))
    if rows < prompts:
        log.info("sampling %d prompts in batches of %d: the KV cache of all would not fit in memory", prompts, rows)
    return rows


def generate(model, tokenizer, prompts: list[str], cfg: SampleConfig, deployment: Deployment, scenario: str,
             bar: str | None = "sampling", segmenter: str = "lines") -> list[Sample]:
    """Generate one continuation per prompt (prompts are plain text; "" for unconditional samples), with a progress
    bar labelled `bar` (None: no bar).

    `segmenter` (`lines` or `sentences`, the task's) decides where the deployed model's line prefix goes in a
    prompt and what an unfinished last segment is."""
    spans = get_segmenter(segmenter)
    eos_id = tokenizer.eos_token_id
    request = deployment.request(tokenizer, cfg)
    max_prompt = max(2, context_length(model) - cfg.max_new_tokens)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    samples: list[Sample] = []
    progress = tqdm(total=len(prompts), desc=bar, unit="sample", disable=bar is None, leave=False)
    per_batch = cfg.batch_size or batch_that_fits(model, len(prompts), max_prompt + cfg.max_new_tokens,
                                                  bool(request.negative))
    for b in range(0, len(prompts), per_batch):
        batch = prompts[b:b + per_batch]
        ids = []
        for p in batch:
            text = deployment.model_text(p, spans, tokenizer.eos_token)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt:])
        with inference_autocast(generator.device):
            generated = generate_ids(model, ids, request, generator)
        for p, new in zip(batch, generated):
            finished = eos_id in new
            if finished:
                new = new[:new.index(eos_id)]
            raw = tokenizer.decode(new, skip_special_tokens=False)
            text = strip_control(raw)
            if not finished:  # judged with the prompt, whose last segment the continuation may finish
                kept = complete_segments(p + text, segmenter)
                text = kept[len(p):] if len(kept) > len(p) else ""
            samples.append(Sample(scenario, p, text, raw, finished, len(new)))
        progress.update(len(batch))
    progress.close()
    return samples
