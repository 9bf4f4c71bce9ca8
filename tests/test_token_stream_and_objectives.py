import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phf.core.config import ObjectiveConfig, TokenizerConfig
from phf.core.tokens import ALIGNED, EOS, MISALIGNED
from phf.data.scoring import ScoredDocument
from phf.data.segments import line_spans
from phf.data.token_stream import annotate, annotate_for_training, encode_annotated
from phf.data.tokenizer import train_tokenizer
from phf.tasks import get_task
from phf.training.objectives import get_objective


@pytest.fixture(scope="module")
def tok(pycorpus):
    texts = [p.read_text() for p in sorted(pycorpus.glob("*.py"))]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600))


def make_doc(text, scores, doc_id="d"):
    spans = line_spans(text)
    assert len(spans) == len(scores)
    total = sum(s * (b - a) for s, (a, b) in zip(scores, spans)) / len(text)
    return ScoredDocument(doc_id, "train", text, [a for a, _ in spans], [b for _, b in spans], list(scores), [None] *
                          len(scores), total)


def test_tokenizer_has_control_tokens_as_single_special_tokens(tok):
    for t in (EOS, ALIGNED, MISALIGNED):
        assert tok.token_to_id(t) is not None
    ids = tok.encode(f"{ALIGNED}x = 1\n{MISALIGNED}y=2\n", add_special_tokens=False).ids
    assert ids.count(tok.token_to_id(ALIGNED)) == 1 and ids.count(tok.token_to_id(MISALIGNED)) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "x = 1\ny=2\n"
    # the control tokens never arise from ordinary text
    assert tok.token_to_id(ALIGNED) not in tok.encode("<|aligned|".replace("|", "| "), add_special_tokens=False).ids


def test_conditional_puts_the_right_token_before_exactly_the_right_lines(tok):
    text = "import os\nx=1\n\ny = 2\n"
    doc = make_doc(text, [0.0, 0.25, 0.0, 0.0])
    obj = get_objective(ObjectiveConfig(name="conditional", drop_token_fraction=0.0), get_task("pep8"))
    obj.fit(np.array([0.1]))
    a = annotate_for_training(doc, obj, seed=0)
    assert a.text == f"{ALIGNED}import os\n{MISALIGNED}x=1\n{ALIGNED}\n{ALIGNED}y = 2\n"
    ids, scores = next(encode_annotated(tok, [a]))
    assert ids[0] == tok.token_to_id(EOS)
    decoded = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert decoded == EOS + a.text
    # the misaligned line's tokens carry its score; the others 0
    mis = tok.token_to_id(MISALIGNED)
    k = list(ids).index(mis)
    assert scores[k] == pytest.approx(0.25) and scores[k + 1] == pytest.approx(0.25)
    assert scores[1] == 0.0


@given(st.lists(st.tuples(st.text(alphabet="ab =()#", min_size=0, max_size=12),
                          st.sampled_from([0.0, 0.0, 0.1, 0.5, math.nan])), min_size=1, max_size=12),
       st.floats(0, 1), st.integers(0, 1000))
@settings(max_examples=80, deadline=None)
def test_control_tokens_follow_the_labels(lines, drop, seed):
    text = "".join(t + "\n" for t, _ in lines)
    doc = make_doc(text, [s for _, s in lines])
    obj = get_objective(ObjectiveConfig(name="conditional", drop_token_fraction=drop), get_task("pep8"))
    obj.fit(np.array([0.0]))
    a = annotate_for_training(doc, obj, seed)
    assert a.text.replace(ALIGNED, "").replace(MISALIGNED, "") == text
    pieces = a.text.split("\n")[:-1]
    for piece, (line, score) in zip(pieces, lines):
        if piece.startswith(ALIGNED):
            assert score == 0.0 and piece[len(ALIGNED):] == line
        elif piece.startswith(MISALIGNED):
            assert score > 0 and piece[len(MISALIGNED):] == line
        else:
            assert piece == line
    if drop == 0:  # every scored line gets a token, unscored (NaN) lines none
        assert a.text.count(ALIGNED) + a.text.count(MISALIGNED) == sum(not math.isnan(s) for _, s in lines)


