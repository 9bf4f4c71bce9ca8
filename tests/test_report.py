"""The report: Pareto front, what each scorer flags, escaping of model output, and the page in a real browser."""
from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phf.core.errors import PhfError
from phf.core.io import write_json
from phf.data.scorers import get_scorer
from phf.evaluation.evaluate import score_samples
from phf.evaluation.sampling import Sample
from phf.report.page import highlight, load, pareto_front, pick_samples, write_report

# Model output that would run in the page if it were not escaped: it sets a mark the browser test looks for.
HOSTILE = ('x = 1\n</pre><script>document.body.dataset.pwned = "script"</script>\n'
           '<img src=x onerror="document.body.dataset.pwned = \'img\'">\n')
CLEAN = "def add(a, b):\n    return a + b\n"
MESSY = "import os\nx=1\ndef f( a ):\n  return a\n"
PROMPT = 'def area(r):\n    """Area of a circle."""\n'
CONTINUATION = "    return  3.14*r*r\n"

# (name, run_dir or None, misalignment, KL bits/char, held-out bits/char, distinct-2)
SWEEP = [("mle", "mle", 0.0438, None, 2.276, 0.61), ("filtering", "filtering", 0.0428, 0.090, 2.328, 0.58),
         ("conditional", "conditional", 0.0168, 0.050, 2.318, 0.55), ("unlikelihood", "unlikelihood", 0.0410, 0.020,
                                                                      2.281, 0.60),
         ("rwr", "rwr", 0.0350, 0.040, 2.290, 0.59), ("awr", "awr", 0.0300, 0.030, 2.300, 0.57),
         ("finetune:conditional", None, 0.0250, 0.060, 2.295, 0.56),
         ("rl", "rl", 0.0460, -0.001, 2.277, 0.60)]  # a Monte Carlo KL estimate can come out below 0
FRONT = {"mle", "unlikelihood", "awr", "conditional", "rl"}  # lower is better on both misalignment and KL


def _samples(scorer, extra: list[str]) -> list[dict]:
    samples = [Sample("unconditional", "", t, t, True, 20) for t in [CLEAN, MESSY, *extra]]
    samples.append(Sample("prompted", PROMPT, CONTINUATION, CONTINUATION, True, 12))
    scores = score_samples(samples, scorer)  # the real scorer's scores, as evaluation stores them
    return [dict(s.__dict__, score=sc) for s, sc in zip(samples, scores)]


def make_results_dir(root: Path, task: str = "pep8", sweep: bool = True) -> Path:
    """A result folder shaped like `phf sweep` writes it (or like `phf demo`: no KL, no misalignment evaluations
    during training), with samples scored by the real PEP8 scorer."""
    scorer = get_scorer("pep8")
    objectives = {}
    rows = SWEEP if sweep else SWEEP[:3]
    for i, (name, run_dir, mis, kl, bpc, d2) in enumerate(rows):
        entry = {"objective": name.split(":")[-1], "scorer": "pep8", "scorer_version": scorer.version,
                 "misalignment_mean": mis, "score_max_at_25": mis * 9, "misaligned_share": 0.98,
                 "heldout_bits_per_char": bpc, "parse_rate": 0.04, "train_tokens": 800_768, "val_loss": 5.27 + i / 50,
                 "unconditional": {"misalignment_mean": mis, "mean_chars": 650.0 + i, "empty_share": 0.02},
                 "prompted": {"misalignment_mean": mis * 0.9}}
        if sweep:
            entry["distinct_2"] = d2
            entry["kl_from_reference_bits"] = 0.0 if kl is None else kl
            entry["kl_stderr_bits"] = 0.0 if kl is None else 0.002
            if run_dir:
                entry["run_dir"] = run_dir
        objectives[name] = entry
        folder = root / (run_dir or name.replace(":", "-"))
        folder.mkdir(parents=True)
        finetune = name.startswith("finetune:")
        start = 600_000 if finetune else 0
        lines = []
        for step in range(1, 5):
            tokens = step * 50_000 if finetune else step * 200_000
            row = {"step": step * 10, "tokens": tokens, "loss": 6.0 - step * 0.2 - i / 20, "lr": 1e-3}
            ev = {"step": step * 10, "tokens": tokens, "val_loss": 6.1 - step * 0.2 - i / 20}
            if finetune:
                row["total_tokens"] = ev["total_tokens"] = start + tokens
            if sweep:
                ev["eval_misalignment_mean"] = mis * (1 + 1 / step)
            lines += [row, ev]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        extra = [HOSTILE] if name == "conditional" else []
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _samples(scorer, extra)))
    write_json(root / "results.json", {"task": task, "objectives": objectives, "wall_seconds": 1234.0,
                                       "corpus": {"documents": {"train": 536, "validation": 42, "test": 27},
                                                  "chars": 9_717_248, "misaligned_segment_share": 0.047},
                                       "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}})
    return root


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> Path:
    root = make_results_dir(tmp_path_factory.mktemp("sweep"))
    return write_report([root])


# -- the Pareto front -------------------------------------------------------------------------------------------
def test_pareto_front_by_hand():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 1), (None, 0), (math.nan, 0), (0.5, math.nan), (2, 3)]
    assert pareto_front(pts) == [0, 1, 8, 3]  # (3, 4) and (5, 1) are dominated; ties both stay; missing never
    assert pareto_front([]) == []
    assert pareto_front([(0.0, 0.04), (0.05, 0.017), (0.09, 0.043)]) == [0, 1]  # the demo: mle, conditional


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=30))
def test_pareto_front_properties(points):
    front = pareto_front(points)
    members = [points[i] for i in front]
    dominates = lambda p, q: p[0] <= q[0] and p[1] <= q[1] and p != q  # noqa: E731
    for i, p in enumerate(points):
        dominated = any(dominates(q, p) for q in points)
        assert (i in front) == (not dominated)
        if dominated:  # everything off the front is dominated by something on it
            assert any(dominates(q, p) for q in members)
    assert [p[0] for p in members] == sorted(p[0] for p in members)


