"""Held-out judges run offline and judge what they should: ruff's pycodestyle rules on the lines the model wrote,
HateSonar's classifier on insults (on a machine without the en_US locale its model asks for), spaCy's NER on
names; evaluation and `phf judge` put their scores beside the training scorer's."""
import json

import pytest

from phf.data.scorers import get_scorer
from phf.evaluation.evaluate import score_samples
from phf.evaluation.sampling import Sample

MESSY = "import os\ndef f( x ):\n  return x+1\nclass A:\n    pass\nx=1 \n"
CLEAN = "import os\n\n\ndef f(x):\n    return x + 1\n"


def sample(text, prompt="", scenario="unconditional"):
    return Sample(scenario, prompt, text, text, True, 10)


def test_ruff_judges_the_lines_pycodestyle_would_flag_and_only_the_models_lines():
    judge, pep8 = get_scorer("pep8-ruff"), get_scorer("pep8")
    messy, clean = judge.score_texts([MESSY, CLEAN])
    assert clean.document_score() == 0 and messy.document_score() > 0
    flagged = {i for i, s in enumerate(messy.scores) if s > 0}
    assert flagged == {i for i, s in enumerate(pep8.score_texts([MESSY])[0].scores) if s > 0} == {1, 2, 3, 5}
    assert judge.version.startswith("ruff ")
    # prompted: the prompt's own violations are not the model's
    prompt, continuation = MESSY, "y = 2\n"
    assert score_samples([sample(continuation, prompt, "prompted")], judge) == [0.0]
    assert score_samples([sample(MESSY)], judge)[0] > 0


def test_hatesonar_judges_insults_offline_without_the_locale_its_model_asks_for():
    judge = get_scorer("toxicity-hatesonar")
    insult, kind = judge.score_texts(["The meeting is at noon on Tuesday. Shut up, you stupid bitch.",
                                      "The meeting is at noon on Tuesday. The tea is warm."])
    assert max(insult.scores) > 0.9 and max(kind.scores) < 0.5  # P(hate) + P(offensive) of the worst sentence
    assert insult.scores[0] < 0.5  # the benign sentence of the same sample is not flagged
    assert judge.aggregate == "max" and judge.version.startswith("hatesonar ")


def test_the_pii_judge_sees_names_not_the_patterns_training_used():
    pytest.importorskip("spacy")
    judge = get_scorer("pii-spacy")
    (named,), (mailed,) = judge.score_texts(["Yesterday Barack Obama met Angela Merkel in Berlin."]), \
        judge.score_texts(["Write to help@example.org or call 555-0100."])
    assert max(named.scores) > 0
    assert max(mailed.scores, default=0) == 0 < get_scorer("pii").score_texts(["Write to help@example.org."])[0].scores[0]


def test_phf_judge_scores_a_demo_folder_again_and_recombines_it(tmp_path, pycorpus, capsys):
    from phf.cli.main import main
    from tests.conftest import tiny_overrides

    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--set", "eval.judge=none"]
    for o in tiny_overrides(str(pycorpus)):
        args += ["--set", o]
    main(args)
    before = json.loads((out / "results.json").read_text())
    assert "judge" not in before["objectives"]["conditional"]
    main(["-q", "judge", str(out), "--judge", "pep8-ruff"])
    printed = capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    j = after["objectives"]["conditional"]["judge"]
    assert j["judge_scorer"] == "pep8-ruff" and "judge_misalignment_ratio_ci95" in j
    assert after["objectives"]["conditional"]["misalignment_mean"] == \
        pytest.approx(before["objectives"]["conditional"]["misalignment_mean"])
    records = [json.loads(line) for line in (out / "mle" / "samples.jsonl").read_text().splitlines()]
    assert all("judge_score" in r for r in records)
    assert "held-out judge pep8-ruff" in printed
    main(["-q", "judge", str(out), "--judge", "pep8"])  # the training scorer is no judge: said, not scored
    again = json.loads((out / "results.json").read_text())["objectives"]["mle"]["judge"]
    assert "is the training scorer" in again["unavailable"]


JUDGE_ON_DEVICE = '''
from phf.data.scorers.base import Scorer


class ModelJudge(Scorer):
    name = "model-judge"

    def __init__(self, device="cpu"):
        self.device = device

    def score_segments(self, segments):
        return [0.0 for _ in segments]
'''


def test_a_judge_that_is_a_model_runs_on_the_scoring_device_and_one_that_is_not_runs_where_it_is(tmp_path,
                                                                                                   monkeypatch):
    from phf.core.config import load_config
    from phf.evaluation.evaluate import judge_for
    from phf.tasks import get_task

    (tmp_path / "modeljudge.py").write_text(JUDGE_ON_DEVICE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["scoring.device=cuda:1", "eval.judge=modeljudge:ModelJudge"])
    judge, block = judge_for(cfg, get_task("pep8"))
    assert judge.device == "cuda:1" and block["judge_scorer"] == "modeljudge:ModelJudge"
    judge, _ = judge_for(load_config(None, ["scoring.device=cuda"]), get_task("pep8"))  # ruff: no device
    assert judge.name == "pep8-ruff"
