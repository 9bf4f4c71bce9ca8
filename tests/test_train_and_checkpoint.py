import json

import pytest
import torch
from safetensors.torch import load_file

from phf.core.io import read_jsonl
from phf.training.trainer import WindowDraw, get_batch, run_training


@pytest.mark.parametrize("objective", ["mle", "filtering", "conditional"])
def test_a_few_steps_change_every_parameter(objective, tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory(objective, ["train.max_steps=3"])
    # the initial weights: same seed, zero steps is not allowed, so build them the way the trainer does
    from phf.core.tokens import EOS
    from phf.data.tokenizer import load_tokenizer
    from phf.model.lm import build_model
    from phf.training.trainer import prepare_data

    data = prepare_data(cfg, data_dir, progress=False)
    tok = load_tokenizer(data.tokenizer_file)
    torch.manual_seed(cfg.train.seed)
    init = {k: v.clone() for k, v in build_model(cfg.model, tok.get_vocab_size(), tok.token_to_id(EOS)).state_dict().items()}
    result = run_training(cfg, tmp_path / objective, data_dir, progress=False)
    trained = load_file(str(result.checkpoint / "model.safetensors"))
    for name, before in init.items():
        if name.endswith("attn.bias") or name.endswith("masked_bias"):
            continue  # causal-mask buffers, not parameters
        key = name if name in trained else name.replace("lm_head.weight", "transformer.wte.weight")
        assert not torch.equal(trained[key], before), f"{name} did not change"
    metrics = read_jsonl(tmp_path / objective / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert result.tokens == 3 * cfg.train.batch_size * cfg.model.block_size


def test_same_seed_same_loss_curve_and_weights(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("conditional", ["train.max_steps=4"])
    a = run_training(cfg, tmp_path / "a", data_dir, progress=False)
    b = run_training(cfg, tmp_path / "b", data_dir, progress=False)
    la = [m["loss"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in m]
    assert la == lb
    wa, wb = load_file(str(a.checkpoint / "model.safetensors")), load_file(str(b.checkpoint / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_batches_depend_only_on_seed_step_and_micro_index(tiny_cfg_factory, data_dir):
    from phf.training.trainer import prepare_data

    cfg = tiny_cfg_factory("mle")
    stream = prepare_data(cfg, data_dir, progress=False).streams["train"]
    x1, y1, s1, _ = get_batch(stream, WindowDraw(16, 3, seed=1), step=5, micro=1, device=torch.device("cpu"))
    x2, y2, s2, _ = get_batch(stream, WindowDraw(16, 3, seed=1), step=5, micro=1, device=torch.device("cpu"))
    x3, _, _, _ = get_batch(stream, WindowDraw(16, 3, seed=1), step=6, micro=1, device=torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(s1, s2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


def test_checkpoint_loads_and_generates_with_plain_transformers(tiny_cfg_factory, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=2"])
    result = run_training(cfg, tmp_path / "run", data_dir, progress=False)
    folder = result.checkpoint
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_tokens_to_ids("<|aligned|>") != tok.unk_token_id
    ids = tok("<|endoftext|><|aligned|>def f", return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"].shape[1] >= 3
    assert ids["input_ids"][0, 1].item() == tok.convert_tokens_to_ids("<|aligned|>")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # the weights are exactly what phf trained
    ours = load_file(str(folder / "model.safetensors"))
    theirs = model.state_dict()
    assert torch.equal(ours["transformer.h.0.mlp.c_fc.weight"], theirs["transformer.h.0.mlp.c_fc.weight"])
    meta = json.loads((folder / "phf.json").read_text())
    assert meta["objective"]["name"] == "conditional" and meta["tokens_seen"] == result.tokens
    assert meta["objective"]["banned_tokens"] == ["<|misaligned|>"]


def test_no_leftover_temporary_folders(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("mle", ["train.max_steps=2", "train.checkpoint_every=1"])
    run_training(cfg, tmp_path / "run", data_dir, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_finetune_from_a_checkpoint_starts_from_its_weights(tiny_cfg_factory, data_dir, tmp_path):

    base = run_training(tiny_cfg_factory("mle", ["train.max_steps=2"]), tmp_path / "base", data_dir, progress=False)
    ft_cfg = tiny_cfg_factory("conditional", ["train.max_steps=1", "train.lr=1e-9", "train.weight_decay=0"])
    ft = run_training(ft_cfg, tmp_path / "ft", data_dir, init_from=tmp_path / "base", progress=False)
    a = load_file(str(base.checkpoint / "model.safetensors"))
    b = load_file(str(ft.checkpoint / "model.safetensors"))
    # a negligible step away from the base weights, except the control tokens' embeddings: the MLE base never
    # read them, so conditional finetuning starts them at the mean embedding (tests/test_early_stopping_and_finetune)
    from phf.core.tokens import CONTROL_TOKENS
    from phf.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(base.checkpoint / "tokenizer.json").get_vocab()
    rows = torch.ones(len(a["transformer.wte.weight"]), dtype=torch.bool)
    rows[[vocab[t] for t in CONTROL_TOKENS]] = False
    assert torch.allclose(a["transformer.wte.weight"][rows], b["transformer.wte.weight"][rows], atol=1e-6)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if k != "transformer.wte.weight")
    # a finetune reads with the model's own tokenizer, whatever the run config's BPE settings say
    other = tiny_cfg_factory("conditional", ["train.max_steps=1", "tokenizer.vocab_size=450"])
    ft2 = run_training(other, tmp_path / "ft2", data_dir, init_from=base.checkpoint, progress=False)
    assert load_tokenizer(ft2.checkpoint).get_vocab() == vocab
