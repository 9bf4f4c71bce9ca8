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

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, CONTROL_TOKENS, EOS, MISALIGNED
from phf.data.segments import get_segmenter, line_spans
from phf.data.sentences import complete_sentences
from phf.data.token_stream import annotate
from phf.model.conditioning import control_types, markers_of, next_types, type_inputs

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
                candidates: int = 1024, exempt: list[int] | None = None) -> torch.Tensor:
    """Nucleus sampling of one token per row of `logits` (B, V) -> (B,).

    Exact top-p without sorting the whole vocabulary: the smallest set of most likely tokens whose mass reaches
    `top_p` is found among the `candidates` most likely; rows where those do not reach it fall back to a full sort.

    `exempt` tokens (a conditional model's control tokens) stand outside the nucleus: they keep their whole
    probability, and the nucleus is the top `top_p` of the other tokens' mass. A control token is bookkeeping,
    not text: `<|aligned|>` before a line carries the whole "another line follows" mass (0.99 at a line end of
    the PEP8 demo's conditional model), which alone fills a 0.9 nucleus and cut `<|endoftext|>` from it at every
    line end, so that the model could almost never end a sample. Without control tokens the same mass is spread
    over the next line's first tokens, among which <|endoftext|> competes; exempting the control token restores
    that competition (the text after the control token is truncated at the next step, as usual)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0:  # the model's own distribution: no nucleus (what a Monte Carlo KL estimate needs)
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    held = None
    target = torch.full((probs.shape[0],), float(top_p), device=probs.device)  # (B,) nucleus mass per row
    if exempt:
        ex = torch.tensor(exempt, device=probs.device)
        held = probs[:, ex]  # (B, E)
        probs = probs.index_fill(-1, ex, 0.0)
        target = top_p * probs.sum(-1)
    k = min(candidates, probs.shape[-1])
    top, idx = torch.topk(probs, k, dim=-1)  # (B, k), sorted descending
    short = top.sum(-1) < target
    if bool(short.any()):
        full, full_idx = torch.sort(probs[short], descending=True, dim=-1)
        k = probs.shape[-1]
        top = torch.cat([top, top.new_zeros(top.shape[0], k - top.shape[1])], dim=-1)
        idx = torch.cat([idx, idx.new_zeros(idx.shape[0], k - idx.shape[1])], dim=-1)
        top[short], idx[short] = full, full_idx
    before = top.cumsum(-1) - top  # mass of the more likely tokens
    top = top.masked_fill(before >= target[:, None], 0.0)  # keep a token while the mass before it is below top_p
    if held is not None:
        top = torch.cat([top, held], dim=-1)
        idx = torch.cat([idx, ex.expand(idx.shape[0], -1)], dim=-1)
    cdf = top.cumsum(-1)  # inverse-CDF draw (torch.multinomial is several times slower here)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, banned_ids: list[int],
                 temperature: float, top_p: float, generator: torch.Generator, guidance: float = 0.0,
                 negative: dict[int, int] | None = None, exempt: list[int] | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts with the model's KV cache; stop a row at <|endoftext|>.

    `exempt`: tokens outside the nucleus (`sample_next`), a conditional model's control tokens.

    With `guidance` g > 0 (classifier-free guidance), each row also runs as a *negative* row, the same tokens with
    `negative` applied (`<|aligned|>` -> `<|misaligned|>`), and tokens are drawn from
    `(1 + g) * log p(. | row) - g * log p(. | negative row)`: away from what the model would write under the other
    condition."""
    device = next(model.parameters()).device
    guided = guidance > 0 and bool(negative)
    if guided:
        swap = torch.arange(model.config.vocab_size, device=device)  # the negative rows' tokens (R,) -> (R,)
        swap[list(negative)] = torch.tensor(list(negative.values()), device=device)
        prompts = prompts + [[negative.get(t, t) for t in p] for p in prompts]
    width = max(len(p) for p in prompts)
    B = len(prompts) // 2 if guided else len(prompts)
    R = len(prompts)  # rows run through the model
    input_ids = torch.full((R, width), eos_id, dtype=torch.long, device=device)
    attention = torch.zeros((R, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    position = (attention.cumsum(-1) - 1).clamp(min=0)  # (R, T)
    markers = markers_of(model)  # a model with control embeddings also reads each token's control type
    typed = type_inputs(control_types(input_ids, markers) if markers else None)  # left padding: untyped
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position, use_cache=True, **typed)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    generated = []
    max_new_tokens = min(max_new_tokens, model.config.n_positions - width + 1)  # the last token needs no position
    next_pos = position[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # (R, V)
        if guided:
            logp = torch.log_softmax(logits.float(), dim=-1)
            logits = (1 + guidance) * logp[:B] - guidance * logp[B:]
        if banned_ids:
            logits[:, banned_ids] = -float("inf")
        tok = sample_next(logits, temperature, top_p, generator, exempt=exempt)  # (B,)
        tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
        generated.append(tok)
        finished |= tok == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        feed = torch.cat([tok, swap[tok]]) if guided else tok  # (R,)
        attention = torch.cat([attention, torch.ones((R, 1), dtype=attention.dtype, device=device)], dim=-1)
        if markers:
            typed = type_inputs(next_types(typed["token_type_ids"][:, -1], feed, markers)[:, None])
        out = model(input_ids=feed[:, None], attention_mask=attention, position_ids=next_pos,
                    past_key_values=out.past_key_values, use_cache=True, **typed)
        next_pos = next_pos + 1
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(B)]
    return rows


def generate(model, tokenizer, prompts: list[str], cfg: SampleConfig, deployment: Deployment, scenario: str,
             progress: bool = True, desc: str = "sampling", segmenter: str = "lines") -> list[Sample]:
    """Generate one continuation per prompt (prompts are plain text; "" for unconditional samples).

    `segmenter` (`lines` or `sentences`, the task's) decides where the deployed model's line prefix goes in a
    prompt and what an unfinished last segment is."""
    spans = get_segmenter(segmenter)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    banned = [tokenizer.convert_tokens_to_ids(t) for t in deployment.banned_tokens]
    # a conditional model's control tokens stand outside the nucleus (sample_next says why)
    exempt = [tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS
              if t not in deployment.banned_tokens] if deployment.conditional else []
    max_prompt = max(2, model.config.n_positions - cfg.max_new_tokens)
    negative = None
    if cfg.guidance:  # guided away from the banned control token: each control token of a row swapped for it
        if ALIGNED not in deployment.sampling_prefix or MISALIGNED not in deployment.banned_tokens:
            raise PhfError(f"sample.guidance={cfg.guidance} needs a model trained with conditional training (sampled "
                           f"after <|aligned|>, <|misaligned|> banned); this one is deployed with prefix "
                           f"{deployment.sampling_prefix or 'none'}: set sample.guidance=0")
        negative = {tokenizer.convert_tokens_to_ids(ALIGNED): tokenizer.convert_tokens_to_ids(MISALIGNED)}
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    samples: list[Sample] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", disable=not progress, leave=False)
    for b in range(0, len(prompts), cfg.batch_size):
        batch = prompts[b:b + cfg.batch_size]
        ids = []
        for p in batch:
            text = EOS + "".join(deployment.sampling_prefix) + deployment.prompt_text(p, spans)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt:])
        rows = generate_ids(model, ids, cfg.max_new_tokens, eos_id, banned, cfg.temperature, cfg.top_p, generator,
                            cfg.guidance, negative, exempt)
        for p, new in zip(batch, rows):
            finished = eos_id in new
            if finished:
                new = new[:new.index(eos_id)]
            raw = tokenizer.decode(new, skip_special_tokens=False)
            text = strip_control(raw)
            if not finished:  # judged with the prompt, whose last segment the continuation may finish
                kept = complete_segments(p + text, segmenter)
                text = kept[len(p):] if len(kept) > len(p) else ""
            samples.append(Sample(scenario, p, text, raw, finished, len(new)))
        bar.update(len(batch))
    bar.close()
    return samples
