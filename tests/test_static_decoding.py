"""The static decode path (phf.model.decoding's Static*Decoder, phf.evaluation.sampling's StaticSampling): its
logits against a full forward pass at every step, its draws against the distribution they must come from, and
the property that lets a GPU capture its step as a CUDA graph: no host value read, the same shapes every step."""
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from phf.evaluation.sampling import (
    SamplingRequest,
    StaticSampling,
    generate_ids,
    nucleus_mask,
    sample_static,
)
from phf.model.conditioning import control_types, set_markers
from phf.model.decoding import StaticGpt2Decoder, StaticHfDecoder, make_decoder
from tests.test_decoding import PROMPTS, VOCAB, full_forward_logits, nucleus, tiny

# reading a tensor's value on the host (a GPU sync), or making a tensor from host data inside a step
HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
              "tensor", "masked_select", "unique"}


class Recorder(TorchFunctionMode):
    """Every torch call made inside it: its name, the shape of its result, and the host reads among them
    (boolean-mask indexing included: its result's shape depends on the data)."""

    def __init__(self):
        super().__init__()
        self.calls, self.host_reads = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS or (name in ("__getitem__", "__setitem__") and len(args) > 1
                                  and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool):
            self.host_reads.append(name)
        out = func(*args, **(kwargs or {}))
        self.calls.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


@pytest.mark.parametrize("arch,kind,expected", [
    ("gpt2", "static", StaticGpt2Decoder), ("gpt2-untied", "static", StaticGpt2Decoder),
    ("gpt2", "static-hf", StaticHfDecoder), ("llama", "static", StaticHfDecoder),
    ("gpt_neox", "static", StaticHfDecoder), ("llama-eager", "static", StaticHfDecoder),
    ("gpt2-buckets", "static", StaticGpt2Decoder)])
def test_every_static_decoder_step_equals_a_full_forward_pass(arch, kind, expected, monkeypatch):
    """Prompts of 2 to 7 tokens side by side (left-padded): every row's logits equal the model's own forward pass
    over that row's whole text, at the prefill and at every step; rows that keep reading <|endoftext|> after they
    end (as finished rows do) too. GPT-2's attention reads the cache in buckets of slots (of 4 here)."""
    if arch == "gpt2-buckets":
        monkeypatch.setattr(StaticGpt2Decoder, "SPAN_BUCKET", 4)
    model = tiny(arch.removesuffix("-eager").removesuffix("-buckets"))
    if arch.endswith("-eager"):  # an additive float mask instead of sdpa's boolean one
        model.config._attn_implementation = "eager"
    dec = make_decoder(model, len(PROMPTS), 7 + 9, kind)
    assert isinstance(dec, expected)
    rows = [list(p) for p in PROMPTS]
    logits = dec.prefill(rows)
    g = torch.Generator().manual_seed(1)
    spans = []
    for step in range(9):
        for r, ids in enumerate(rows):
            torch.testing.assert_close(logits[r], full_forward_logits(model, ids), atol=2e-5, rtol=1e-4)
        tok = torch.randint(1, VOCAB, (len(rows),), generator=g)
        tok[1] = 0 if step >= 2 else tok[1]  # row 1 has ended: it reads <|endoftext|> from here on
        for ids, t in zip(rows, tok.tolist()):
            ids.append(t)
        dec.span = dec.span_at(7 + step)
        spans.append(dec.span)
        logits = dec.step(tok)
    if arch == "gpt2-buckets":
        assert spans == [8] + [12] * 4 + [16] * 4


def greedy_reference(model, prompts, steps, eos, banned=(), guidance=0.0, negative=None, markers=None):
    """Greedy decoding by full forward passes: argmax of (1 + g) log p(.|row) - g log p(.|negative row), banned
    tokens excluded, control types recomputed over the whole text."""
    def logp(ids):
        x = torch.tensor([ids])
        extra = {"token_type_ids": control_types(x, markers)} if markers else {}
        with torch.no_grad():
            return torch.log_softmax(model(x, **extra).logits[0, -1].float(), -1)

    rows = []
    for p in prompts:
        ids = list(p)
        for _ in range(steps):
            scores = logp(ids)
            if guidance:
                scores = (1 + guidance) * scores - guidance * logp([negative.get(t, t) for t in ids])
            scores[list(banned)] = -float("inf")
            ids.append(int(scores.argmax()))
            if ids[-1] == eos:
                break
        rows.append(ids[len(p):])
    return rows


