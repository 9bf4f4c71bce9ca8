"""Decoders (phf.model.decoding) against a full forward pass of the model, for each supported architecture, and the
nucleus sampler against the distribution it must draw from."""
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from phf.evaluation.sampling import SamplingRequest, generate_ids, sample_next
from phf.model.decoding import Gpt2Decoder, HfDecoder, context_length, fast_gpt2, make_decoder

VOCAB = 97


def tiny(arch: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, **common)
    elif arch == "gpt2-untied":
        config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, tie_word_embeddings=False, **common)
    elif arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, max_position_embeddings=64, **common)
    else:
        config = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                               max_position_embeddings=64, **common)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[0, 5, 9, 13], [0, 7], [0, 22, 31, 4, 8, 60, 2], [0, 5, 9, 13]]


def full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch,kind", [("gpt2", "gpt2"), ("gpt2-untied", "gpt2"), ("gpt2", "hf"), ("llama", "hf"),
                                       ("gpt_neox", "hf")])
def test_every_decoder_step_equals_a_full_forward_pass(arch, kind):
    """Prefill, steps, then dropping rows mid-way (and reordering them): every row's logits equal the model's own
    forward pass over that row's whole text, rows of different lengths side by side."""
    model = tiny(arch)
    dec = make_decoder(model, len(PROMPTS), 40, kind)
    assert isinstance(dec, Gpt2Decoder if kind == "gpt2" else HfDecoder)
    rows = [list(p) for p in PROMPTS]
    logits = dec.prefill(rows)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        for r, ids in enumerate(rows):
            torch.testing.assert_close(logits[r], full_forward_logits(model, ids), atol=2e-5, rtol=1e-4)
        if step == 3:  # drop row 1, and swap the order of the others
            keep = torch.tensor([3, 0, 2])
            dec.keep(keep)
            rows = [rows[i] for i in keep.tolist()]
        tok = torch.randint(1, VOCAB, (len(rows),), generator=g)
        for ids, t in zip(rows, tok.tolist()):
            ids.append(t)
        logits = dec.step(tok)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_greedy_sampling_equals_full_forward_greedy_decoding(arch):
    """generate_ids at temperature ~0 is greedy decoding; rows that end (<|endoftext|>, id 0) early are dropped."""
    model = tiny(arch)
    eos = 3
    expected = []
    for p in PROMPTS:
        ids = list(p)
        for _ in range(20):
            ids.append(int(full_forward_logits(model, ids).argmax()))
            if ids[-1] == eos:
                break
        expected.append(ids[len(p):])
    got = generate_ids(model, PROMPTS, SamplingRequest(20, eos, temperature=1e-6, top_p=0.5),
                       generator=torch.Generator().manual_seed(0))
    got = [r[:r.index(eos) + 1] if eos in r else r for r in got]
    assert got == expected


def test_the_fast_decoder_is_used_for_gpt2_only_and_context_length_is_read_per_architecture():
    assert fast_gpt2(tiny("gpt2")) and not fast_gpt2(tiny("llama"))
    assert isinstance(make_decoder(tiny("llama"), 2, 10), HfDecoder)
    assert [context_length(tiny(a)) for a in ("gpt2", "llama", "gpt_neox")] == [64, 64, 64]
    odd = tiny("gpt2")
    odd.config.scale_attn_by_inverse_layer_idx = True  # arithmetic the fast decoder does not do
    assert not fast_gpt2(odd) and isinstance(make_decoder(odd, 2, 10), HfDecoder)


def nucleus(probs: list[float], top_p: float, exempt=()) -> dict[int, float]:
    """The distribution nucleus sampling must draw from, by hand: sort the non-exempt tokens, keep them while the
    mass before them is below top_p of theirs, add the exempt tokens, renormalise."""
    text = {i: p for i, p in enumerate(probs) if i not in exempt}
    kept, before, limit = {}, 0.0, top_p * sum(text.values())
    for i, p in sorted(text.items(), key=lambda kv: -kv[1]):
        if before < limit and p > 0:
            kept[i] = p
        before += p
    kept.update({i: probs[i] for i in exempt})
    total = sum(kept.values())
    return {i: p / total for i, p in kept.items()}


