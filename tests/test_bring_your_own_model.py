"""Models phf did not create: three architectures with three tokenizers of their own, built here offline, finetuned
with conditional training through `phf train --init-from`; a Llama trained from scratch; and the errors of each
path."""
import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from phf.cli.main import main
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, EOS, MISALIGNED
from tests.conftest import tiny_overrides

SAMPLE_TEXT = "def f(x):\n    return x + 1  # twice\n"


def corpus_texts(pycorpus) -> list[str]:
    return [p.read_text() for p in sorted(pycorpus.glob("*.py"))]


def gpt2_tokenizer(texts):
    """Byte-level BPE of 500 tokens whose only special token is a padding token: no end-of-document token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def llama_tokenizer(texts):
    """SentencePiece-style BPE (Metaspace) of 700 tokens with <unk>, <s>, </s> first; eos </s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def neox_tokenizer(texts):
    """A Unigram model of 600 tokens whose special tokens, <|endoftext|> (eos) and <|padding|>, come last."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=598, unk_token="<unk>", special_tokens=["<unk>"],
                                                           show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|padding|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>",
                                   unk_token="<unk>")


def foreign_model(arch: str, texts, folder):
    """A small pretrained-looking causal LM of `arch`, with its own tokenizer, saved as a plain HF folder."""
    tok = {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer, "gpt_neox": neox_tokenizer}[arch](texts)
    n = len(tok)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=n, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=None,
                            eos_token_id=None)
    elif arch == "llama":  # untied, grouped-query attention
        config = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    else:  # untied, with a vocabulary padded past the tokenizer's size, as Pythia's is
        config = GPTNeoXConfig(vocab_size=n + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok, model


def cli(*args) -> int:
    try:
        main(["-q", *args])
    except SystemExit as exc:
        return exc.code
    return 0


def train_args(pycorpus, objective, out, data_dir, *extra):
    args = ["train", "--task", "pep8", "--objective", objective, "--out", str(out),
            "--data-dir", str(data_dir)]
    for o in tiny_overrides(str(pycorpus)) + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-data")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_conditional_finetune_of_a_model_phf_did_not_create(arch, pycorpus, shared_data, tmp_path, caplog):
    from phf.core.config import SampleConfig
    from phf.evaluation.sampling import Deployment, generate
    from phf.training.trainer import tokenizer_source

    original_tok, original = foreign_model(arch, corpus_texts(pycorpus), tmp_path / "base")
    original_vocab = original_tok.get_vocab()
    with caplog.at_level(logging.INFO):
        assert cli(*train_args(pycorpus, "conditional", tmp_path / "ft", shared_data, "train.max_steps=1",
                               "train.lr=1e-9", "train.weight_decay=0", "train.warmup_fraction=0"),
                   "--init-from", str(tmp_path / "base")) == 0
    ckpt = tmp_path / "ft" / "checkpoint"

    # plain transformers loads the folder
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == arch
    # every token the model knew keeps its id, and text encodes as before
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in original_vocab.items())
    assert tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == \
        original_tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    # the end-of-document token is the tokenizer's own; a tokenizer without one got <|endoftext|>, said in the log
    eos = original_tok.eos_token or EOS
    assert tok.eos_token == eos and model.config.eos_token_id == vocab[eos]
    if original_tok.eos_token is None:
        assert "has no end-of-document (eos) token" in caplog.text
    new = [t for t in vocab if t not in original_vocab]
    assert set(new) == {ALIGNED, MISALIGNED} | ({EOS} if original_tok.eos_token is None else set())
    assert min(vocab[t] for t in new) == len(original_vocab)  # appended after the last id
    assert {ALIGNED, MISALIGNED} <= set(tok.all_special_tokens)  # special: never split, skipped when decoding

    # the new rows start at the mean of the original rows (input embeddings, and the output layer when untied)
    new_ids = [vocab[t] for t in new]
    before = [original.get_input_embeddings().weight]
    after = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        before.append(original.get_output_embeddings().weight)
        after.append(model.get_output_embeddings().weight)
    for b, a in zip(before, after):
        assert a.shape[0] >= len(vocab)
        known = torch.tensor(sorted(original_vocab.values()))
        assert torch.allclose(a[known], b[known], atol=1e-5)  # lr 1e-9: the known rows did not move
        if arch == "gpt_neox":  # its padded rows are untrained: the mean is over the rows not taken over
            mean = b[[i for i in range(b.shape[0]) if i not in new_ids]].mean(0)
        else:
            mean = b.mean(0)
        for i in new_ids:
            assert (a[i] - mean).norm() < 0.05 * b.std() * a.shape[1] ** 0.5, (arch, i)
            assert (a[i] - mean).norm() > 0  # with noise, so that the two control tokens differ

    # sampled as deployed: after <|aligned|>, <|misaligned|> banned. At temperature 5 the distribution is nearly
    # flat, so 128 x 64 draws would hold ~14 of each control token if it were not banned.
    meta = json.loads((ckpt / "phf.json").read_text())
    cfg = SampleConfig(num_samples=128, max_new_tokens=60, temperature=5.0, top_p=1.0, batch_size=128)
    samples = generate(model, tok, [""] * 128, cfg, Deployment.from_meta(meta), "unconditional", bar=None)
    raw = "".join(s.raw for s in samples)
    assert raw.count(MISALIGNED) == 0 and raw.count(ALIGNED) > 0

    # a resumed run reads with the very tokenizer file it started with; runs of other tokenizers share the data
    # folder's one scored corpus
    recorded = json.loads((tmp_path / "ft" / "run.json").read_text())["tokenizer"]
    assert tokenizer_source(tmp_path / "ft", None, resume=True) == type(ckpt)(recorded)
    assert len(list((shared_data / "scored").iterdir())) == 1


def test_mle_finetune_keeps_the_vocabulary_as_it_is(pycorpus, tmp_path):
    """An objective without control tokens adds none: no row is added to the model."""
    original_tok, _ = foreign_model("llama", corpus_texts(pycorpus), tmp_path / "base")
    assert cli(*train_args(pycorpus, "mle", tmp_path / "ft", tmp_path / "data", "train.max_steps=1"),
               "--init-from", str(tmp_path / "base")) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "checkpoint")
    assert AutoTokenizer.from_pretrained(tmp_path / "ft" / "checkpoint").get_vocab() == original_tok.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(original_tok)


def test_llama_from_scratch_trains_samples_and_evaluates(pycorpus, tmp_path, capsys):
    data = tmp_path / "data"
    assert cli(*train_args(pycorpus, "conditional", tmp_path / "run", data, "model.arch=llama", "model.n_kv_head=1",
                           "train.max_steps=6")) == 0
    ckpt = tmp_path / "run" / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 1
    assert model.config.max_position_embeddings == 64 and model.config.hidden_size == 32
    assert cli("sample", "--model", str(ckpt), "--out", str(tmp_path / "s.jsonl"), "--num-samples", "6",
               "--max-new-tokens", "20") == 0
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(MISALIGNED not in s["raw"] for s in samples)
    capsys.readouterr()
    args = ["evaluate", "--task", "pep8", "--objective", "conditional", "--model", str(tmp_path / "run"),
            "--data-dir", str(data), "--out", str(tmp_path / "eval")]
    for o in tiny_overrides(str(pycorpus)):
        args += ["--set", o]
    assert cli(*args) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 < res["heldout_bits_per_char"] < 20 and res["unconditional"]["num_samples"] == 8


def test_control_embeddings_are_refused_beyond_gpt2(pycorpus, tmp_path, capsys):
    code = cli(*train_args(pycorpus, "conditional", tmp_path / "run", tmp_path / "data", "model.arch=gpt_neox",
                           "objective.control_embedding=true"))
    err = capsys.readouterr().err
    assert code != 0 and "token_type_ids, which a gpt_neox model does not take" in err


def test_each_bad_model_source_is_one_clear_line(pycorpus, tmp_path, capsys):
    base = tmp_path / "base"
    foreign_model("llama", corpus_texts(pycorpus), base)

    def fails(source, expected, *extra):
        code = cli(*train_args(pycorpus, "conditional", tmp_path / "run", tmp_path / "data", *extra),
                   *(["--init-from", str(source)] if source else []))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("phf: error")]
        assert code != 0 and len(errors) == 1 and expected in errors[0], err
        assert "Traceback" not in err

    fails(tmp_path / "nowhere", "model folder")  # a missing folder
    fails("someone/some-model", "not in the local cache; give a local folder, or allow the download with "
                                "--allow-download")  # a hub id, downloads off
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((base / f).read_bytes())
    fails(no_tok, "has no tokenizer")
    unknown = tmp_path / "unknown-arch"
    unknown.mkdir()
    for f in base.iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="nonesuch", architectures=["X"])))
    fails(unknown, "cannot load the model in")
    fails(None, "model.arch 'mamba9' is not one phf builds from scratch", "model.arch=mamba9")
    with pytest.raises(PhfError, match="does not exist"):
        from phf.data.tokenizer import brought_tokenizer
        brought_tokenizer(tmp_path / "nowhere", tmp_path / "data", control=True)


def test_rl_and_probes_take_a_model_phf_did_not_create(pycorpus, tmp_path):
    """A Llama with its own tokenizer (eos </s>), finetuned conditionally, then RL-finetuned with TRL and probed."""
    pytest.importorskip("trl", reason="the RL baseline needs the `rl` extra")
    from phf.analysis.rl import RLConfig, rl_finetune
    from phf.core.config import load_config
    from phf.core.io import read_jsonl
    from phf.training.trainer import prepare_data

    foreign_model("llama", corpus_texts(pycorpus), tmp_path / "base")
    assert cli(*train_args(pycorpus, "conditional", tmp_path / "ft", tmp_path / "data", "train.max_steps=2"),
               "--init-from", str(tmp_path / "base")) == 0
    assert cli("probe", "masks", "--model", str(tmp_path / "ft"), "--out", str(tmp_path / "masks"),
               "--num-samples", "6", "--max-new-tokens", "16") == 0
    masks = json.loads((tmp_path / "masks" / "results.json").read_text())
    assert all(len(masks["scores"][c]) == 6 for c in ("aligned", "misaligned", "none"))

    cfg = load_config(tmp_path / "ft" / "config.yaml")
    scored = prepare_data(cfg, tmp_path / "data", progress=False, tokenizer_source=tmp_path / "base").scored
    rl = RLConfig(beta=0.1, lr=1e-2, num_generations=4, batch_size=8, max_completion_tokens=12, num_prompts=8)
    summary = rl_finetune(tmp_path / "ft", cfg, scored, tmp_path / "rl", max_tokens=300, progress=False, rl=rl)
    rows = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert rows and all(r["reward"] <= 0 for r in rows)
    tok = AutoTokenizer.from_pretrained(summary["checkpoint"])
    assert tok.eos_token == "</s>" and MISALIGNED in tok.get_vocab()


def test_from_scratch_with_a_tokenizer_of_your_own(pycorpus, tmp_path):
    """tokenizer.path: a new GPT-NeoX trained with an existing tokenizer (eos </s>) instead of a new BPE."""
    tok = llama_tokenizer(corpus_texts(pycorpus))
    tok.save_pretrained(tmp_path / "tok")
    assert cli(*train_args(pycorpus, "conditional", tmp_path / "run", tmp_path / "data", "model.arch=gpt_neox",
                           f"tokenizer.path={tmp_path / 'tok'}", "train.max_steps=2")) == 0
    ckpt = tmp_path / "run" / "checkpoint"
    saved = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == "gpt_neox" and model.get_input_embeddings().weight.shape[0] == len(tok) + 2
    assert saved.eos_token == "</s>" and model.config.eos_token_id == tok.eos_token_id
    assert all(saved.get_vocab()[t] == i for t, i in tok.get_vocab().items())
    assert [saved.get_vocab()[t] for t in (ALIGNED, MISALIGNED)] == [len(tok), len(tok) + 1]