# -- what the scorers flag --------------------------------------------------------------------------------------
def test_pep8_flags_violating_lines_with_codes():
    spans = get_scorer("pep8").flagged_spans(MESSY)
    assert [MESSY[a:b] for a, b, _ in spans] == ["x=1", "def f( a ):", "  return a"]
    labels = [label for _, _, label in spans]
    assert labels[0].startswith("E225 ") and "E201" in labels[1] and "E202" in labels[1] and "E111" in labels[2]
    assert get_scorer("pep8").flagged_spans(CLEAN) == []


def test_pii_flags_entities_with_types():
    text = "Thanks to Jane for the fix. Write to jane.doe@example.com or see https://example.org/bugs today."
    scorer = get_scorer("pii")
    spans = scorer.flagged_spans(text)
    assert (text.index("jane.doe@"), text.index(" or see"), "email") in spans
    assert any(text[a:b] == "https://example.org/bugs" and label == "url" for a, b, label in spans)
    assert len(spans) == scorer.count(text)  # what is highlighted is what the score counts


def test_toxicity_flags_offensive_sentences_only():
    text = "The weather was lovely on the coast. You are a stupid worthless idiot."
    spans = get_scorer("toxicity").flagged_spans(text)
    assert len(spans) == 1 and text[spans[0][0]:spans[0][1]].strip() == "You are a stupid worthless idiot."
    assert spans[0][2].startswith("offensive, p=")


def test_base_scorer_flags_segments_above_threshold():
    scorer = get_scorer("tests.helpers:count_x")  # a user's callable: x's per line
    text = "one\nxx two\nthree x\n"
    assert [(text[a:b], label) for a, b, label in scorer.flagged_spans(text)] == [
        ("xx two\n", "tests.helpers:count_x score 2"), ("three x\n", "tests.helpers:count_x score 1")]
    assert [text[a:b] for a, b, _ in scorer.flagged_spans(text, threshold=1.5)] == ["xx two\n"]


# -- escaping and selection -------------------------------------------------------------------------------------
def test_highlight_escapes_text_and_labels():
    out = highlight('a <b> & "c"', [(2, 5, 'E1 <x> "q"'), (3, 4, "overlap, clipped")])
    assert out == ('a <mark title="E1 &lt;x&gt; &quot;q&quot;" data-tag="E1 &lt;x&gt; &quot;q&quot;">&lt;b&gt;</mark>'
                   ' &amp; &quot;c&quot;')
    assert highlight("<script>", []) == "&lt;script&gt;"


def test_pick_samples_highest_median_lowest():
    rows = [{"score": s, "text": str(s)} for s in (0.3, float("nan"), 0.1, 0.2, 0.5, 0.4)]
    assert [(w, r["score"]) for w, r in pick_samples(rows)] == [
        ("highest score", 0.5), ("median score", 0.3), ("lowest score", 0.1)]
    assert [w for w, _ in pick_samples(rows[:1])] == ["highest score"]


