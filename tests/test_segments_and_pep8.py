import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phf.data.scorers import get_scorer
from phf.data.scorers.base import Scorer
from phf.data.segments import line_spans, split_lines
from tests.helpers import assert_spans_tile

DATA = Path(__file__).parent / "data" / "pycorpus"


@given(st.text(alphabet=st.sampled_from(list("ab \t\n\r\x0c:#'\"é")), max_size=200))
@settings(max_examples=300, deadline=None)
def test_line_spans_tile_the_text(text):
    spans = line_spans(text)
    assert_spans_tile(text, spans)
    for a, b in spans[:-1]:
        assert text[b - 1] == "\n" and "\n" not in text[a:b - 1]


def test_lines_split_only_on_newline():
    assert split_lines("a\r\nb\x0cc\n\nd") == ["a\r\n", "b\x0cc\n", "\n", "d"]
    assert split_lines("") == []


def pycodestyle_total(path: Path) -> int:
    """Violations pycodestyle itself reports for a file (its own command line, default settings)."""
    out = subprocess.run([sys.executable, "-m", "pycodestyle", str(path)], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


@pytest.mark.parametrize("name", ["messy_style.py", "mixed_style.py", "shlex.py", "fractions.py", "string.py"])
def test_line_scores_add_up_to_pycodestyle_on_the_whole_file(name):
    path = DATA / name
    text = path.read_text()
    scorer = get_scorer("pep8")
    scored = scorer.score_texts([text])[0]
    violations = sum(round(s * (b - a)) for s, a, b in zip(scored.scores, scored.starts, scored.ends))
    assert violations == pycodestyle_total(path)
    total_chars = len(text)
    assert scored.document_score() == pytest.approx(violations / total_chars)


def test_line_scores_point_at_the_right_lines():
    text = (DATA / "mixed_style.py").read_text()
    scored = get_scorer("pep8").score_texts([text])[0]
    lines = split_lines(text)
    bad = {lines[i] for i, s in enumerate(scored.scores) if s > 0}
    assert bad == {"def unclean(value) :\n", "    result=value*3\n", "        return sum( self.items )\n"}
    i = lines.index("    result=value*3\n")
    assert scored.scores[i] == pytest.approx(1 / len(lines[i]))  # E225 (E226 is off by default)
    j = lines.index("        return sum( self.items )\n")
    assert scored.scores[j] == pytest.approx(2 / len(lines[j]))  # E201 and E202


def test_a_crashing_checker_marks_the_document_unscored_not_aligned(monkeypatch):
    scorer = get_scorer("pep8")

    def boom(text):
        raise IndexError("list index out of range")

    monkeypatch.setattr(scorer, "violations", boom)
    scored = scorer.score_texts(["x = 1\ny = 2\n"])[0]
    assert all(math.isnan(s) for s in scored.scores)
    assert scored.num_errors == 2 and "IndexError" in scored.errors[0]
    assert math.isnan(scored.document_score())


class Flaky(Scorer):
    """A scorer that fails on some segments: raises, or returns NaN / a negative number."""
    name = "flaky"

    def score_segments(self, segments):
        out = []
        for s in segments:
            if "raise" in s:
                raise ValueError("cannot score this")
            out.append(math.nan if "nan" in s else (-1.0 if "neg" in s else len(s) / 100))
        return out


def test_segment_failures_are_isolated_and_recorded():
    scored = Flaky().score_texts(["ok\nraise here\nfine\n", "nan line\nneg line\ngood\n"])
    a, b = scored
    assert a.scores[0] == pytest.approx(0.03) and a.scores[2] == pytest.approx(0.05)
    assert math.isnan(a.scores[1]) and "ValueError: cannot score this" in a.errors[1]
    assert a.errors[0] is None and a.errors[2] is None
    assert math.isnan(b.scores[0]) and "nan" in b.errors[0]
    assert math.isnan(b.scores[1]) and "negative" in b.errors[1]
    assert b.scores[2] == pytest.approx(0.05)


def test_custom_callable_scorer_by_module_path():
    scorer = get_scorer("tests.helpers:count_x")
    scored = scorer.score_texts(["xx\nab\n"])[0]
    assert scored.scores == [2.0, 0.0]
