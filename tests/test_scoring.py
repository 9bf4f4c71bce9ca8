import json

import pyarrow.parquet as pq
import pytest

from phf.core.config import CorpusConfig, ScoringConfig
from phf.core.errors import PhfError
from phf.data.corpus import Corpus, split_of
from phf.data.scoring import MANIFEST, ScoredCorpus, score_corpus


def test_split_is_deterministic_and_roughly_proportional():
    ids = [f"pkg/mod{i}.py" for i in range(4000)]
    splits = [split_of(i, 0.1, 0.05) for i in ids]
    assert splits == [split_of(i, 0.1, 0.05) for i in ids]
    assert 0.03 < splits.count("test") / 4000 < 0.07
    assert 0.08 < splits.count("validation") / 4000 < 0.12


def test_folder_with_bad_files_skips_and_counts(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "binary.py").write_bytes(b"\x00\x01\x02 binary")
    (tmp_path / "empty.py").write_text("   \n")
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlink loop must not hang the walk
    (tmp_path / "notes.txt").write_text("not python")
    corpus = Corpus(CorpusConfig(source=str(tmp_path)))
    docs = list(corpus)
    assert [d.id for d in docs] == ["good.py"]
    assert corpus.stats.skipped == {"not UTF-8": 1, "binary (NUL bytes)": 1, "empty": 1,
                                    "extension not in corpus.extensions": 1}  # notes.txt


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa

    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"id": "a", "text": "x = 1\n"}) + "\nnot json\n" + json.dumps({"txt": "y"}) + "\n"
                  + json.dumps({"text": 3}) + "\n")
    corpus = Corpus(CorpusConfig(source=str(jl)))
    assert [d.text for d in corpus] == ["x = 1\n"]
    assert corpus.stats.skipped == {"malformed jsonl line": 1, "record without a text field": 1,
                                    "text is not a string": 1}
    pq.write_table(pa.table({"text": ["a = 1\n", "b = 2\n"]}), tmp_path / "c.parquet")
    assert len(list(Corpus(CorpusConfig(source=str(tmp_path / "c.parquet"))))) == 2
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(PhfError, match="no `text` column"):
        list(Corpus(CorpusConfig(source=str(tmp_path / "d.parquet"))))
    with pytest.raises(PhfError, match="does not exist"):
        list(Corpus(CorpusConfig(source=str(tmp_path / "missing"))))


def test_scored_corpus_is_written_once_reused_and_resumable(pycorpus, tmp_path):
    ccfg = CorpusConfig(source=str(pycorpus))
    scfg = ScoringConfig(workers=2, shard_documents=5)
    scored = score_corpus(ccfg, scfg, tmp_path, progress=False)
    manifest = json.loads((scored.path / MANIFEST).read_text())
    assert manifest["scorer"] == "pep8" and manifest["version"].startswith("pycodestyle ")
    assert manifest["settings"]["max_line_length"] == 79 and manifest["complete"]
    summary = scored.summary()
    assert sum(summary["documents"].values()) == len(list(pycorpus.glob("*.py")))
    assert summary["segment_errors"] == 0 and summary["segments_misaligned"] > 0
    docs = {d.id: d for d in scored.documents()}
    messy = docs["messy_style.py"]
    assert "".join(messy.segments()) == (pycorpus / "messy_style.py").read_text()
    assert messy.score == pytest.approx(sum(s * (b - a) for s, a, b in zip(messy.scores, messy.starts, messy.ends))
                                        / len(messy.text))
    table = scored.table()

    # a second run reuses the result without scoring
    mtime = (scored.path / "shard-00000.parquet").stat().st_mtime_ns
    again = score_corpus(ccfg, scfg, tmp_path, progress=False)
    assert (again.path / "shard-00000.parquet").stat().st_mtime_ns == mtime

    # an interrupted run (manifest not complete, one shard lost) re-scores only what is missing
    manifest["complete"] = False
    (scored.path / MANIFEST).write_text(json.dumps(manifest))
    (scored.path / "shard-00002.parquet").unlink()
    resumed = score_corpus(ccfg, ScoringConfig(workers=1, shard_documents=5), tmp_path, progress=False)
    assert (resumed.path / "shard-00000.parquet").stat().st_mtime_ns == mtime
    assert resumed.table().equals(table)


def test_damaged_shard_is_named(pycorpus, tmp_path):
    scored = score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(workers=1, shard_documents=10),
                          tmp_path, progress=False)
    shard = scored.path / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(PhfError, match="shard-00001.parquet is damaged"):
        ScoredCorpus(scored.path).verify()


def test_scores_are_deterministic(pycorpus, tmp_path):
    a = score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(workers=1), tmp_path / "a", progress=False)
    b = score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(workers=2, shard_documents=3), tmp_path / "b",
                     progress=False)
    ta, tb = a.table(), b.table()
    assert ta.column("seg_score").to_pylist() == tb.column("seg_score").to_pylist()
    assert ta.column("id").to_pylist() == tb.column("id").to_pylist()


