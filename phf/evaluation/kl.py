"""Capability as distance from a reference model: a Monte Carlo estimate of KL(reference || model).

The paper sampled GPT-3 and measured how much less likely each feedback-trained model found those samples.
No hub model is reachable here, so the reference is any Hugging Face folder — by default the plain MLE model
of the same sweep:

    KL(ref || model) ~ sum_i [log p_ref(x_i) - log p_model(x_i)] / sum_i chars(x_i),   x_i ~ p_ref

Samples are drawn from the reference's own distribution (temperature 1, no nucleus), `eval.kl_max_new_tokens`
tokens each. Each model reads every sample as it is deployed (a conditional model reads `<|aligned|>` before
each segment) and only the text's own tokens are scored, so models with and without control tokens compare
fairly; the result is in bits per character of sample text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from phf.core.errors import PhfError
from phf.data.segments import get_segmenter
from phf.data.tokenizer import load_tokenizer
from phf.evaluation.loglik import sequence_logprobs
from phf.evaluation.sampling import Deployment, SamplingRequest, generate_ids, strip_control
from phf.model.decoding import context_length
from phf.model.finetune import resolve_model_folder
from phf.model.lm import load_meta, load_model


@dataclass
class DeployedModel:
    """A model with its tokenizer and the conditioning it is deployed with."""
    model: torch.nn.Module
    tokenizer: object  # a `tokenizers.Tokenizer`
    deployment: Deployment

    @classmethod
    def load(cls, folder: str | Path) -> "DeployedModel":
        folder = resolve_model_folder(folder)
        if not (folder / "tokenizer.json").exists():
            raise PhfError(f"{folder} has no tokenizer.json; the KL estimate needs the model's own tokenizer")
        return cls(load_model(folder), load_tokenizer(folder / "tokenizer.json"),
                   Deployment.from_meta(load_meta(folder)))


def text_logprobs(dm: DeployedModel, texts: Sequence[str], segmenter: str, batch_size: int | None = None,
                  guidance: float = 0.0) -> np.ndarray:
    """Log-likelihood (nats) of each text's own tokens under the deployed model: <|endoftext|>, then the text with
    the deployment's segment prefix (a conditional model reads <|aligned|> before each segment); control tokens
    and <|endoftext|> are given, not predicted; with `guidance` g > 0, under the normalised guided distribution.
    fp32: the estimate is a difference of two large numbers. `batch_size`: windows per forward (None: as many as
    the model's device holds, phf.evaluation.loglik.batch_size_for)."""

    return sequence_logprobs(dm.model, dm.tokenizer, texts, dm.deployment.line_prefix, get_segmenter(segmenter),
                             batch_size=batch_size, guidance=guidance,
                             negative=dm.deployment.negative(dm.tokenizer.token_to_id, guidance))


@torch.no_grad()
def reference_samples(ref: DeployedModel, num: int, max_new_tokens: int, seed: int, segmenter: str,
                      batch_size: int | None = None, progress: bool = True) -> list[str]:
    """`num` samples of the reference's own distribution (temperature 1, no nucleus), control tokens removed;
    `batch_size` rows at a time (None: 64 on the CPU, 512 on a GPU, whose decode step costs about the same for
    one row as for hundreds)."""
    tok = ref.tokenizer
    batch_size = batch_size or (64 if next(ref.model.parameters()).device.type == "cpu" else 512)
    eos = tok.eos_id
    banned = [tok.token_to_id(t) for t in ref.deployment.banned_tokens]
    prefix = [eos] + [tok.token_to_id(t) for t in ref.deployment.sampling_prefix]
    max_new_tokens = min(max_new_tokens, context_length(ref.model) - len(prefix))
    gen = torch.Generator(device=next(ref.model.parameters()).device).manual_seed(seed)
    out: list[str] = []
    bar = tqdm(total=num, desc="reference samples", unit="sample", disable=not progress, leave=False)
    while len(out) < num:
        n = min(batch_size, num - len(out))
        rows = generate_ids(ref.model, [prefix] * n, SamplingRequest(max_new_tokens, eos, 1.0, 1.0, banned), gen)
        for row in rows:
            if eos in row:
                row = row[:row.index(eos)]
            out.append(strip_control(tok.decode(row, skip_special_tokens=False)))
        bar.update(n)
    bar.close()
    return out


def kl_estimate(ref_logp: np.ndarray, model_logp: np.ndarray, chars: np.ndarray) -> dict:
    """KL(ref || model) in bits per character from per-sample log-likelihoods (nats), with a standard error
    (delta method for the ratio of sums)."""
    d = np.asarray(ref_logp, np.float64) - np.asarray(model_logp, np.float64)
    c = np.asarray(chars, np.float64)
    n = len(d)
    if n == 0 or c.sum() == 0:
        return {"kl_from_reference_bits": math.nan, "kl_stderr_bits": math.nan, "kl_samples": n}
    kl = d.sum() / c.sum()
    resid = d - kl * c
    se = math.sqrt(resid.var(ddof=1) / n) / c.mean() if n > 1 else math.nan
    return {"kl_from_reference_bits": float(kl / math.log(2)), "kl_stderr_bits": float(se / math.log(2)),
            "kl_samples": n, "kl_chars": int(c.sum())}


class KLReference:
    """Reference samples and their log-likelihood under the reference, computed once and used for every model."""

    def __init__(self, ref: DeployedModel, texts: list[str], segmenter: str):
        self.ref, self.texts, self.segmenter = ref, texts, segmenter
        self.chars = np.array([len(t) for t in texts], dtype=np.float64)
        self.logp = text_logprobs(ref, texts, segmenter)

    @classmethod
    def sample(cls, folder: str | Path, num: int, max_new_tokens: int, seed: int, segmenter: str,
               progress: bool = True) -> "KLReference":
        return cls.sample_from(DeployedModel.load(folder), num, max_new_tokens, seed, segmenter, progress)

    @classmethod
    def sample_from(cls, ref: DeployedModel, num: int, max_new_tokens: int, seed: int, segmenter: str,
                    progress: bool = True) -> "KLReference":
        return cls(ref, reference_samples(ref, num, max_new_tokens, seed, segmenter, progress=progress), segmenter)

    def kl(self, model: DeployedModel, guidance: float = 0.0) -> dict:
        return kl_estimate(self.logp, text_logprobs(model, self.texts, self.segmenter, guidance=guidance), self.chars)
