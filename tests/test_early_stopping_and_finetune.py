"""Early stopping restores the best weights; evaluations during training sample and score; snapshots are branch
points for finetuning runs, whose curves continue their base's; new control tokens start at the mean embedding."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from phf.core.errors import PhfError
from phf.core.io import read_json, read_jsonl
from phf.core.tokens import ALIGNED, MISALIGNED
from phf.data.tokenizer import load_tokenizer
from phf.model.lm import load_meta
from phf.tasks import get_task
from phf.training.trainer import run_training


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_early_stopping_stops_after_patience_and_restores_the_best(tiny_cfg_factory, data_dir, tmp_path):
    # min_delta so large that nothing after the first evaluation counts as an improvement
    cfg = tiny_cfg_factory("mle", ["train.max_steps=20", "train.eval_every=2", "train.early_stopping_patience=2",
                                   "train.early_stopping_min_delta=100"])
    result = run_training(cfg, tmp_path / "run", data_dir, progress=False)
    assert result.steps == 6  # best at 2, no improvement at 4 and 6
    meta = load_meta(result.checkpoint)
    assert meta["restored_best_step"] == 2 and meta["stopped_at_step"] == 6
    best, final = weights(tmp_path / "run" / "best"), weights(result.checkpoint)
    assert all(torch.equal(best[k], final[k]) for k in best)
    evals = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in m]
    assert result.final_val_loss == pytest.approx(evals[0]["val_loss"], abs=1e-5)
    assert read_json(tmp_path / "run" / "train_summary.json")["restored_best_step"] == 2


def test_best_val_loss_is_the_running_minimum(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("mle", ["train.max_steps=8", "train.eval_every=2", "train.early_stopping_patience=10"])
    run_training(cfg, tmp_path / "run", data_dir, progress=False)
    evals = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "best_val_loss" in m]
    assert len(evals) == 4
    running = float("inf")
    for m in evals:
        running = min(running, m["val_loss"])
        assert m["best_val_loss"] == pytest.approx(running)


def test_early_stopping_needs_evaluations(tiny_cfg_factory):
    with pytest.raises(PhfError, match="train.eval_every"):
        tiny_cfg_factory("mle", ["train.early_stopping_patience=3", "train.eval_every=0"])


def test_evaluations_during_training_sample_and_score(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("conditional", ["train.max_steps=4", "train.eval_every=2", "train.eval_samples=4"])
    run_training(cfg, tmp_path / "run", data_dir, progress=False)
    evals = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["eval_misalignment_mean"] >= 0 and 0 <= m["eval_misaligned_share"] <= 1
        assert "eval_distinct_2" in m and m["total_tokens"] == m["tokens"]
        # beside the paper's figure, what it owes to sample length (pep8 scores are rates: a length-weighted one)
        assert m["eval_length_weighted_misalignment"] >= 0 and 0 <= m["eval_finished_share"] <= 1


def test_finetune_from_a_snapshot_continues_the_token_count(tiny_cfg_factory, data_dir, tmp_path):
    base = run_training(tiny_cfg_factory("mle", ["train.max_steps=4"]), tmp_path / "mle", data_dir,
                        progress=False, snapshots=[2])
    snap = tmp_path / "mle" / "snapshots" / "step-2"
    assert load_meta(snap)["step"] == 2
    assert not torch.equal(weights(snap)["transformer.h.0.mlp.c_fc.weight"],
                           weights(base.checkpoint)["transformer.h.0.mlp.c_fc.weight"])
    cfg = tiny_cfg_factory("conditional", ["train.max_steps=2"])
    ft = run_training(cfg, tmp_path / "ft", data_dir, init_from=snap, progress=False)
    rows = [m for m in read_jsonl(tmp_path / "ft" / "metrics.jsonl") if "loss" in m]
    before = load_meta(snap)["tokens_seen"]
    assert before > 0 and all(m["total_tokens"] == m["tokens"] + before for m in rows)
    assert load_meta(ft.checkpoint)["tokens_seen_total"] == before + ft.tokens


def test_new_control_tokens_start_at_the_mean_embedding(tiny_cfg_factory, data_dir, tmp_path):
    from phf.model.finetune import init_from_checkpoint
    from phf.training.objectives import get_objective

    mle = run_training(tiny_cfg_factory("mle", ["train.max_steps=2"]), tmp_path / "mle", data_dir, progress=False)
    cond_cfg = tiny_cfg_factory("conditional")
    tok_file = mle.data.tokenizer_file
    vocab = load_tokenizer(tok_file).get_vocab()
    ids = [vocab[ALIGNED], vocab[MISALIGNED]]
    before = weights(mle.checkpoint)["transformer.wte.weight"]
    cond = get_objective(cond_cfg.objective, get_task("pep8"))
    model = init_from_checkpoint(mle.checkpoint, tok_file, torch.device("cpu"), cond, seed=0)
    emb = model.get_input_embeddings().weight.detach()
    others = torch.ones(len(emb), dtype=torch.bool)
    others[ids] = False
    mean, std = before[others].mean(0), before[others].std()
    for i in ids:
        assert not torch.allclose(emb[i], before[i])
        assert (emb[i] - mean).abs().max() < 0.06 * std  # mean plus noise of 1% std
        assert (emb[i] - mean).abs().max() > 0  # the noise is there
    assert not torch.equal(emb[ids[0]], emb[ids[1]])
    assert torch.equal(emb[others], before[others])
    # a model that was trained with control tokens keeps them, and so does an objective that does not use them
    cond_run = run_training(tiny_cfg_factory("conditional", ["train.max_steps=2"]), tmp_path / "cond", data_dir,
                            progress=False)
    kept = init_from_checkpoint(cond_run.checkpoint, tok_file, torch.device("cpu"), cond, seed=0)
    assert torch.equal(kept.get_input_embeddings().weight.detach(),
                       weights(cond_run.checkpoint)["transformer.wte.weight"])
    plain = init_from_checkpoint(mle.checkpoint, tok_file, torch.device("cpu"),
                                 get_objective(tiny_cfg_factory("filtering").objective, get_task("pep8")), seed=0)
    assert torch.equal(plain.get_input_embeddings().weight.detach(), before)


def test_early_stopping_state_continues_after_a_resume():
    from phf.training.evaluator import EarlyStopping

    es = EarlyStopping(patience=2, min_delta=0.1)
    assert es.update(5.0, 2) and not es.stop
    assert not es.update(4.95, 4) and not es.stop  # within min_delta: no improvement
    resumed = EarlyStopping(patience=2, min_delta=0.1, state=es.state())
    assert resumed.state() == {"val_loss": 5.0, "step": 2, "stale": 1} and not resumed.stop
    assert not resumed.update(5.2, 6) and resumed.stop
    assert EarlyStopping(2, 0.0, state=resumed.state()).stop is False  # only an evaluation decides to stop