DEVICE_SCORER = '''
import sys
from phf.data.scorers.base import Scorer


class OnDevice(Scorer):
    """Stands in for a model-based scorer: scores 1.0 per line when built for a GPU, in a spawned process."""
    name = "on-device"

    def __init__(self, device="cpu"):
        self.device = device

    def score_segments(self, segments):
        spawned = "_pytest" not in sys.modules  # a fresh interpreter; a forked worker would carry pytest
        return [float(self.device == "cuda" and spawned) for _ in segments]
'''


def test_scoring_device_reaches_a_scorer_that_takes_one_in_spawned_workers(pycorpus, tmp_path, monkeypatch):
    """scoring.device: a Scorer class with a `device` argument gets it; with a GPU device the local workers are
    spawned, not forked (the stand-in scorer touches no GPU, so this runs anywhere)."""
    import os

    from phf.core.config import load_config
    from phf.data.scorers import get_scorer

    (tmp_path / "devscorer.py").write_text(DEVICE_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert get_scorer("devscorer:OnDevice", device="cuda:1").device == "cuda:1"
    scored = score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(scorer="devscorer:OnDevice", workers=2,
                          shard_documents=4, device="cuda"), tmp_path / "data", progress=False)
    assert set(scored.document_scores("train")) == {1.0}  # every shard scored by a spawned worker on "cuda"
    for name, device, message in (("pep8", "cuda", "takes no device"), ("tests.helpers:slow_length", "cpu",
                                                                          "is a function and takes no device")):
        with pytest.raises(PhfError, match=message):
            get_scorer(name, device=device)
    with pytest.raises(PhfError, match="scoring.device must be cpu, cuda or cuda:N"):
        load_config(None, ["scoring.device=gpu"])


def test_workers_write_the_same_shards_as_one_process_and_the_run_records_its_throughput(pycorpus, tmp_path):
    """The pool's workers score, build and write whole shards (the driver only reads and records them): the files
    are byte for byte those one process writes, recorded in shard order whatever order they finished in."""
    cfg = CorpusConfig(source=str(pycorpus))
    one = score_corpus(cfg, ScoringConfig(workers=1, shard_documents=3), tmp_path / "one", progress=False)
    pool = score_corpus(cfg, ScoringConfig(workers=2, shard_documents=3), tmp_path / "pool", progress=False)
    assert len(one.shard_files()) > 2
    assert [(n, i["sha256"]) for n, i in one.manifest["shards"].items()] == \
        [(n, i["sha256"]) for n, i in pool.manifest["shards"].items()]  # the same files, listed in the same order
    t = pool.manifest["throughput"]
    assert t["workers"] == 2 and t["mb"] == round(sum(len(d.text) for d in pool.documents()) / 1e6, 2)
    assert t["seconds"] > 0 and t["mb_per_s_per_core"] > 0 and t["driver_cpu_seconds"] >= 0
    assert one.manifest["throughput"]["workers"] == 1 and one.manifest["throughput"]["scored_in"] == "driver"
    assert one.manifest["throughput"]["workers_driver_feeds"] is None and t["scored_in"] == "pool"


CRASHING_SCORER = '''
from phf.data.scorers.base import Scorer


class Crashing(Scorer):
    name = "crashing"

    def score_texts(self, texts):
        raise RuntimeError("the scorer's model is gone")
'''


def test_a_scorer_that_crashes_in_a_worker_ends_the_run_with_its_error(pycorpus, tmp_path, monkeypatch):
    (tmp_path / "crashscorer.py").write_text(CRASHING_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="the scorer's model is gone"):
        score_corpus(CorpusConfig(source=str(pycorpus)), ScoringConfig(scorer="crashscorer:Crashing", workers=2,
                                                                        shard_documents=3), tmp_path / "d",
                     progress=False)


def test_samples_scored_over_many_processes_equal_one_process(pycorpus, monkeypatch):
    """Evaluation's thousands of samples: a pooled scorer (pycodestyle) spreads them over forked processes, and the
    results are exactly the one-process results, in order; a scorer that is not pooled is called once, here."""
    import phf.data.scoring as scoring
    from phf.data.scorers import get_scorer
    from phf.data.scoring import score_texts_pooled

    texts = [p.read_text() for p in sorted(pycorpus.rglob("*.py"))] * 3
    pep8 = get_scorer("pep8")
    assert pep8.pooled and not get_scorer("tests.helpers:slow_length").pooled
    monkeypatch.setattr(scoring, "POOL_MIN_CHARS", 1)
    calls, original = [], type(pep8).score_texts

    def counted(self, batch):  # counts the calls made in this process (a forked worker's are its own)
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(type(pep8), "score_texts", counted)
    pooled = score_texts_pooled(pep8, texts, workers=2)
    assert calls == []  # every text was scored in the workers
    assert pooled == pep8.score_texts(texts) and calls == [len(texts)]
    monkeypatch.setattr(scoring, "POOL_MIN_CHARS", 10**12)  # short texts stay in this process
    assert score_texts_pooled(pep8, texts, workers=2) == pooled and calls[-1] == len(texts)
