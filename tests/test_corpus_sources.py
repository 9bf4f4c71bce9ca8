"""Corpora of your own: Hugging Face datasets, compressed and multi-file jsonl, Parquet row groups, globs, prose
folders; each scored (and one trained on), each with its hostile inputs: one clear line, good documents kept."""
import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from phf.cli.main import main
from phf.core.config import CorpusConfig, ScoringConfig
from phf.core.errors import PhfError
from phf.data.corpus import Corpus
from phf.data.scoring import score_corpus
from tests.conftest import tiny_overrides


def code_records(pycorpus, column="text"):
    return [{"id": p.name, column: p.read_text()} for p in sorted(pycorpus.glob("*.py"))]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_zst(path, records):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def read(source, **cfg):
    corpus = Corpus(CorpusConfig(source=str(source), validation_fraction=0.2, test_fraction=0.2, **cfg))
    return list(corpus), corpus.stats


def test_compressed_jsonl_json_arrays_and_globs_read_the_same_documents(pycorpus, tmp_path):
    records = code_records(pycorpus)
    write_jsonl(tmp_path / "a.jsonl", records)
    write_jsonl(tmp_path / "b.jsonl.gz", records, gzip.open)
    write_zst(tmp_path / "c.jsonl.zst", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    expected = [(r["id"], r["text"]) for r in records]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.json"):
        docs, _ = read(tmp_path / name)
        assert [(d.id, d.text) for d in docs] == expected, name
    shards = tmp_path / "shards"
    shards.mkdir()
    write_zst(shards / "part-0.jsonl.zst", records[:3])
    write_zst(shards / "part-1.jsonl.zst", records[3:])
    for source in (shards / "*.jsonl.zst", shards):  # a glob, and a folder of data files
        docs, _ = read(source)
        assert sorted((d.id, d.text) for d in docs) == sorted(expected)


def test_parquet_with_row_groups_other_columns_and_given_splits(pycorpus, tmp_path):
    records = code_records(pycorpus, column="content")
    for i, r in enumerate(records):
        r["part"] = ["train", "dev", "test"][i % 3]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=2)
    assert pq.ParquetFile(tmp_path / "c.parquet").num_row_groups > 2
    docs, _ = read(tmp_path / "c.parquet", text_column="content", split_column="part")
    assert [d.text for d in docs] == [r["content"] for r in records]
    assert [d.split for d in docs] == [{"train": "train", "dev": "validation", "test": "test"}[r["part"]]
                                       for r in records]
    with pytest.raises(PhfError, match="has no `text` column .*set corpus.text_column"):
        read(tmp_path / "c.parquet")