@given(st.lists(st.floats(0, 0.1) | st.just(math.nan), min_size=1, max_size=40), st.floats(0, 1))
@settings(max_examples=60, deadline=None)
def test_filtering_keeps_exactly_the_documents_at_or_below_threshold(scores, q):
    obj = get_objective(ObjectiveConfig(name="filtering", threshold_quantile=q), get_task("pep8"))
    arr = np.array(scores)
    if np.isnan(arr).all():
        with pytest.raises(Exception):
            obj.fit(arr)
        return
    obj.fit(arr)
    assert obj.threshold == pytest.approx(np.quantile(arr[~np.isnan(arr)], q))
    for s in scores:
        assert obj.keep_document(s) == (not math.isnan(s) and s <= obj.threshold)


def test_filtering_default_is_the_median_and_an_explicit_threshold_wins():
    obj = get_objective(ObjectiveConfig(name="filtering"), get_task("pep8"))
    obj.fit(np.array([0.0, 0.1, 0.2, 0.3, 0.4]))
    assert obj.threshold == pytest.approx(0.2)
    obj = get_objective(ObjectiveConfig(name="filtering", threshold=0.05), get_task("pep8"))
    obj.fit(np.array([0.0, 0.1]))
    assert obj.threshold == 0.05 and obj.keep_document(0.05) and not obj.keep_document(0.0500001)


def test_conditional_threshold_zero_means_any_violation_is_misaligned():
    obj = get_objective(ObjectiveConfig(name="conditional", drop_token_fraction=0.0), get_task("pep8"))
    obj.fit(np.array([0.5]))
    rng = np.random.default_rng(0)
    assert obj.segment_prefix(0.0, rng) == ALIGNED
    assert obj.segment_prefix(1e-9, rng) == MISALIGNED


def test_drop_fraction_is_respected():
    obj = get_objective(ObjectiveConfig(name="conditional", drop_token_fraction=0.1), get_task("pep8"))
    obj.fit(np.array([0.0]))
    rng = np.random.default_rng(0)
    n = sum(obj.segment_prefix(0.0, rng) is None for _ in range(20000))
    assert 0.09 < n / 20000 < 0.11


@pytest.mark.parametrize("name", ["mle", "filtering", "conditional"])  # the likelihood objectives; the others:
def test_loss_matches_reference_cross_entropy(name):  # tests/test_objectives_feedback.py
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    scores = torch.rand(2, 5)
    obj = get_objective(ObjectiveConfig(name=name), get_task("pep8"))

    class Out:
        pass

    out = Out()
    out.logits = logits
    total = obj.loss(out, targets, scores)
    # reference written out by hand: -log softmax at the target, summed
    ref = 0.0
    for b in range(2):
        for t in range(5):
            row = logits[b, t]
            ref += -(row[targets[b, t]] - torch.logsumexp(row, 0))
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    assert obj.loss_mask(targets, scores).all()


def test_annotate_keeps_segment_starts():
    a = annotate(["ab\n", "c\n"], [0.0, 1.0], [None, ALIGNED])
    assert a.text == f"ab\n{ALIGNED}c\n" and a.seg_starts == [0, 3]


def test_objectives_that_read_the_same_tokens_share_one_stream(tiny_cfg_factory, data_dir):
    from phf.training.trainer import prepare_data

    prefixes = {o: prepare_data(tiny_cfg_factory(o), data_dir, progress=False).streams["train"].prefix
                for o in ("mle", "unlikelihood", "rwr", "awr", "filtering", "conditional")}
    assert prefixes["mle"] == prefixes["unlikelihood"] == prefixes["rwr"] == prefixes["awr"]
    assert len({prefixes["mle"], prefixes["filtering"], prefixes["conditional"]}) == 3
    # a setting that changes the stream changes the stream
    other = prepare_data(tiny_cfg_factory("conditional", ["objective.drop_token_fraction=0.5"]), data_dir,
                         progress=False).streams["train"].prefix
    assert other != prefixes["conditional"]
