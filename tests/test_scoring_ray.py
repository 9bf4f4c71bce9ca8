"""The Ray backend of scoring (`scoring.backend: ray`, the `phf[ray]` extra) on a local Ray instance: the same
scorer over the same shards, written by the driver, so the shard files equal the local backend's byte for byte."""
import json
import shutil

import pytest
import ray

from phf.core.config import CorpusConfig, ScoringConfig
from phf.data.scoring import MANIFEST, score_corpus


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _manifest(path) -> dict:
    m = json.loads((path / MANIFEST).read_text())
    m.pop("seconds")  # wall time of the run
    m.pop("throughput")  # its speed and where it scored (a pool here, Ray's actors there)
    return m


def test_ray_backend_writes_the_local_backends_shards_byte_for_byte(pycorpus, tmp_path, local_ray):
    corpus = shutil.copytree(pycorpus, tmp_path / "corpus")
    (corpus / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # skipped and counted by both
    ccfg = CorpusConfig(source=str(corpus))
    local = score_corpus(ccfg, ScoringConfig(workers=1, shard_documents=3), tmp_path / "local", progress=False)
    remote = score_corpus(ccfg, ScoringConfig(backend="ray", shard_documents=3), tmp_path / "ray", progress=False)
    files = [f.name for f in local.shard_files()]
    assert len(files) >= 3 and files == [f.name for f in remote.shard_files()]
    for name in files:
        assert (local.path / name).read_bytes() == (remote.path / name).read_bytes(), name
    assert _manifest(remote.path) == _manifest(local.path)
    assert _manifest(remote.path)["corpus_stats"]["skipped"] == {"not UTF-8": 1}

    # an interrupted run resumes with Ray too: only the missing shard is scored again, to the same bytes
    manifest = json.loads((remote.path / MANIFEST).read_text())
    manifest["complete"] = False
    (remote.path / MANIFEST).write_text(json.dumps(manifest))
    (remote.path / files[1]).unlink()
    kept = (remote.path / files[0]).stat().st_mtime_ns
    again = score_corpus(ccfg, ScoringConfig(backend="ray", workers=1, shard_documents=3), tmp_path / "ray",
                         progress=False)
    assert (again.path / files[0]).stat().st_mtime_ns == kept
    assert (again.path / files[1]).read_bytes() == (local.path / files[1]).read_bytes()
    assert json.loads((again.path / MANIFEST).read_text())["chars_scored_this_run"] < \
        json.loads((local.path / MANIFEST).read_text())["chars_scored_this_run"]


def test_ray_actors_read_their_own_parts_of_data_files(pycorpus, tmp_path, local_ray):
    """A folder of a zstandard jsonl and a Parquet file with several row groups: each actor gets a part (a byte
    offset of a file, a row group) instead of the corpus, and the shards equal the local backend's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records = [{"id": p.name, "text": p.read_text()} for p in sorted(pycorpus.glob("*.py"))]
    data = tmp_path / "data"
    data.mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in records[:6]).encode()
    (data / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(records[6:]), data / "b.parquet", row_group_size=2)
    ccfg = CorpusConfig(source=str(data))
    local = score_corpus(ccfg, ScoringConfig(workers=1, shard_documents=2), tmp_path / "local", progress=False)
    remote = score_corpus(ccfg, ScoringConfig(backend="ray", shard_documents=2), tmp_path / "ray", progress=False)
    files = [f.name for f in local.shard_files()]
    assert len(files) >= 5 and files == [f.name for f in remote.shard_files()]
    for name in files:
        assert (local.path / name).read_bytes() == (remote.path / name).read_bytes(), name