def test_a_save_to_disk_dataset_with_its_own_splits_is_scored_and_trained_on(pycorpus, tmp_path, capsys):
    import datasets

    records = code_records(pycorpus, column="code")
    rows = {k: [r[k] for r in records] for k in ("id", "code")}
    whole = datasets.Dataset.from_dict(rows)
    splits = datasets.DatasetDict({"train": whole.select(range(6)), "validation": whole.select(range(6, 8)),
                                   "test": whole.select(range(8, len(records)))})
    splits.save_to_disk(tmp_path / "ds")
    docs, _ = read(tmp_path / "ds", text_column="code")
    assert [(d.id, d.split) for d in docs[:6]] == [(r["id"], "train") for r in records[:6]]
    assert {d.split for d in docs[6:8]} == {"validation"} and {d.split for d in docs[8:]} == {"test"}

    args = ["-q", "train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
    for o in tiny_overrides(str(tmp_path / "ds")) + ["corpus.text_column=code", "train.max_steps=2"]:
        args += ["--set", o]
    main(args)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists() and run["scored_corpus"]

    datasets.DatasetDict({"train": whole, "extra": whole}).save_to_disk(tmp_path / "odd")
    with pytest.raises(PhfError, match="has a split 'extra'"):
        read(tmp_path / "odd", text_column="code")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ds", broken)
    for arrow in broken.rglob("*.arrow"):
        arrow.unlink()
    with pytest.raises(PhfError, match="cannot be loaded .*write it again with `save_to_disk`"):
        read(broken, text_column="code")


def test_hostile_data_files_are_one_line_and_a_mixed_folder_keeps_its_good_documents(pycorpus, tmp_path, caplog):
    records = code_records(pycorpus)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "good.jsonl.gz", records[:4], gzip.open)
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records[4:]).encode())
    (mixed / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (mixed / "fake.jsonl.zst").write_bytes(b"this is not zstandard at all\n")
    docs, stats = read(mixed)
    assert [d.id for d in docs][:4] == [r["id"] for r in records[:4]]  # every good document is read
    assert stats.skipped["damaged data file"] == 2
    assert "truncated.jsonl.gz is not a readable gzip file" in caplog.text
    assert "fake.jsonl.zst is not a readable zstandard file" in caplog.text
    for name, message in (("truncated.jsonl.gz", "is not a readable gzip file or is truncated"),
                          ("fake.jsonl.zst", "is not a readable zstandard file or is truncated")):
        with pytest.raises(PhfError, match=message) as exc:
            read(mixed / name)  # alone, the same damage ends the run with one line
        assert "\n" not in str(exc.value)
    (tmp_path / "obj.json").write_text('{"text": "a single object"}')
    with pytest.raises(PhfError, match="holds a JSON dict, not an array"):
        read(tmp_path / "obj.json")
    with pytest.raises(PhfError, match="matches no data file"):
        read(tmp_path / "nothing-*.jsonl")


def test_prose_tasks_read_a_folder_of_text_files_and_count_what_they_skip(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Write to me at jane.doe@example.com any time. Thanks!\n")
    (notes / "b.md").write_text("# Notes\n\nNothing personal here at all.\n")
    (notes / "README").write_text("Call +1 202 555 0143 after six.\n")
    (notes / "tool.py").write_text("print('not prose')\n")
    main(["-q", "score", "--task", "pii", "--corpus", str(notes), "--out", str(tmp_path / "data"), "--workers", "1",
          "--set", "corpus.validation_fraction=0", "--set", "corpus.test_fraction=0"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"]["train"] == 3 and sum(summary["documents"].values()) == 3
    assert summary["skipped"] == {"extension not in corpus.extensions": 1}


def test_a_scored_jsonl_zst_corpus_matches_the_plain_one(pycorpus, tmp_path):
    records = code_records(pycorpus)
    write_jsonl(tmp_path / "a.jsonl", records)
    write_zst(tmp_path / "a.jsonl.zst", records)
    scoring = ScoringConfig(scorer="pep8", workers=1, shard_documents=4)
    plain = score_corpus(CorpusConfig(source=str(tmp_path / "a.jsonl")), scoring, tmp_path / "d1", progress=False)
    zst = score_corpus(CorpusConfig(source=str(tmp_path / "a.jsonl.zst")), scoring, tmp_path / "d2", progress=False)
    assert plain.table().equals(zst.table())


def test_every_part_reads_alone_what_a_sequential_read_finds(pycorpus, tmp_path):
    """A part is read by a fresh reader (another process, a Ray actor) exactly as in order: a seek into plain
    jsonl, reading forward into gzip and zstandard, one Parquet row group, a slice of an array or a dataset."""
    import datasets

    records = code_records(pycorpus)
    records.insert(3, {"id": "no-text"})  # skipped and counted, wherever its part is read
    write_jsonl(tmp_path / "a.jsonl", records)
    write_jsonl(tmp_path / "b.jsonl.gz", records, gzip.open)
    write_zst(tmp_path / "c.jsonl.zst", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist([r for r in records if "text" in r]), tmp_path / "e.parquet",
                   row_group_size=3)
    datasets.Dataset.from_list([r for r in records if "text" in r]).save_to_disk(tmp_path / "f")
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.json", "e.parquet", "f"):
        cfg = CorpusConfig(source=str(tmp_path / name))
        corpus = Corpus(cfg)
        parts = corpus.parts(2)
        assert len(parts) >= 5 and all(p.count <= 2 for p in parts), name
        in_order = [(d.id, d.text, d.split) for p in parts for d in corpus.read_part(p)]
        assert in_order == [(d.id, d.text, d.split) for d in Corpus(cfg)], name  # as parts of 1024
        assert [i for i, _, _ in in_order] == [r["id"] for r in records if "text" in r], name
        alone = []
        for p in reversed(parts):  # each by its own reader, last first
            alone = [(d.id, d.text, d.split) for d in Corpus(cfg).read_part(p)] + alone
        assert alone == in_order, name
        if name.endswith("jsonl"):
            assert corpus.stats.skipped == {"record without a text field": 1}
    starts = [p.start for p in Corpus(CorpusConfig(source=str(tmp_path / "a.jsonl"))).parts(2)]
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert all(a == 0 or raw[a - 1:a] == b"\n" for a in starts)  # every part starts at a line


def test_max_documents_keeps_the_same_subset_however_the_file_is_cut(pycorpus, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", code_records(pycorpus) * 3)  # ids repeat: the subset is by id
    cfg = CorpusConfig(source=str(tmp_path / "a.jsonl"), max_documents=10)
    by_two = [d.text for p in Corpus(cfg).parts(2) for d in Corpus(cfg).read_part(p)]
    by_five = [d.text for p in Corpus(cfg).parts(5) for d in Corpus(cfg).read_part(p)]
    assert by_two == by_five and 0 < len(by_two) < 3 * len(code_records(pycorpus))


def test_precomputed_scores_train_without_running_a_scorer(pycorpus, tmp_path):
    """The layout of the paper's released datasets: per document a list of segment texts and a list of scores."""
    from phf.tasks import get_task
    from phf.training.trainer import run_training
    from tests.conftest import tiny_overrides

    records = []
    for p in sorted(pycorpus.glob("*.py")):
        lines = p.read_text().splitlines(keepends=True)
        records.append({"id": p.name, "texts": lines, "scores": [float("    " in x) for x in lines]})
    records.append({"id": "bad", "texts": ["a\n", "b\n"], "scores": [0.0]})  # lengths differ: skipped, counted
    write_jsonl(tmp_path / "scored.jsonl", records)
    scoring = ScoringConfig(scorer="tests.helpers:never_called", precomputed="texts:scores", workers=1)
    scored = score_corpus(CorpusConfig(source=str(tmp_path / "scored.jsonl"), validation_fraction=0.2,
                                       test_fraction=0.2), scoring, tmp_path / "data", progress=False)
    table = scored.table().to_pylist()
    by_id = {r["id"]: r for r in table}
    assert "bad" not in by_id and len(by_id) == len(records) - 1
    for rec in records[:-1]:
        row = by_id[rec["id"]]
        assert row["text"] == "".join(rec["texts"]) and row["seg_score"] == rec["scores"]
        assert [row["text"][a:b] for a, b in zip(row["seg_start"], row["seg_end"])] == rec["texts"]

    cfg = get_task("pep8").run_config("conditional",
                                      tiny_overrides(str(tmp_path / "scored.jsonl"))
                                      + ["scoring.scorer=tests.helpers:never_called", "scoring.precomputed=texts:scores",
                                         "train.max_steps=2"])
    result = run_training(cfg, tmp_path / "run", tmp_path / "data2", progress=False)
    assert result.data.streams["train"].meta["tokens_<|misaligned|>"] > 0  # the given scores labelled segments


def test_a_code_folder_with_a_json_file_is_still_a_folder_of_text_files(pycorpus, tmp_path):
    folder = tmp_path / "project"
    shutil.copytree(pycorpus, folder)
    (folder / "package.json").write_text('{"name": "not a corpus"}')
    docs, stats = read(folder)
    assert sorted(d.id for d in docs) == sorted(p.name for p in pycorpus.glob("*.py"))
    assert stats.skipped["extension not in corpus.extensions"] == 1


def test_an_uncached_hub_dataset_and_a_bad_precomputed_spec_are_one_line(tmp_path, monkeypatch):
    from phf.tasks import get_task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PhfError, match="cannot load dataset hf:someone/no-such-corpus .*local datasets cache") as exc:
        read("hf:someone/no-such-corpus")
    assert "\n" not in str(exc.value)
    for spec in ("texts", "a:b:c", ":scores"):
        with pytest.raises(PhfError, match="scoring.precomputed must be SEGMENTS:SCORES"):
            get_task("pep8").run_config("mle", [f"scoring.precomputed={spec}"])