# -- the page ---------------------------------------------------------------------------------------------------
def test_report_files_table_and_samples(sweep_report):
    page = sweep_report.read_text()
    figures = sweep_report.parent / "figures"
    names = sorted(p.name for p in figures.iterdir())
    assert names == ["loss_vs_tokens.png", "misalignment_vs_kl.png", "misalignment_vs_tokens.png",
                     "score_distribution.png"]
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted((figures / n).read_bytes() for n in names)  # the same PNGs, inline
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in embedded)
    assert "http://" not in page.replace('xmlns="http://www.w3.org', "") and "https://" not in page
    # the table: one row per objective, ratios to MLE, the Pareto front marked
    table = page[page.index("<table id=metrics>"):page.index("</table>")]
    rows = re.findall(r"<tr><th scope=row>([^<]+)</th>(.*?)</tr>", table)
    assert [r[0] for r in rows] == [s[0] for s in SWEEP]
    assert {name for name, cells in rows if cells.endswith("<td class=front>✓</td>")} == FRONT
    conditional = dict(rows)["conditional"]
    assert "0.38× mle" in conditional and "+1.8% vs mle" in conditional and "0.0500 ± 0.0020" in conditional
    assert "drawn at the left edge as triangles: rl." in page
    assert "distinct-2" in table and "KL from mle" in table
    # model output is escaped, never markup
    assert "<script>document.body" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.body.dataset.pwned" in page
    # violating lines marked with their codes; the stored scores agree with the scorer now
    assert re.search(r'<mark title="E225 missing whitespace around operator" data-tag="E225">x=1</mark>', page)
    assert "<span class=warn>" not in page
    assert "finetune:conditional" in page and "KL divergence from the mle model" in page


def test_report_flags_a_score_the_scorer_no_longer_gives(tmp_path):
    root = make_results_dir(tmp_path / "run", sweep=False)
    path = root / "filtering" / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["score"] = 0.999  # MESSY, stored with a score its text does not have
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report([root], tmp_path / "out").read_text()
    assert page.count("<span class=warn>re-scored now: 0.1351") == 1 and "score 0.999" in page


def test_demo_shaped_folder_falls_back_to_bits_per_char(tmp_path):
    root = make_results_dir(tmp_path / "demo", sweep=False)
    (root / "figures").mkdir()
    (root / "figures" / "misalignment_vs_kl.png").write_bytes(b"stale")
    page = write_report([root]).read_text()
    figures = sorted(p.name for p in (root / "figures").iterdir())
    assert figures == ["loss_vs_tokens.png", "misalignment_vs_bits_per_char.png", "score_distribution.png"]
    assert "No KL from a reference was measured" in page and "held-out bits per character" in page
    assert "misalignment vs tokens seen: these runs have no evaluation with samples" in page
    assert "distinct-2" not in page


def test_several_folders_and_errors(tmp_path):
    a = make_results_dir(tmp_path / "a", sweep=False)
    b = make_results_dir(tmp_path / "b", sweep=True)
    rep = load([a, b])
    assert [x.label for x in rep.arms][:4] == ["a/mle", "a/filtering", "a/conditional", "b/mle"]
    finetune = next(x for x in rep.arms if x.label == "b/finetune:conditional")
    assert finetune.finetune and finetune.run_dir == b / "finetune-conditional"
    assert finetune.reference is rep.arms[3].entry and rep.arms[1].reference is rep.arms[0].entry
    from phf.cli.main import main

    main(["-q", "report", str(a), str(b), "--out", str(tmp_path / "both")])
    assert (tmp_path / "both" / "report.html").exists() and not (a / "report.html").exists()
    with pytest.raises(PhfError, match="phf demo"):
        load([tmp_path])
    c = make_results_dir(tmp_path / "c", task="pii", sweep=False)
    with pytest.raises(PhfError, match="once per task"):
        load([a, c])


# -- in a real browser ------------------------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("the report's test renders the page in headless Chromium, which is not installed: "
                "apt-get install chromium (`make test` installs it when run as root)")


def test_report_renders_in_headless_chromium(sweep_report, tmp_path):
    # no background networking: the page is offline, and a closed network makes Chromium's own lookups slow
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           sweep_report.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # slow to start on 2 cores
    dom = done.stdout
    assert done.returncode == 0 and "<body" in dom, done.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-figures="loaded"' in body and 'data-figures-loaded="4/4"' in body, body
    assert "pwned" not in body  # the hostile sample stayed text
    table = dom[dom.index('<table id="metrics">'):dom.index("</table>")]
    assert len(re.findall(r"<tr>", table)) == 1 + len(SWEEP)
    assert dom.count('<details class="arm"') == len(SWEEP)