@pytest.mark.parametrize("rounds", [4, 0])  # 0: every row drawn by the sorting fallback
@pytest.mark.parametrize("exempt", [(), (0,), (3, 4)])
def test_sample_next_draws_the_exact_nucleus(rounds, exempt):
    probs = [0.40, 0.25, 0.15, 0.12, 0.05, 0.03]
    logits = torch.tensor(probs).log().repeat(40000, 1)
    draws = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0), exempt=list(exempt), rounds=rounds)
    freq = Counter(draws.tolist())
    want = nucleus(probs, 0.7, exempt)
    assert set(freq) == set(want)
    for i, p in want.items():
        assert freq[i] / 40000 == pytest.approx(p, abs=0.01)


def test_tiny_top_p_over_a_flat_distribution_falls_back_to_sorting_and_ties_are_all_kept():
    """A flat distribution: every token is tied with the most likely one, so the nucleus is the whole vocabulary
    (ties at the edge are all in); a flat one with a winner that holds 3% keeps only the winner (a draw finds it
    3% of the time, so most rows are drawn by the sorting fallback, and the two must agree)."""
    flat = torch.zeros(3000, 50)
    assert len(set(sample_next(flat, 1.0, 0.01, torch.Generator().manual_seed(0)).tolist())) == 50
    peaked = torch.zeros(500, 5000)
    peaked[:, 7] = 5.0  # e^5 / (e^5 + 4999) = 0.029: alone in a 1% nucleus
    assert set(sample_next(peaked, 1.0, 0.01, torch.Generator().manual_seed(0)).tolist()) == {7}


@pytest.mark.parametrize("guided", [False, True])
def test_the_sampling_benchmark_runs_all_three_samplers_and_prints_their_ratios(guided, pycorpus):
    """phf bench sample: phf, the sampler before and transformers generate, plain and guided, on one model."""
    from phf.core.config import SampleConfig
    from phf.core.tokens import ALIGNED, EOS, MISALIGNED
    from benchmarks.bench import _sample_tokens_per_s, format_figures
    from tests.helpers import tiny_untrained_model

    tok, model = tiny_untrained_model(pycorpus, block_size=64)
    ids = [tok.token_to_id(t) for t in (EOS, ALIGNED, MISALIGNED)]
    figures = {f"{path}_b4{'_guided' if guided else ''}": _sample_tokens_per_s(path, model, 4, 6, guided,
                                                                              SampleConfig(), *ids)
               for path in ("phf", "before", "generate")}
    assert all(v > 0 for v in figures.values())
    text = format_figures({"machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1, "platform": "p"},
                           "sample": {"temperature": 1.0, "top_p": 0.9, "demo_train_steps": 0, "peak_rss_mb": 1,
                                      "models": {"demo": {"parameters": 1e6, "new_tokens": 6, **figures}}}})
    assert "demo (1.0M), batch 4" in text and "x before" in text and "x generate" in text


@pytest.mark.parametrize("batch_size", [0, 2])
def test_generate_serves_every_prompt_whatever_the_batch(batch_size, pycorpus):
    """sample.batch_size 0 (all prompts at once, as memory allows) or smaller than the prompts (several batches)."""
    from phf.core.config import SampleConfig
    from phf.evaluation.sampling import Deployment, generate
    from phf.model.lm import hf_tokenizer
    from tests.helpers import tiny_untrained_model

    tok, model = tiny_untrained_model(pycorpus, block_size=64)
    path = pycorpus.parent / f"tok-{batch_size}.json"
    tok.save(str(path))
    prompts = ["", "def f(x):\n", "import os\n", "", "x = 1\n"]
    samples = generate(model, hf_tokenizer(path), prompts, SampleConfig(max_new_tokens=5, batch_size=batch_size),
                       Deployment([], [], None), "prompted", bar=None)
    assert [s.prompt for s in samples] == prompts and all(s.num_tokens <= 5 for s in samples)
