"""The KL(reference || model) estimator against an exact KL on models small enough to enumerate, and the
diversity metrics against hand counts."""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from phf.core.config import ModelConfig, TokenizerConfig
from phf.core.tokens import ALIGNED, EOS
from phf.data.tokenizer import train_tokenizer
from phf.evaluation.evaluate import distinct_n, diversity_metrics, ngram_entropy
from phf.evaluation.kl import DeployedModel, KLReference, kl_estimate
from phf.evaluation.sampling import Deployment, SamplingRequest, generate_ids
from phf.model.lm import build_model

VOCAB, LENGTH, BOS = 5, 3, 0  # token 0 starts every sequence and ends it when sampled


def tiny_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=BOS,
                     eos_token_id=BOS)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharpen the distributions so that the two models differ clearly
        model.lm_head.weight.mul_(40.0)
    return model


def all_outcomes():
    """Every distinct outcome of sampling LENGTH tokens after BOS, stopping at the first BOS (kept)."""
    seen = set()
    for tail in itertools.product(range(VOCAB), repeat=LENGTH):
        cut = list(tail)
        if BOS in cut:
            cut = cut[:cut.index(BOS) + 1]
        seen.add(tuple(cut))
    return [[BOS, *t] for t in sorted(seen)]


@torch.no_grad()
def logp(model, seqs):
    """log p(sequence[1:] | sequence[0]) of each token sequence, one at a time (independent of phf's batching)."""
    out = []
    for s in seqs:
        lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
        out.append(sum(lp[i - 1, s[i]].item() for i in range(1, len(s))))
    return np.array(out)


def test_outcomes_are_a_distribution():
    model = tiny_lm(1)
    p = np.exp(logp(model, all_outcomes()))
    assert p.sum() == pytest.approx(1.0, abs=1e-5)


def test_monte_carlo_kl_matches_exact_kl_on_an_enumerable_model():
    ref, model = tiny_lm(1), tiny_lm(2)
    outcomes = all_outcomes()
    lp_ref, lp_mod = logp(ref, outcomes), logp(model, outcomes)
    exact_bits = float((np.exp(lp_ref) * (lp_ref - lp_mod)).sum() / math.log(2))
    assert exact_bits > 0.05  # the two models really differ

    gen = torch.Generator().manual_seed(0)
    rows = generate_ids(ref, [[BOS]] * 4000, SamplingRequest(LENGTH, BOS, 1.0, 1.0), gen)
    seqs = [[BOS, *(r[:r.index(BOS) + 1] if BOS in r else r)] for r in rows]
    index = {tuple(o): i for i, o in enumerate(outcomes)}  # every sample is one of the enumerated outcomes
    at = np.array([index[tuple(s)] for s in seqs])
    est = kl_estimate(lp_ref[at], lp_mod[at], np.ones(len(seqs)))
    # one "character" per sequence: the estimate is in bits per sequence, like the exact value
    assert abs(est["kl_from_reference_bits"] - exact_bits) < 4 * est["kl_stderr_bits"]
    assert est["kl_stderr_bits"] < 0.2 * exact_bits
    # and the sampler draws from the model's own distribution: empirical frequencies match p_ref
    counts = {tuple(s): 0 for s in outcomes}
    for s in seqs:
        counts[tuple(s)] += 1
    freq = np.array([counts[tuple(s)] for s in outcomes]) / len(seqs)
    assert np.abs(freq - np.exp(lp_ref)).max() < 0.03


def test_kl_estimate_of_identical_models_is_zero():
    d = np.array([-10.0, -3.0, -7.5])
    est = kl_estimate(d, d, np.array([10, 3, 7]))
    assert est["kl_from_reference_bits"] == 0.0
    assert est["kl_samples"] == 3 and est["kl_chars"] == 20


@pytest.fixture(scope="module")
def tok_and_models(pycorpus):
    tok = train_tokenizer([p.read_text() for p in sorted(pycorpus.glob("*.py"))], TokenizerConfig(vocab_size=400))
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=128)
    torch.manual_seed(0)
    a = build_model(cfg, tok.get_vocab_size(), tok.token_to_id(EOS)).eval()
    torch.manual_seed(1)
    b = build_model(cfg, tok.get_vocab_size(), tok.token_to_id(EOS)).eval()
    return tok, a, b


def test_kl_reference_on_text_counts_text_tokens_as_each_model_is_deployed(tok_and_models):
    tok, a, b = tok_and_models
    plain = DeployedModel(a, tok, Deployment([], [], None))
    cond = DeployedModel(b, tok, Deployment([ALIGNED], [], ALIGNED))
    ref = KLReference.sample_from(plain, 6, 40, seed=0, segmenter="lines", progress=False)
    assert len(ref.texts) == 6 and all(ALIGNED not in t for t in ref.texts)
    assert ref.kl(plain)["kl_from_reference_bits"] == pytest.approx(0.0, abs=1e-9)
    # an independent computation for the conditional model: <|aligned|> before each line, text tokens scored
    total = 0.0
    eos, aligned = tok.token_to_id(EOS), tok.token_to_id(ALIGNED)
    for text, lp_ref in zip(ref.texts, ref.logp):
        ids = [eos]
        for line in re.findall(r"[^\n]*\n|[^\n]+$", text):  # only "\n" ends a line (str.splitlines also splits
            # at \x1c-\x1e, \x0b, \x0c, which an untrained model writes)
            ids += [aligned] + tok.encode(line, add_special_tokens=False).ids
        with torch.no_grad():
            lp = torch.log_softmax(b(torch.tensor([ids])).logits[0].float(), -1)
        lp_b = sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)) if ids[i] not in (eos, aligned))
        total += lp_ref - lp_b
    want = total / sum(len(t) for t in ref.texts) / math.log(2)
    assert ref.kl(cond)["kl_from_reference_bits"] == pytest.approx(want, rel=1e-4)


def test_distinct_n_and_entropy_by_hand():
    texts = ["a b a b", "a b c"]
    # words: [a b a b], [a b c]; bigrams: ab ba ab | ab bc -> 5 total, 3 distinct
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    p = np.array([3, 1, 1]) / 5
    assert ngram_entropy(texts, 2) == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert math.isnan(distinct_n([""], 2))
    # a model that repeats itself scores low
    assert diversity_metrics(["x = 1\n"] * 10)["distinct_2"] < diversity_metrics(
        [f"x{i} = {i}\n" for i in range(10)])["distinct_2"]


def test_diversity_from_one_pass_equals_each_metric_on_its_own(pycorpus):
    """diversity_metrics tokenizes the samples once for all four figures: each equals its own function's, exactly."""
    texts = [p.read_text()[:3000] for p in sorted(pycorpus.rglob("*.py"))] + ["", "a b a b", "a b c"]
    d = diversity_metrics(texts)
    assert d == {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                 "distinct_3": distinct_n(texts, 3), "entropy_2_bits": ngram_entropy(texts, 2)}
    assert all(math.isnan(v) for v in diversity_metrics([""]).values())
