"""Two gloo ranks on CPU, launched with torchrun: the loss is normalised by the global token count, so 2 ranks x
1 accumulation step and 1 rank x 2 accumulation steps draw the same windows and make the same update. The DDP test
runs the fused LM-head loss, whose head weight is used outside DDP's forward: its gradient must still be averaged."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from phf.core.config import config_to_yaml
from phf.core.io import read_jsonl

ROOT = Path(__file__).parent.parent


def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("conditional", ["train.max_steps=3", "train.threads=1", "train.fused_loss=true"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "phf", "-q", "train", "--config", str(config), "--out", str(tmp_path / "ddp"),
                          "--data-dir", str(data_dir)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "phf", "-q", "train", "--config", str(config), "--set",
                             "train.grad_accum=2", "--out", str(tmp_path / "one"), "--data-dir", str(data_dir)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    la = [(m["step"], m["tokens"], m["loss"]) for m in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "loss" in m]
    lb = [(m["step"], m["tokens"], m["loss"]) for m in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in m]
    assert len(la) == 3 and la == lb
    wa = load_file(str(tmp_path / "ddp" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    for k in wa:  # summation order differs between an all-reduce and a local sum: equal up to float rounding
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), k


def _torchrun(args: list[str], port: int, env: dict) -> None:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "phf", "-q", "train", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _losses(run_dir: Path) -> list[tuple]:
    return [(m["step"], m["tokens"], m["loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]


def _assert_same_weights(a: Path, b: Path, names=("model.safetensors", "value_head.safetensors")) -> None:
    for name in names:
        wa, wb = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert sorted(wa) == sorted(wb), name
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), (name, k, (wa[k] - wb[k]).abs().max())


def test_fsdp_equals_one_rank_with_two_accumulation_steps_and_resumes(tiny_cfg_factory, data_dir, tmp_path):
    """FSDP2 (fully_shard per GPT2Block, then the root) over 2 gloo ranks: the same losses and weights as one process
    with 2 accumulation steps, full HF checkpoints written by rank 0, and a resumed run equal to an uninterrupted
    one. AWR, so that a module outside the sharded model (the value head) is trained and saved too. In fp32: with
    bf16 autocast the matmuls over the gathered parameters round differently, and Adam turns that noise in
    near-zero gradients (the attention's key bias) into differences of up to the learning rate."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg_factory("awr", ["train.max_steps=3", "train.threads=1", "train.dtype=fp32",
                                   "train.min_lr_ratio=1", "train.parallel=fsdp"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    data = ["--data-dir", str(data_dir)]
    _torchrun(["--config", str(config), "--out", str(tmp_path / "fsdp"), *data], 29521, env)
    single = subprocess.run([sys.executable, "-m", "phf", "-q", "train", "--config", str(config), "--set",
                             "train.grad_accum=2", "--out", str(tmp_path / "one"), *data],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(_losses(tmp_path / "fsdp")) == 3 and _losses(tmp_path / "fsdp") == _losses(tmp_path / "one")
    _assert_same_weights(tmp_path / "fsdp", tmp_path / "one")
    # the checkpoint is a plain, full HF folder
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight is model.transformer.wte.weight

    # stop after 2 steps, resume to 3 (constant learning rate): the same as the uninterrupted run
    _torchrun(["--config", str(config), "--set", "train.max_steps=2", "--out", str(tmp_path / "part"), *data],
              29522, env)
    _torchrun(["--resume", str(tmp_path / "part"), "--set", "train.max_steps=3", *data], 29523, env)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "fsdp")
    _assert_same_weights(tmp_path / "part", tmp_path / "fsdp")


def test_prepare_then_torchrun_trains_on_the_prepared_folder(tiny_cfg_factory, tmp_path):
    """`phf prepare` scores, tokenizes and writes the streams once; two torchrun ranks then start from them."""
    import json

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=2", "train.threads=1", "train.dist_timeout_minutes=5"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    data = tmp_path / "prepared"
    prepared = subprocess.run([sys.executable, "-m", "phf", "-q", "prepare", "--config", str(config), "--data-dir",
                               str(data)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    made = json.loads(prepared.stdout)
    manifest = Path(made["scored_corpus"]) / "manifest.json"
    stamps = {p: p.stat().st_mtime_ns for p in [manifest, *data.glob("streams/*/*.bin")]}
    _torchrun(["--config", str(config), "--out", str(tmp_path / "ddp"), "--data-dir", str(data)], 29519, env)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["tokenizer"] == made["tokenizer"]
    assert run["streams"] == {k: v["path"] for k, v in made["streams"].items()}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # read, not written again
