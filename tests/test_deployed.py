"""Plain transformers `generate` with phf's processor draws from the distribution phf's sampler draws from."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phf.analysis.ending import nucleus_probs
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, EOS, MISALIGNED
from phf.evaluation.deployed import deployed_generate_inputs


@pytest.fixture(scope="module")
def guided_checkpoint(tiny_cfg_factory, data_dir, tmp_path_factory):
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=3", "sample.guidance=1.5", "sample.temperature=0.8",
                                           "sample.top_p=0.8", "sample.max_new_tokens=6"])
    return run_training(cfg, tmp_path_factory.mktemp("deployed") / "run", data_dir, progress=False).checkpoint


def test_generate_with_the_processor_draws_phfs_guided_nucleus(guided_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(guided_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(guided_checkpoint)
    eos, al, mis = (tok.convert_tokens_to_ids(t) for t in (EOS, ALIGNED, MISALIGNED))
    inputs = deployed_generate_inputs(model, tok, guided_checkpoint, ["", "def f(x):\n"])
    start = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.generate(**inputs, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] - start <= 6  # the stored max_new_tokens

    def logp(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)

    checked = 0
    for r in range(out.sequences.shape[0]):
        pad = int((inputs["attention_mask"][r] == 0).sum())
        row = out.sequences[r].tolist()
        assert row[pad:pad + 2] == [eos, al]  # the deployed prefix: <|endoftext|><|aligned|>
        for t, scores in enumerate(out.scores):
            prefix = row[pad:start + t]
            if t and row[start + t - 1] == eos:
                break
            guided = 2.5 * logp(prefix) - 1.5 * logp([mis if x == al else x for x in prefix])
            guided[mis] = -float("inf")
            want = nucleus_probs(torch.softmax(guided / 0.8, -1)[None], 0.8, [al])[0]  # <|aligned|> outside the nucleus
            got = torch.softmax(scores[r].float(), -1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 4


def test_a_model_with_control_embeddings_is_refused_with_a_pointer_to_phf_sample(tiny_cfg_factory, data_dir,
                                                                                  tmp_path):
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=1", "objective.control_embedding=true"])
    ckpt = run_training(cfg, tmp_path / "run", data_dir, progress=False).checkpoint
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    with pytest.raises(PhfError, match="phf sample --model"):
        deployed_generate_inputs(model, tok, ckpt, [""])


def test_new_tokens_fit_the_context_and_a_prompt_that_fills_it_is_an_error(guided_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(guided_checkpoint)
    tok = AutoTokenizer.from_pretrained(guided_checkpoint)
    context = model.config.n_positions
    short = deployed_generate_inputs(model, tok, guided_checkpoint, ["x = 1\n" * (context // 8)])
    assert short["input_ids"].shape[1] + short["max_new_tokens"] <= context
    with pytest.raises(PhfError, match="context; shorten it"):
        deployed_generate_inputs(model, tok, guided_checkpoint, ["x = 1\n" * context])
