"""`phf probe strength`: the conditioning strength of any conditional model folder, as results JSON, a table and a
study of the folder's report; the numbers are phf.evaluation.strength's on the model's held-out documents."""
import json

import pytest
from transformers import AutoTokenizer

from phf.core.errors import PhfError
from phf.evaluation.strength import NEAR_ZERO_NATS, conditioning_strength
from tests.test_conditioning_strength import two_writers_config


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A conditional model that has learned its control tokens and an MLE model, side by side as `phf demo` leaves
    them, with a results.json for the report."""
    from phf.training.trainer import run_training

    root = tmp_path_factory.mktemp("strength-probe")
    for objective, steps in (("conditional", 60), ("mle", 2)):
        run_training(two_writers_config(root, objective, steps), root / objective, root / "data", progress=False)
    objectives = {o: {"misalignment_mean": 0.1, "heldout_bits_per_char": 3.0, "run_dir": o}
                  for o in ("mle", "conditional")}
    (root / "results.json").write_text(json.dumps({"task": "pep8", "objectives": objectives}))
    return root


def test_the_probe_measures_each_kind_of_segment_and_enters_the_report(demo_like, capsys):
    from phf.cli.main import main
    from phf.data.scoring import ScoredCorpus
    from phf.data.tokenizer import of_transformers
    from phf.model.lm import load_model

    main(["-q", "probe", "strength", "--model", str(demo_like / "conditional"), "--out",
          str(demo_like / "strength"), "--heldout-chars", "3000"])
    printed = capsys.readouterr().out
    res = json.loads((demo_like / "strength" / "results.json").read_text())
    row = res["models"]["conditional"]
    assert row["objective"] == "conditional" and row["learned"] is True
    for kind in ("aligned", "misaligned"):
        assert row[kind]["segments"] > 10 and row[kind]["nats_per_segment"] > NEAR_ZERO_NATS
        assert row[kind]["ci95"][0] <= row[kind]["nats_per_segment"] <= row[kind]["ci95"][1]
    assert "misaligned segments, nats" in printed and f"{row['misaligned']['nats_per_segment']:+.3f}" in printed

    # the same numbers as measuring it directly on the model's held-out documents
    checkpoint = demo_like / "conditional" / "checkpoint"
    scored = ScoredCorpus(json.loads((demo_like / "conditional" / "run.json").read_text())["scored_corpus"])
    direct = conditioning_strength(load_model(checkpoint), of_transformers(AutoTokenizer.from_pretrained(
        str(checkpoint))), scored.documents("test"), row["threshold"], max_chars=3000)
    for kind in ("aligned", "misaligned"):
        assert row[kind]["nats_per_segment"] == pytest.approx(direct[kind]["nats_per_segment"], rel=1e-6)
        assert row[kind]["segments"] == direct[kind]["segments"]

    page = (demo_like / "report.html").read_text()
    assert "Conditioning strength" in page and (demo_like / "figures" / "strength.png").exists()


def test_a_model_without_control_tokens_and_bad_settings_are_one_line(demo_like, tmp_path, capsys):
    from phf.analysis.strength import StrengthConfig
    from phf.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", "probe", "strength", "--model", str(demo_like / "mle"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "was not trained with control tokens" in err and err.count("\n") == 1
    with pytest.raises(PhfError, match="--heldout-chars must be >= 1"):
        StrengthConfig.of({"model": [demo_like / "conditional"], "out": tmp_path, "heldout_chars": 0})
    with pytest.raises(PhfError, match="unknown setting 'chars' of StrengthConfig"):
        StrengthConfig.of({"model": [demo_like / "conditional"], "out": tmp_path, "chars": 10})
