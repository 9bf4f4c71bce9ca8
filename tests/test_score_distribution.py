"""`phf score` records the score distribution (quantiles, the share above each threshold, a histogram), and a
threshold can be given as a quantile of the training document scores wherever one is taken."""
import json

import numpy as np
import pytest


def _score(pycorpus, tmp_path, capsys, *extra):
    from phf.cli.main import main

    main(["score", "--corpus", str(pycorpus), "--out", str(tmp_path / "data"), "--workers", "1", *extra])
    return json.loads(capsys.readouterr().out)


def test_score_prints_and_records_the_distribution_with_each_threshold(pycorpus, tmp_path, capsys, caplog):
    from phf.data.scoring import QUANTILES, ScoredCorpus

    caplog.set_level("INFO", logger="phf")
    summary = _score(pycorpus, tmp_path, capsys, "--set", "objective.name=filtering",
                     "--set", "objective.threshold_quantile=0.9")
    dist = summary["distribution"]
    scored = ScoredCorpus(summary["path"])
    docs = scored.document_scores("train")
    docs = docs[~np.isnan(docs)]
    segs = np.array([s for d in scored.documents("train") for s in d.scores])
    assert dist["documents"] == len(docs) and dist["segments"] == len(segs)
    assert dist["document_quantiles"] == pytest.approx(np.quantile(docs, QUANTILES).tolist())
    assert dist["segment_quantiles"] == pytest.approx(np.quantile(segs, QUANTILES).tolist())
    th = dist["thresholds"]
    assert set(th) == {"misaligned_above", "filtering threshold", "conditional threshold", "unlikelihood threshold",
                       "filtering threshold (this config)"}
    median, own = th["filtering threshold"], th["filtering threshold (this config)"]
    assert median["value"] == pytest.approx(np.quantile(docs, 0.5)) and median["given_as"] == "quantile 0.5"
    assert own["value"] == pytest.approx(np.quantile(docs, 0.9))
    assert own["document_quantile"] == pytest.approx(np.mean(docs <= own["value"]))  # interpolated: 23 of 26
    zero = th["conditional threshold"]  # pep8's: any violation
    assert zero["value"] == 0 and zero["segments_above"] == pytest.approx(np.mean(segs > 0))
    assert zero["documents_above"] == pytest.approx(np.mean(docs > 0))
    assert zero["document_quantile"] == pytest.approx(np.mean(docs <= 0))
    assert scored.manifest["distribution"]["thresholds"] == th  # on record in the manifest
    figure = scored.path / "score-distribution.png"
    assert dist["figure"] == str(figure) and figure.read_bytes()[:4] == b"\x89PNG"
    assert "score distribution of the train split" in caplog.text and "doc quantile" in caplog.text
    manifest = scored.path / "manifest.json"
    before = manifest.stat().st_mtime_ns, figure.stat().st_mtime_ns
    _score(pycorpus, tmp_path, capsys, "--set", "objective.name=filtering", "--set", "objective.threshold_quantile=0.9")
    assert (manifest.stat().st_mtime_ns, figure.stat().st_mtime_ns) == before  # a reused corpus stays untouched


def test_the_misalignment_threshold_as_a_quantile_is_resolved_once_the_corpus_is_scored(tiny_cfg_factory, tmp_path):
    from phf.core.config import config_to_yaml, load_config
    from phf.data.scoring import quantile_threshold
    from phf.tasks import score_run_corpus, task_for

    cfg = tiny_cfg_factory("conditional", ["scoring.misaligned_above_quantile=0.75", "objective.threshold=null"])
    scored = score_run_corpus(cfg, tmp_path / "data", progress=False)
    expected = float(np.quantile(scored.document_scores("train"), 0.75))
    assert expected > 0 and quantile_threshold(scored, 0.75) == pytest.approx(expected)
    assert cfg.scoring.misaligned_above == pytest.approx(expected)
    assert task_for(cfg).misaligned_above == pytest.approx(expected)
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))  # what a run folder records reads back the same
    assert task_for(load_config(tmp_path / "config.yaml")).misaligned_above == pytest.approx(expected)
    from phf.training.trainer import run_training

    run = tiny_cfg_factory("mle", ["scoring.misaligned_above_quantile=0.75", "train.max_steps=1"])
    run_training(run, tmp_path / "run", tmp_path / "data", progress=False)
    recorded = load_config(tmp_path / "run" / "config.yaml")  # what evaluation and the probes read
    assert recorded.scoring.misaligned_above == pytest.approx(expected)
    given = tiny_cfg_factory("conditional", ["scoring.misaligned_above_quantile=0.75", "scoring.misaligned_above=0.3"])
    score_run_corpus(given, tmp_path / "data", progress=False)
    assert given.scoring.misaligned_above == 0.3  # a value given wins, as objective.threshold over its quantile


@pytest.mark.parametrize("key", ["scoring.misaligned_above_quantile", "objective.threshold_quantile"])
@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_quantile_outside_0_1_is_one_clear_line(pycorpus, tmp_path, capsys, key, value):
    from phf.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", "score", "--corpus", str(pycorpus), "--out", str(tmp_path), "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{key} must be in [0, 1], got {float(value)}" in err and err.count("\n") == 1
