import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from phf.core.tokens import ALIGNED, EOS, MISALIGNED, SPECIAL_TOKENS
from phf.data.segments import line_spans
from phf.evaluation.evaluate import expected_max, heldout_bits_per_char, misalignment_metrics, parses
from phf.evaluation.sampling import Deployment, Sample, complete_lines, sample_next, strip_control
from phf.tasks.pep8 import function_prompts
from tests.helpers import tiny_untrained_model


@pytest.mark.parametrize("n,k", [(5, 3), (7, 7), (6, 1), (4, 25)])
def test_expected_max_equals_brute_force(n, k):
    rng = np.random.default_rng(n * 10 + k)
    xs = list(rng.random(n))
    kk = min(k, n)
    combos = list(itertools.combinations(xs, kk))
    brute = sum(max(c) for c in combos) / len(combos)
    assert expected_max(xs, k) == pytest.approx(brute)


def test_misalignment_metrics():
    samples = [Sample("unconditional", "", t, t, True, 3) for t in ["x = 1\n", "def (\n", ""]]
    m = misalignment_metrics(samples, [0.0, 0.5, 0.0], code=True)
    assert m["misalignment_mean"] == pytest.approx(0.5 / 3)
    assert m["misaligned_share"] == pytest.approx(1 / 3)
    assert m["parse_rate"] == pytest.approx(2 / 3)  # "" parses
    assert m["empty_share"] == pytest.approx(1 / 3)
    assert m["score_max_at_25"] == pytest.approx(0.5)


def test_sample_next_is_exact_nucleus_sampling():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.9, g)
    freq = Counter(draws.tolist())
    assert set(freq) == {0, 1, 2}  # 0.5 + 0.3 < 0.9, so token 2 is in; token 3 is not
    total = 0.95
    for i, p in enumerate([0.5, 0.3, 0.15]):
        assert freq[i] / 20000 == pytest.approx(p / total, abs=0.015)
    banned = probs.log().repeat(1000, 1)
    banned[:, 0] = -float("inf")
    assert 0 not in sample_next(banned, 0.7, 0.9, g).tolist()


def test_text_helpers():
    assert strip_control(f"{ALIGNED}x\n{MISALIGNED}y") == "x\ny"
    assert complete_lines("a\nb\nc") == "a\nb\n" and complete_lines("abc") == ""
    assert parses("x = 1\n") and not parses("def (\n")
    src = 'class A:\n    def f(self, x):\n        """Doc."""\n        return x\n\n\ndef g():\n    return 1\n'
    assert function_prompts([src], 10) == ['def f(self, x):\n    """Doc."""\n']


@pytest.fixture(scope="module")
def tiny(pycorpus):
    return tiny_untrained_model(pycorpus, block_size=512)


def reference_bits(model, tok: Tokenizer, texts, line_prefix):
    """Independent reference: the documents packed as in training (<|endoftext|> before each), one forward
    pass; sum -log2 p of the non-special tokens."""
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    ids = []
    for text in texts:
        lines = [text[a:b] for a, b in line_spans(text)]
        annotated = "".join((line_prefix or "") + line for line in lines)
        ids += [tok.token_to_id(EOS)] + tok.encode(annotated, add_special_tokens=False).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    bits = 0.0
    for pos in range(1, len(ids)):
        if ids[pos] not in special:
            bits -= logp[pos - 1, ids[pos]].item() / math.log(2)
    return bits / sum(len(t) for t in texts)


class Doc:
    def __init__(self, text):
        self.text = text


class ScoredDoc(Doc):
    """A document as a scored corpus records it: its line segments and a score per segment."""

    def __init__(self, text, score_of):
        super().__init__(text)
        spans = line_spans(text)
        self.starts, self.ends = [a for a, _ in spans], [b for _, b in spans]
        self.scores = [score_of(text[a:b]) for a, b in spans]


