"""Fault injection and hostile inputs: killed runs resume exactly, bad input gets a one-line error or is skipped
and counted, and nothing completed is ever lost."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from phf.core.config import CorpusConfig, ObjectiveConfig, ScoringConfig, TokenizerConfig, config_to_yaml
from phf.core.errors import PhfError
from phf.core.io import read_jsonl
from phf.data.corpus import Corpus
from phf.data.scoring import MANIFEST, ScoredCorpus, score_corpus
from phf.tasks import get_task

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def phf(*args, **kw):
    return subprocess.run([sys.executable, "-m", "phf", "-q", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, **kw)


def start_phf(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "phf", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, **kw)


def phf_with_file_size_limit(limit: int, *args):
    """`phf` in a process that cannot write files larger than `limit` bytes: a disk that fills up mid-write."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"from phf.cli.main import main; sys.argv = ['phf', '-q', *{[str(a) for a in args]!r}]; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"the process ended before the fault could be injected: {proc.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def losses(run: Path):
    return [(m["step"], m["loss"]) for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("conditional", ["train.max_steps=120", "train.checkpoint_every=20", "train.threads=1",
                                           "train.batch_size=8", "train.eval_every=40"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))
    whole = phf("train", "--config", config, "--out", tmp_path / "whole", "--data-dir", data_dir)
    assert whole.returncode == 0, whole.stderr

    run = tmp_path / "killed"
    proc = start_phf("train", "--config", config, "--out", run, "--data-dir", data_dir)
    state = run / "checkpoint" / "trainer_state.json"
    wait_for(lambda: state.exists() and json.loads(state.read_text())["step"] >= 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 120, "the run finished before it was killed"

    resumed = phf("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "whole")  # the same curve, step for step, bitwise
    assert [m for m in read_jsonl(run / "metrics.jsonl") if "val_loss" in m] == \
        [m for m in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "val_loss" in m]
    a = load_file(str(run / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_kill_between_the_two_renames_of_a_checkpoint_swap(tiny_cfg_factory, data_dir, tmp_path):
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("mle", ["train.max_steps=6", "train.checkpoint_every=3"])
    run_training(cfg, tmp_path / "run", data_dir, progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    os.replace(ckpt, tmp_path / "run" / ".checkpoint.old")  # the state a kill inside replace_dir can leave
    result = run_training(cfg, tmp_path / "run", data_dir, resume=True, progress=False)
    assert result.steps == 6 and (ckpt / "model.safetensors").exists()


def test_resume_before_any_checkpoint_says_what_to_do(tiny_cfg_factory, data_dir, tmp_path):
    from phf.training.trainer import run_training

    with pytest.raises(PhfError, match="has no checkpoint yet"):
        run_training(tiny_cfg_factory("mle"), tmp_path / "run", data_dir, resume=True, progress=False)


def test_sigkill_mid_scoring_then_rerun_scores_only_what_is_left(pycorpus, tmp_path):
    args = ["score", "--corpus", pycorpus, "--scorer", "tests.helpers:slow_length", "--workers", "1",
            "--set", "scoring.shard_documents=1"]
    whole = phf(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    proc = start_phf(*args, "--out", tmp_path / "killed")
    manifests = lambda: list((tmp_path / "killed").glob("scored/*/manifest.json"))  # noqa: E731

    def some_shards_done():
        m = manifests()
        return m and len(json.loads(m[0].read_text())["shards"]) >= 5

    wait_for(some_shards_done, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = manifests()[0].parent
    done_before = json.loads((folder / MANIFEST).read_text())["shards"]
    assert not json.loads((folder / MANIFEST).read_text())["complete"]
    mtimes = {name: (folder / name).stat().st_mtime_ns for name in done_before}
    again = phf(*args, "--out", tmp_path / "killed")
    assert again.returncode == 0, again.stderr
    for name, mtime in mtimes.items():  # finished shards were kept, not redone
        assert (folder / name).stat().st_mtime_ns == mtime
    ref = ScoredCorpus(next((tmp_path / "whole").glob("scored/*"))).table()
    assert ScoredCorpus(folder).table().equals(ref)


def test_disk_full_while_scoring_is_a_clear_error_and_keeps_finished_shards(pycorpus, tmp_path):
    # 20 KB per file: the first shards (~12-19 KB) fit, the fourth (~22 KB) does not
    out = phf_with_file_size_limit(20_000, "score", "--corpus", pycorpus, "--workers", "1", "--set",
                                   "scoring.shard_documents=2", "--out", tmp_path / "d")
    assert out.returncode == 2, out.stderr
    assert "no space left" in out.stderr and "Traceback" not in out.stderr
    folder = next((tmp_path / "d").glob("scored/*"))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["shards"] and not manifest["complete"]
    for name, info in manifest["shards"].items():
        assert (folder / name).stat().st_size == info["bytes"]
    assert not list(folder.glob(".*.tmp"))  # no half-written file left behind
    # with room again, the same command finishes the job
    again = phf("score", "--corpus", pycorpus, "--workers", "1", "--set", "scoring.shard_documents=2", "--out",
                tmp_path / "d")
    assert again.returncode == 0, again.stderr


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_cfg_factory, data_dir, tmp_path):
    cfg = tiny_cfg_factory("mle", ["train.max_steps=4", "train.checkpoint_every=2"])
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg))
    first = phf("train", "--config", config, "--out", tmp_path / "run", "--data-dir", data_dir)
    assert first.returncode == 0
    before = (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    out = phf_with_file_size_limit(20_000, "train", "--resume", tmp_path / "run", "--set", "train.max_steps=8")
    assert out.returncode == 2, out.stderr
    assert "could not write checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() == before


# -- hostile inputs ---------------------------------------------------------------------------------------------
def test_a_single_50mb_line_is_skipped_and_counted(tmp_path):
    (tmp_path / "huge.py").write_text("x = '" + "a" * 50_000_000 + "'\n")
    (tmp_path / "ok.py").write_text("y = 1\n")
    corpus = Corpus(CorpusConfig(source=str(tmp_path)))
    assert [d.id for d in corpus] == ["ok.py"] and corpus.stats.skipped == {"too long": 1}


def test_parquet_with_wrong_text_type(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "bad.parquet")
    with pytest.raises(PhfError, match="column `text` must hold strings"):
        Corpus(CorpusConfig(source=str(tmp_path / "bad.parquet"))).parts(64)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PhfError, match="not a readable Parquet file"):
        Corpus(CorpusConfig(source=str(tmp_path / "junk.parquet"))).parts(64)


def test_unknown_scorer_and_unimportable_custom_scorer(pycorpus, tmp_path, capsys):
    from phf.cli.main import main

    for name, message in [("sentiment", "unknown scorer 'sentiment'"), ("nomodule_xyz:f", "cannot import nomodule_xyz"),
                          ("tests.helpers:nothing", "has no attribute 'nothing'")]:
        with pytest.raises(SystemExit) as exc:
            main(["-q", "score", "--corpus", str(pycorpus), "--scorer", name, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("\n") == 1


def test_a_threshold_that_leaves_no_aligned_segment(tiny_cfg_factory, tmp_path):
    from phf.training.trainer import prepare_data

    cfg = tiny_cfg_factory("conditional", ["scoring.scorer=tests.helpers:always_misaligned"])
    with pytest.raises(PhfError, match="labels no training segment <\\|aligned\\|>"):
        prepare_data(cfg, tmp_path, progress=False)


def test_missing_or_truncated_weights_are_named(tiny_cfg_factory, data_dir, tmp_path):
    from phf.model.lm import load_model
    from phf.training.trainer import run_training

    result = run_training(tiny_cfg_factory("mle", ["train.max_steps=1"]), tmp_path / "run", data_dir, progress=False)
    weights = result.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PhfError, match="model.safetensors is damaged or truncated"):
        load_model(result.checkpoint)
    weights.unlink()
    with pytest.raises(PhfError, match="has no safetensors weights"):
        load_model(result.checkpoint)
    out = phf("sample", "--model", result.checkpoint, "--out", tmp_path / "s.jsonl")
    assert out.returncode == 2 and "has no safetensors weights" in out.stderr


def test_scorer_returning_nan_or_raising_is_recorded_not_zero(pycorpus, tmp_path):
    scored = score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(scorer="tests.helpers:flaky", workers=1),
                          tmp_path, progress=False)
    summary = scored.summary()
    assert summary["segment_errors"] > 0
    t = scored.table(["seg_score", "seg_error"]).to_pylist()
    for row in t:
        for score, error in zip(row["seg_score"], row["seg_error"]):
            assert (error is None) == (score is not None and not np.isnan(score))


def test_no_unsafe_loading_in_the_package():
    src = "\n".join(p.read_text() for p in (ROOT / "phf").rglob("*.py"))
    assert "trust_remote_code=True" not in src
    for line in src.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line
    assert "pickle.load" not in src and "eval(" not in src.replace("model.eval()", "").replace(".eval()", "")


# -- properties ---------------------------------------------------------------------------------------------------
@given(lines=st.lists(st.tuples(st.text(alphabet="ab =(\t#", max_size=10), st.sampled_from([0.0, 0.25, 0.5])),
                      min_size=1, max_size=30), block=st.integers(2, 12), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_per_token_scores_stay_with_their_tokens_through_packing(tok_small, lines, block, seed, tmp_path_factory):
    from phf.data.scoring import ScoredDocument
    from phf.data.segments import line_spans
    from phf.data.token_stream import TokenStream, annotate_for_training, write_stream
    from phf.training.objectives import get_objective
    from phf.training.trainer import WindowDraw, get_batch

    text = "".join(t + "\n" for t, _ in lines)
    spans = line_spans(text)
    doc = ScoredDocument("d", "train", text, [a for a, _ in spans], [b for _, b in spans], [s for _, s in lines],
                         [None] * len(lines), 0.0)
    obj = get_objective(ObjectiveConfig(name="conditional", drop_token_fraction=0.3), get_task("pep8"))
    obj.fit(np.array([0.0]))
    prefix = tmp_path_factory.mktemp("stream") / "train"
    stream = write_stream(prefix, [annotate_for_training(doc, obj, seed)] * 3, tok_small, {}, progress=False)
    stream = TokenStream(prefix)
    if len(stream) < block + 2:
        return
    # reference: the score of the line each token's text starts in, recomputed by decoding token by token
    ids = stream.tokens.tolist()
    ref_scores = []
    line_of_char = [i for i, (t, _) in enumerate(lines) for _ in range(len(t) + 1)]
    pos = -1
    for tid in ids:
        piece = tok_small.decode([tid], skip_special_tokens=False)
        if piece == "<|endoftext|>":
            ref_scores.append(0.0)
            pos = 0
            continue
        if piece in ("<|aligned|>", "<|misaligned|>"):
            ref_scores.append(lines[line_of_char[pos]][1])
            continue
        ref_scores.append(lines[line_of_char[pos]][1])
        pos += len(piece)
    assert np.allclose(np.asarray(stream.scores), ref_scores)
    x, y, s, _ = get_batch(stream, WindowDraw(block, 4, seed), 0, 0, torch.device("cpu"))
    # the documented contract: window starts come from a generator seeded by (seed, step, micro-batch)
    starts = np.random.default_rng([seed, 0, 0]).integers(0, len(ids) - block - 1, size=4)
    for start, row_x, row_y, row_s in zip(starts, x, y, s):  # each target token keeps its own score
        assert row_x.tolist() == ids[start:start + block] and row_y.tolist() == ids[start + 1:start + block + 1]
        assert np.allclose(row_s.numpy(), ref_scores[start + 1:start + block + 1])


@pytest.fixture(scope="module")
def tok_small(pycorpus):
    from phf.data.tokenizer import train_tokenizer

    return train_tokenizer([p.read_text() for p in sorted(pycorpus.glob("*.py"))], TokenizerConfig(vocab_size=400))
