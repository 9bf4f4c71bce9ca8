"""The sampler as it was before phf.model.decoding (version 0.1.0, commit fc031d8): `transformers`' forward with its
growing cache, left padding, batch 64, and nucleus sampling by `topk`. Kept only so that `phf bench sample` can
measure the current sampler against it in one run; nothing else uses it."""
from __future__ import annotations

import torch

from phf.model.conditioning import control_types, markers_of, next_types, type_inputs


def sample_next_before(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                candidates: int = 1024, exempt: list[int] | None = None) -> torch.Tensor:
    """Nucleus sampling of one token per row, exact top-p among the `candidates` most likely tokens."""
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
def generate_ids_before(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, banned_ids: list[int],
                 temperature: float, top_p: float, generator: torch.Generator, guidance: float = 0.0,
                 negative: dict[int, int] | None = None, exempt: list[int] | None = None) -> list[list[int]]:
    """Sample continuations of token-id prompts with the model's KV cache; stop a row at <|endoftext|>."""
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
        tok = sample_next_before(logits, temperature, top_p, generator, exempt=exempt)  # (B,)
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