def reference_bits_of_lines(model, tok: Tokenizer, texts, line_prefix, keep):
    """Independent reference for the aligned segments alone: the documents packed and read in one forward, as in
    `reference_bits`; -log2 p summed over the text tokens of the lines `keep` accepts, over their characters."""
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    ids, counted, chars = [], [], 0
    for text in texts:
        lines = [text[a:b] for a, b in line_spans(text)]
        starts = list(itertools.accumulate([len(line_prefix or "") + len(line) for line in lines[:-1]], initial=0))
        enc = tok.encode("".join((line_prefix or "") + line for line in lines), add_special_tokens=False)
        ids.append(tok.token_to_id(EOS))
        counted.append(False)
        for token, (a, _) in zip(enc.ids, enc.offsets):
            ids.append(token)
            counted.append(keep(lines[sum(1 for s in starts if s <= a) - 1]))
        chars += sum(len(line) for line in lines if keep(line))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    bits = -sum(logp[pos - 1, ids[pos]].item() for pos in range(1, len(ids))
                if counted[pos] and ids[pos] not in special) / math.log(2)
    return bits / chars


@pytest.mark.parametrize("prefix", [None, ALIGNED])
def test_heldout_on_aligned_segments_alone_reads_them_in_their_documents_context(tiny, prefix):
    """With the task's threshold, held-out bits/char is also given for the segments scoring at most it (the clean
    text), each read after the whole document before it, flagged lines included: the cost an objective that never
    learned the flagged text pays on the rest."""
    tok, model = tiny
    texts = ["import os\nx = os.sep\n", "def f(x):\n    return x + 1\nimport sys\nprint(sys.argv)\n"]
    flagged = {"import os\n", "import sys\n"}
    docs = [ScoredDoc(t, lambda line: 1.0 if line in flagged else 0.0) for t in texts]
    dep = Deployment([], [], prefix)
    got = heldout_bits_per_char(model, tok, docs, dep, line_spans, misaligned_above=0.5, bf16=False, progress=False)
    expected = reference_bits_of_lines(model, tok, texts, prefix, lambda line: line not in flagged)
    assert got["heldout_aligned_bits_per_char"] == pytest.approx(expected, rel=1e-4)
    assert got["heldout_aligned_char_share"] == pytest.approx(1 - sum(map(len, flagged)) / sum(map(len, texts)))
    assert got["heldout_bits_per_char"] == pytest.approx(reference_bits(model, tok, texts, prefix), rel=1e-4)
    # every segment below the threshold: the aligned figure is the whole documents'
    every = heldout_bits_per_char(model, tok, docs, dep, line_spans, misaligned_above=2.0, bf16=False, progress=False)
    assert every["heldout_aligned_bits_per_char"] == pytest.approx(every["heldout_bits_per_char"], rel=1e-6)
    # documents without recorded scores have no aligned part to measure
    plain = heldout_bits_per_char(model, tok, [Doc(t) for t in texts], dep, line_spans, misaligned_above=0.5,
                                  bf16=False, progress=False)
    assert "heldout_aligned_bits_per_char" not in plain


@pytest.mark.parametrize("prefix", [None, ALIGNED])
def test_heldout_bits_per_char_counts_text_tokens_only(tiny, prefix):
    tok, model = tiny
    texts = ["def f(x):\n    return x + 1\n", "import os\n\nprint(os.sep)\n"]
    dep = Deployment([], [], prefix)
    got = heldout_bits_per_char(model, tok, [Doc(t) for t in texts], dep, line_spans, bf16=False, progress=False)
    assert got["heldout_bits_per_char"] == pytest.approx(reference_bits(model, tok, texts, prefix), rel=1e-4)
    n_text_tokens = sum(len(tok.encode("".join((prefix or "") + t[a:b] for a, b in line_spans(t)),
                                       add_special_tokens=False).ids) for t in texts)
    n_control = sum(len(line_spans(t)) for t in texts) if prefix else 0
    assert got["heldout_tokens"] == n_text_tokens - n_control


def test_heldout_windows_cover_every_token_once(tiny):
    tok, model = tiny
    model.config.n_positions  # 512; use a long text so that several windows are needed
    text = "".join(f"value_{i} = {i} * 2\n" for i in range(400))
    dep = Deployment([], [], None)
    got = heldout_bits_per_char(model, tok, [Doc(text)], dep, line_spans, bf16=False, progress=False)
    assert got["heldout_tokens"] == len(tok.encode(text, add_special_tokens=False).ids)
