"""The scored corpus is reused only while its inputs are the same: editing a corpus file in place, or the source of
a `module:callable` scorer, scores again, with a line saying why; `phf score --rescore` forces it."""
import importlib
import logging
import shutil
import sys

from phf.core.config import CorpusConfig, ScoringConfig
from phf.data.scoring import score_corpus


def corpus_cfg(folder):
    return CorpusConfig(source=str(folder), validation_fraction=0.2, test_fraction=0.2)


def test_editing_a_corpus_file_in_place_rescores(pycorpus, tmp_path, caplog):
    folder = tmp_path / "code"
    shutil.copytree(pycorpus, folder)
    scoring = ScoringConfig(scorer="pep8", workers=1, shard_documents=4)
    first = score_corpus(corpus_cfg(folder), scoring, tmp_path / "data", progress=False)
    again = score_corpus(corpus_cfg(folder), scoring, tmp_path / "data", progress=False)
    assert again.path == first.path  # nothing changed: reused

    target = sorted(folder.glob("*.py"))[0]
    target.write_text(target.read_text() + "x=1  # an edit in place, E225 twice\n")
    with caplog.at_level(logging.WARNING):
        edited = score_corpus(corpus_cfg(folder), scoring, tmp_path / "data", progress=False)
    assert edited.path != first.path
    assert f"1 corpus file(s) edited ({target.name})" in caplog.text
    doc = next(d for d in edited.documents() if d.id == target.name)
    assert doc.text.endswith("x=1  # an edit in place, E225 twice\n")


def test_editing_a_scorers_source_rescores(pycorpus, tmp_path, caplog, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "myscorer.py").write_text("def score(texts):\n    return [0.0 for t in texts]\n")
    monkeypatch.syspath_prepend(str(pkg))
    scoring = ScoringConfig(scorer="myscorer:score", workers=1, shard_documents=4)
    first = score_corpus(corpus_cfg(pycorpus), scoring, tmp_path / "data", progress=False)
    assert all(s == 0.0 for s in first.document_scores("train"))

    (pkg / "myscorer.py").write_text("def score(texts):\n    return [float(len(t) > 0) for t in texts]\n")
    sys.modules.pop("myscorer", None)
    importlib.invalidate_caches()
    with caplog.at_level(logging.WARNING):
        second = score_corpus(corpus_cfg(pycorpus), scoring, tmp_path / "data", progress=False)
    assert second.path != first.path and "the scorer changed (source " in caplog.text
    assert any(s > 0 for s in second.document_scores("train"))  # the new code scored it
    sys.modules.pop("myscorer", None)


def test_rescore_forces_scoring_again(pycorpus, tmp_path, capsys):
    from phf.cli.main import main

    args = ["-q", "score", "--corpus", str(pycorpus), "--out", str(tmp_path / "data"), "--workers", "1",
            "--set", "corpus.exclude="]
    main(args)
    manifest = next((tmp_path / "data" / "scored").glob("pep8-*/manifest.json"))
    before = manifest.stat().st_mtime_ns
    main(args)
    assert manifest.stat().st_mtime_ns == before  # reused
    main(args + ["--rescore"])
    assert manifest.exists() and manifest.stat().st_mtime_ns != before