def until_eos(rows, eos):
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.parametrize("arch,kind,check_every", [
    ("gpt2", "static", 3), ("gpt2", "static", 0), ("gpt2", "static-hf", 64), ("llama", "static", 3),
    ("llama", "static", 0), ("gpt_neox", "static", 3), ("gpt_neox", "static", 0), ("gpt2-buckets", "static", 3)])
def test_static_greedy_sampling_equals_full_forward_greedy_decoding(arch, kind, check_every, monkeypatch):
    """Rows end at different steps; finished rows are masked, and the early stop (checked every 3 steps, or never)
    cuts nothing short; GPT-2 also with its attention reading the cache in buckets of 8 slots."""
    if arch == "gpt2-buckets":
        monkeypatch.setattr(StaticGpt2Decoder, "SPAN_BUCKET", 8)
    model = tiny(arch.removesuffix("-buckets"))
    eos = greedy_reference(model, PROMPTS[:1], 5, -1)[0][4]  # a token row 0 draws at its 5th step ends a row
    expected = greedy_reference(model, PROMPTS, 20, eos)
    assert len({len(r) for r in expected}) > 1 and any(len(r) < 20 for r in expected)  # rows end early
    got = generate_ids(model, PROMPTS, SamplingRequest(20, eos, temperature=1e-6, top_p=0.5),
                       generator=torch.Generator().manual_seed(0), decoder=kind, check_every=check_every)
    assert all(len(r) == 20 for r in got)
    assert until_eos(got, eos) == expected


