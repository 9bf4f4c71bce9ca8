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

from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, CONTROL_TOKENS, EOS, MISALIGNED
from phf.data.segments import get_segmenter
from phf.evaluation.sampling import SETTINGS, Deployment, deployed_sampling, nucleus_mask
from phf.model.conditioning import markers_of
from phf.model.decoding import context_length
from phf.model.lm import load_meta


class DeployedLogitsProcessor(LogitsProcessor):
    """phf's next-token distribution inside `generate`: guidance, banned tokens, temperature, then the nucleus with
    the control tokens outside it; every other token gets -inf. Use with `do_sample=True, temperature=1.0,
    top_p=1.0, top_k=0` (this processor does their work).

    With guidance g, the processor runs the model itself on the *negative* rows (each row with `<|aligned|>` read
    as `<|misaligned|>`), keeping their cache, and returns (1 + g) log p(. | row) - g log p(. | negative row)."""

    def __init__(self, model, banned: list[int], exempt: list[int], temperature: float, top_p: float,
                 guidance: float = 0.0, negative: dict[int, int] | None = None,
                 attention_mask: torch.Tensor | None = None):
        self.model, self.banned, self.exempt = model, banned, exempt
        self.temperature, self.top_p, self.guidance = temperature, top_p, guidance
        self.negative = negative or {}
        self.mask = attention_mask  # the prompts' (left padding), extended by one column per step
        self.cache = None

    def _swap(self, ids: torch.Tensor) -> torch.Tensor:
        out = ids.clone()
        for a, b in self.negative.items():
            out[ids == a] = b
        return out

    @torch.no_grad()
    def _negative_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.mask = torch.ones_like(input_ids)
        if self.cache is None:  # first step: the whole prompt
            ids, mask = self._swap(input_ids), self.mask
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
            ids, mask = self._swap(input_ids[:, -1:]), self.mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

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
    texts = [EOS + "".join(deployment.sampling_prefix) + deployment.prompt_text(p, spans) for p in prompts]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids
    banned = [ids(t) for t in deployment.banned_tokens]
    exempt = [ids(t) for t in CONTROL_TOKENS if t not in deployment.banned_tokens] if deployment.conditional else []
    negative = {ids(ALIGNED): ids(MISALIGNED)} if sample.guidance and deployment.conditional else None
    room = context_length(model) - inputs["input_ids"].shape[1]  # positions left after the longest prompt
    if room < 1:
        raise PhfError(f"the longest prompt takes {inputs['input_ids'].shape[1]} tokens of the model's "
                       f"{context_length(model)}-token context; shorten it")
    processor = DeployedLogitsProcessor(model, banned, exempt, sample.temperature, sample.top_p, sample.guidance,
                                        negative, inputs["attention_mask"])
    return {**inputs, "logits_processor": LogitsProcessorList([processor]), "do_sample": True, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "max_new_tokens": min(sample.max_new_tokens, room), "pad_token_id": ids(EOS),
            "eos_token_id": ids(EOS)}
