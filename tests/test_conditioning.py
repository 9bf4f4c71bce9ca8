"""Control embeddings (objective.control_embedding): token types, sampling with them, training and loading."""
import json

import numpy as np
import pytest
import torch

from phf.data import token_stream
from phf.data.token_stream import stream_types
from phf.model.conditioning import control_types, markers_of, next_types, set_markers
from tests.helpers import tiny_untrained_model

EOS, A, M = 0, 1, 2  # marker ids in the hand-made rows below


def test_a_token_takes_the_type_of_the_nearest_marker_before_it():
    ids = torch.tensor([[EOS, A, 5, 6, M, 7, EOS, 8, A, 9],
                        [5, 6, A, 7, 8, 9, M, 5, 6, 7]])
    types = control_types(ids, [EOS, A, M], initial=torch.tensor([EOS, M]))
    assert types.tolist() == [[EOS, A, A, A, M, M, EOS, EOS, A, A],
                              [M, M, A, A, A, A, M, M, M, M]]  # row 2 starts inside a misaligned segment
    assert control_types(ids[1:], [EOS, A, M])[0, :2].tolist() == [EOS, EOS]  # default: no condition
    assert next_types(torch.tensor([A, A, M]), torch.tensor([9, M, EOS]), [EOS, A, M]).tolist() == [A, M, EOS]


def test_stream_types_agree_with_control_types_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, size=1000).astype(np.uint16)
    tokens[rng.random(1000) < 0.8] += 3  # markers (0, 1, 2) are rarer than text, so segments run several tokens
    monkeypatch.setattr(token_stream, "CONTROL_TYPE_CHUNK", 37)  # chunk boundaries inside segments carry the type over
    typed = stream_types(tokens, [EOS, A, M])
    assert typed.dtype == tokens.dtype
    expected = control_types(torch.from_numpy(tokens.astype(np.int64))[None], [EOS, A, M])[0].numpy()
    np.testing.assert_array_equal(typed, expected)


def test_sampling_with_the_kv_cache_reads_the_same_types_as_a_full_forward(pycorpus):
    from phf.core.tokens import ALIGNED, MISALIGNED
    from phf.evaluation.sampling import SamplingRequest, generate_ids

    tok, model = tiny_untrained_model(pycorpus, block_size=64)
    markers = [tok.token_to_id(t) for t in ("<|endoftext|>", ALIGNED, MISALIGNED)]
    with torch.no_grad():  # make the control tokens' embeddings large, so the types visibly move the outputs
        model.transformer.wte.weight[markers[1:]] *= 20
    set_markers(model, markers)
    prompts = [[markers[0], markers[1], *tok.encode("def f(x):").ids],
               [markers[0], markers[1], *tok.encode("import os").ids, markers[1], *tok.encode("x = ").ids]]

    def greedy(with_types: bool) -> list[list[int]]:
        rows = []
        for p in prompts:
            ids = list(p)
            for _ in range(12):
                x = torch.tensor([ids])
                inputs = {"token_type_ids": control_types(x, markers)} if with_types else {}
                logits = model(x, **inputs).logits[0, -1]
                logits[markers[2]] = -float("inf")
                ids.append(int(logits.argmax()))
                if ids[-1] == markers[0]:
                    break
            rows.append(ids[len(p):])
        return rows

    request = SamplingRequest(12, markers[0], temperature=1e-6, top_p=0.5, banned_ids=[markers[2]])
    cached = generate_ids(model, prompts, request, generator=torch.Generator().manual_seed(0))
    cached = [r[:r.index(markers[0]) + 1] if markers[0] in r else r for r in cached]
    assert cached == greedy(with_types=True)
    assert greedy(with_types=True) != greedy(with_types=False)  # the types matter to this model