@pytest.mark.parametrize("arch,typed", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_static_guided_sampling_with_banned_tokens_and_control_types_equals_full_forward(arch, typed):
    """Classifier-free guidance (negative rows with <|aligned|> read as <|misaligned|>), banned tokens and, for a
    model with control embeddings, each token's control type: greedy draws equal the full-forward reference."""
    model = tiny(arch)
    eos, al, mis = 0, 5, 6
    with torch.no_grad():  # make the control tokens matter to the model (as types, scaled down not to swamp it)
        model.get_input_embeddings().weight[[al, mis]] *= 0.3 if typed else 20
    markers = [eos, al, mis] if typed else None
    if typed:
        set_markers(model, markers)
    prompts = [[eos, al, 9, 13, 40], [eos, al, 22, al, 31]]
    expected = greedy_reference(model, prompts, 10, eos, (al, mis), 1.5, {al: mis}, markers)
    request = SamplingRequest(10, eos, temperature=1e-6, top_p=0.5, banned_ids=[al, mis], guidance=1.5,
                              negative={al: mis})
    got = generate_ids(model, prompts, request, generator=torch.Generator().manual_seed(0), decoder="static")
    assert until_eos(got, eos) == expected
    unguided = greedy_reference(model, prompts, 10, eos, (al, mis), 0.0, None, markers)
    assert unguided != expected  # guidance changes the draws of this model
    if typed:  # and so do the types
        assert unguided != greedy_reference(model, prompts, 10, eos, (al, mis))


@pytest.mark.parametrize("exempt", [(), (0,), (3, 4)])
def test_sample_static_draws_the_exact_nucleus(exempt):
    probs = [0.40, 0.25, 0.15, 0.12, 0.05, 0.03]
    logits = torch.tensor(probs).log().repeat(40000, 1)
    is_exempt = torch.zeros(6, dtype=torch.bool)
    is_exempt[list(exempt)] = True
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    freq = Counter(sample_static(logits, 1.0, 0.7, u, is_exempt if exempt else None).tolist())
    want = nucleus(probs, 0.7, exempt)
    assert set(freq) == set(want)
    for i, p in want.items():
        assert freq[i] / 40000 == pytest.approx(p, abs=0.01)


def test_sample_static_draws_only_from_nucleus_mask_and_never_a_banned_token():
    """Random distributions with ties and zero-probability (banned) tokens, exempt tokens among them: every draw
    is in nucleus_mask's set, at several temperatures and nucleus sizes."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 50, generator=g).round(decimals=1)  # rounding makes ties
    logits[:, [7, 8]] = -float("inf")  # banned
    exempt = [2, 7]  # an exempt token may be banned too: it still has no mass
    is_exempt = torch.zeros(50, dtype=torch.bool)
    is_exempt[exempt] = True
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.3), (1.3, 1.0)):
        for seed in range(5):
            u = torch.rand(300, generator=torch.Generator().manual_seed(seed))
            tok = sample_static(logits, temperature, top_p, u, is_exempt)
            probs = torch.softmax(logits / temperature, -1)
            allowed = nucleus_mask(probs, top_p, exempt) if top_p < 1 else probs > 0
            assert allowed[torch.arange(300), tok].all()
            assert not torch.isin(tok, torch.tensor([7, 8])).any()


def test_static_sampling_draws_from_the_guided_nucleus_at_every_step():
    """Sampling at temperature 0.8, top-p 0.6 with guidance, banned and exempt tokens: every drawn token is one
    the guided distribution's nucleus (exempt tokens outside it) allows, recomputed by full forward passes."""
    model = tiny("llama")
    eos, al, mis = 0, 5, 6
    prompts = [[eos, al, 9], [eos, al, 22, 31, 4]]
    exempt, banned, g = [al, 11], [mis], 1.0
    request = SamplingRequest(12, -1, 0.8, 0.6, banned, guidance=g, negative={al: mis}, exempt=exempt)
    rows = generate_ids(model, prompts, request, torch.Generator().manual_seed(3), decoder="static")
    for p, new in zip(prompts, rows):
        ids = list(p)
        for t in new:
            pos = torch.log_softmax(full_forward_logits(model, ids), -1)
            neg = torch.log_softmax(full_forward_logits(model, [mis if i == al else i for i in ids]), -1)
            scores = (1 + g) * pos - g * neg
            scores[banned] = -float("inf")
            allowed = nucleus_mask(torch.softmax(scores / 0.8, -1)[None], 0.6, exempt)[0]
            assert allowed[t] and t != mis
            ids.append(t)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_static_step_reads_no_host_value_and_repeats_the_same_shapes(arch):
    """What a CUDA graph needs of a step (sample, record, forward): no value read on the host, no tensor made from
    host data, and the same operations on the same shapes at every step. The dynamic path reads host values at
    every step (what keeps its kernel launches from running ahead of a GPU)."""
    model = tiny(arch)
    eos, al, mis = 0, 5, 6
    if arch == "gpt2":
        set_markers(model, [eos, al, mis])
    prompts = [[eos, al, 9], [eos, al, 22, 31, 4], [eos, al]]
    request = SamplingRequest(8, eos, 0.8, 0.6, [mis], 1.0, {al: mis}, [al])
    sampling = StaticSampling(model, prompts, request, torch.Generator().manual_seed(0), "static")
    sampling._prefill()
    steps = []
    for _ in range(3):
        with Recorder() as rec:
            sampling._step()
        assert rec.host_reads == []
        steps.append(rec.calls)
    assert steps[0] == steps[1] == steps[2]

    with Recorder() as rec:
        generate_ids(model, prompts, replace(request, eos_id=-1), torch.Generator().manual_seed(0), decoder="auto")
    assert len([r for r in rec.host_reads if r != "tensor"]) >= 3 * 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_on_a_gpu_the_captured_step_replays_without_a_sync_and_draws_what_the_eager_step_draws(arch):
    """The graph's draws equal the eager static path's with the same seed (guidance, banned and exempt tokens), and
    replaying the graph makes the host wait for nothing (torch.cuda.set_sync_debug_mode raises on a sync)."""
    from phf.evaluation.sampling import _run_and_capture

    model = tiny(arch).cuda()
    eos, al, mis = 0, 5, 6
    prompts = [[eos, al, 9], [eos, al, 22, 31, 4], [eos, al]]
    request = SamplingRequest(30, -1, 0.8, 0.6, [mis], guidance=1.0, negative={al: mis}, exempt=[al])

    def draws(cuda_graph: bool):
        return generate_ids(model, prompts, request, torch.Generator("cuda").manual_seed(0), decoder="static",
                            cuda_graph=cuda_graph)

    assert draws(True) == draws(False)
    sampling = StaticSampling(model, prompts, request, torch.Generator("cuda").manual_seed(0), "static")
    sampling._prefill()
    sampling.dec.span = sampling.dec.span_at(sampling.width)
    replay = _run_and_capture(sampling._step, torch.device("cuda"))
    assert replay is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(sampling.step_index) == 6


def test_the_static_decoder_refuses_what_its_mask_cannot_express():
    """Sliding-window attention or a flash-attention kernel: a one-line error naming the way out (decoder=hf);
    `auto` on a GPU keeps such a model on the dynamic path."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from phf.model.decoding import static_unsupported

    config = MistralConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                           intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert "sliding window" in static_unsupported(model)
    with pytest.raises(ValueError, match="use decoder=hf"):
        make_decoder(model, 2, 10, "static")
    llama = tiny("llama")
    assert static_unsupported(llama) is None and static_unsupported(tiny("gpt2")) is None
    llama.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in static_unsupported(llama)
