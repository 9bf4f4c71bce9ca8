"""Sampling a phf model with plain `transformers` `generate`, exactly as phf deploys it.

`generation_config.json` carries what `transformers` can express (temperature, top-p, length, the banned control
token). Three things it cannot express: the control-token prefix, guidance, and control tokens standing outside
the nucleus (phf.evaluation.sampling.sample_next says why they must). `deployed_generate_inputs` builds the
prompts as the deployed model reads them and a `LogitsProcessor` that applies all three, so that

    inputs = deployed_generate_inputs(model, tokenizer, "runs/demo/conditional/checkpoint", ["def add(a, b):\\n"])
    out = model.generate(**inputs)

draws from the distribution `phf sample` draws from (tests/test_deployed.py compares them step by step).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.data.segments import get_segmenter
from phf.evaluation.loglik import swap_tokens
from phf.evaluation.sampling import SETTINGS, Deployment, SamplingRequest, deployed_sampling, nucleus_mask
from phf.model.conditioning import markers_of
from phf.model.decoding import context_length, make_decoder
from phf.model.lm import load_meta


class DeployedLogitsProcessor(LogitsProcessor):
    """phf's next-token distribution inside `generate`: guidance, banned tokens, temperature, then the nucleus with
    the control tokens outside it; every other token gets -inf. Use with `do_sample=True, temperature=1.0,
    top_p=1.0, top_k=0` (this processor does their work).

    With guidance g, the processor runs the model itself on the *negative* rows (each row with `<|aligned|>` read
    as `<|misaligned|>`) through phf's decoder (phf.model.decoding), and returns
    (1 + g) log p(. | row) - g log p(. | negative row)."""

    def __init__(self, model, request: SamplingRequest, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None):
        """`request`: the distribution (its banned and exempt tokens, temperature, top-p, guidance with its negative
        swap); `generate` keeps its own length and end token. `attention_mask`: the prompts' (which tokens are
        left padding). `max_length`: prompt and continuation (default the model's context)."""
        self.model, self.banned, self.exempt = model, request.banned_ids, request.exempt or []
        self.temperature, self.top_p, self.guidance = request.temperature, request.top_p, request.guidance
        self.negative = request.negative or {}
        self.prompt_mask = attention_mask  # which prompt tokens are left padding
        self.max_length = max_length or context_length(model)
        self.decoder = None

    def _swap(self, ids: torch.Tensor) -> torch.Tensor:
        return swap_tokens(ids, self.negative)

    def _negative_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:  # first step: the prompts, their left padding dropped
            mask = torch.ones_like(input_ids) if self.prompt_mask is None else self.prompt_mask
            rows = [self._swap(ids[m.bool()]).tolist() for ids, m in zip(input_ids, mask)]
            self.decoder = make_decoder(self.model, len(rows), self.max_length)
            return self.decoder.prefill(rows).float()
        return self.decoder.step(self._swap(input_ids[:, -1])).float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.guidance > 0 and self.negative:
            logits = ((1 + self.guidance) * torch.log_softmax(logits, -1)
                      - self.guidance * torch.log_softmax(self._negative_logits(input_ids), -1))
        if self.banned:
            logits[:, self.banned] = -float("inf")
        logits = logits / self.temperature
        if self.top_p >= 1.0:
            return logits
        return logits.masked_fill(~nucleus_mask(torch.softmax(logits, -1), self.top_p, self.exempt), -float("inf"))


def deployed_generate_inputs(model, tokenizer, folder: str | Path, prompts: list[str],
                             sample: SampleConfig | None = None) -> dict:
    """Keyword arguments for `model.generate` that sample the model in `folder` as phf deploys it: the prompts
    (plain text, "" for unconditional samples) with the control-token prefix, left-padded, and the processor.
    `sample` overrides the settings stored in the folder's phf.json."""
    meta = load_meta(folder)
    if markers_of(model):
        raise PhfError(f"{folder} has control embeddings: every token's control type must follow the control tokens "
                       f"the model writes, which generate does not do; sample it with `phf sample --model {folder}`")
    sample = sample or SampleConfig(**deployed_sampling(meta, **dict.fromkeys(SETTINGS)))
    deployment = Deployment.from_meta(meta)
    spans = get_segmenter(meta.get("segmenter") or "lines")
    tokenizer.padding_side = "left"
    texts = [deployment.model_text(p, spans, tokenizer.eos_token) for p in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    request = deployment.request(tokenizer, sample)
    width = inputs["input_ids"].shape[1]
    room = context_length(model) - width  # positions left after the longest prompt
    if room < 1:
        raise PhfError(f"the longest prompt takes {width} tokens of the model's {context_length(model)}-token "
                       f"context; shorten it")
    new_tokens = min(sample.max_new_tokens, room)
    processor = DeployedLogitsProcessor(model, replace(request, max_new_tokens=new_tokens), inputs["attention_mask"],
                                        width + new_tokens)
    eos = tokenizer.eos_token_id
    return {**inputs, "logits_processor": LogitsProcessorList([processor]), "do_sample": True, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "max_new_tokens": new_tokens, "pad_token_id": eos, "eos_token_id": eos}