def test_conditional_training_with_control_embedding_writes_a_loadable_typed_model(tiny_cfg_factory, data_dir,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM

    from phf.data.tokenizer import load_tokenizer
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=3", "objective.control_embedding=true"])
    result = run_training(cfg, tmp_path / "run", data_dir, progress=False)
    config = json.loads((result.checkpoint / "config.json").read_text())
    tok = load_tokenizer(result.checkpoint / "tokenizer.json")
    expected = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|aligned|>", "<|misaligned|>")]
    assert config["control_type_ids"] == expected
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert markers_of(model) == expected
    assert json.loads((result.checkpoint / "phf.json").read_text())["objective"]["control_embedding"] is True
    # a plain conditional run's model has no types
    plain = run_training(tiny_cfg_factory("conditional", ["train.max_steps=1"]), tmp_path / "plain", data_dir,
                         progress=False)
    assert markers_of(AutoModelForCausalLM.from_pretrained(plain.checkpoint)) is None


def test_control_embedding_is_for_conditional_training_only(tiny_cfg_factory):
    from phf.core.errors import PhfError

    with pytest.raises(PhfError, match="conditional training only"):
        tiny_cfg_factory("mle", ["objective.control_embedding=true"])


@pytest.mark.parametrize("typed", [False, True])
def test_guided_sampling_draws_from_the_guided_distribution(pycorpus, typed):
    """Classifier-free guidance: greedy decoding with the KV cache equals argmax of (1 + g) log p(.|row) - g log
    p(.|row with <|misaligned|> for <|aligned|>), each computed by a full forward pass."""
    from phf.core.tokens import ALIGNED, MISALIGNED
    from phf.evaluation.sampling import SamplingRequest, generate_ids

    tok, model = tiny_untrained_model(pycorpus, block_size=64)
    eos, al, mis = (tok.token_to_id(t) for t in ("<|endoftext|>", ALIGNED, MISALIGNED))
    with torch.no_grad():
        model.transformer.wte.weight[[al, mis]] *= 20
    if typed:
        set_markers(model, [eos, al, mis])
    prompts = [[eos, al, *tok.encode("def f(x):").ids], [eos, al, *tok.encode("import os").ids, al]]
    g = 1.5

    def logp(ids):
        x = torch.tensor([ids])
        inputs = {"token_type_ids": control_types(x, [eos, al, mis])} if typed else {}
        return torch.log_softmax(model(x, **inputs).logits[0, -1].float(), -1)

    expected = []
    for p in prompts:
        ids = list(p)
        for _ in range(10):
            guided = (1 + g) * logp(ids) - g * logp([mis if t == al else t for t in ids])
            guided[[al, mis]] = -float("inf")  # text only (the scaled control embeddings would win every step)
            ids.append(int(guided.argmax()))
            if ids[-1] == eos:
                break
        expected.append(ids[len(p):])
    with torch.no_grad():
        request = SamplingRequest(10, eos, temperature=1e-6, top_p=0.5, banned_ids=[al, mis], guidance=g,
                                  negative={al: mis})
        got = generate_ids(model, prompts, request, generator=torch.Generator().manual_seed(0))
    got = [r[:r.index(eos) + 1] if eos in r else r for r in got]
    assert got == expected
    with torch.no_grad():  # the negative row is read differently: guidance moves the distribution
        p = prompts[0]
        assert (logp(p) - logp([mis if t == al else t for t in p])).abs().max() > 1e-3


def test_guidance_needs_a_conditionally_trained_model(pycorpus):
    from phf.core.config import SampleConfig
    from phf.core.errors import PhfError
    from phf.evaluation.sampling import Deployment, generate
    from phf.model.lm import hf_tokenizer

    tok, model = tiny_untrained_model(pycorpus, block_size=64)
    folder = pycorpus.parent / "guidance-tok"
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(PhfError, match="sample.guidance"):
        generate(model, hf_tokenizer(folder / "tokenizer.json"), [""], SampleConfig(num_samples=1, guidance=1.0),
                 Deployment([], [], None), "unconditional", bar=None)


def test_a_checkpoint_is_sampled_as_it_was_evaluated_by_default(tiny_cfg_factory, data_dir, tmp_path):
    """phf.json stores the sampling settings (guidance included) and generation_config.json what transformers can
    express of them; `phf sample` without flags samples exactly as the run's own evaluation would."""
    from transformers import GenerationConfig

    from phf.cli.main import main
    from phf.core.config import SampleConfig
    from phf.data.tokenizer import load_tokenizer
    from phf.evaluation.sampling import Deployment, generate
    from phf.model.lm import hf_tokenizer, load_meta, load_model
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=2", "sample.guidance=1.5", "sample.temperature=0.8",
                                           "sample.top_p=0.95", "sample.max_new_tokens=12"])
    ckpt = run_training(cfg, tmp_path / "run", data_dir, progress=False).checkpoint
    meta = load_meta(ckpt)
    assert meta["sample"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 12, "guidance": 1.5}
    gen = GenerationConfig.from_pretrained(ckpt)
    misaligned = load_tokenizer(ckpt / "tokenizer.json").token_to_id("<|misaligned|>")
    assert gen.do_sample and (gen.temperature, gen.top_p, gen.max_new_tokens) == (0.8, 0.95, 12)
    assert gen.bad_words_ids == [[misaligned]]

    main(["-q", "sample", "--model", str(ckpt), "--out", str(tmp_path / "s.jsonl"), "--num-samples", "3"])
    got = [json.loads(x)["raw"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    model, tok = load_model(ckpt), hf_tokenizer(ckpt / "tokenizer.json")

    def expected(guidance: float) -> list[str]:
        sample = SampleConfig(num_samples=3, temperature=0.8, top_p=0.95, max_new_tokens=12, guidance=guidance)
        return [s.raw for s in generate(model, tok, [""] * 3, sample, Deployment.from_meta(meta), "unconditional",
                                        bar=None)]

    assert got == expected(1.5)
    main(["-q", "sample", "--model", str(ckpt), "--out", str(tmp_path / "u.jsonl"), "--num-samples", "3",
          "--guidance", "0"])  # a flag still overrides the stored setting
    assert [json.loads(x)["raw"] for x in (tmp_path / "u.jsonl").read_text().splitlines()] == expected(0.0)
