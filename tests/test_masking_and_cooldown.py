"""Masking and masking-hidden (token-level filtering): the loss against reference math, the streams they read, their
defaults; conditional training's cooldown: its batches read the stream without control tokens, shape unchanged."""
import math

import numpy as np
import pytest
import torch

from phf.core.config import ObjectiveConfig, TokenizerConfig, load_config
from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, EOS, HIDDEN, MISALIGNED
from phf.data.scoring import ScoredDocument
from phf.data.segments import line_spans
from phf.data.token_stream import annotate_for_training, encode_annotated, write_stream
from phf.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer, with_hidden_token
from phf.tasks import get_task
from phf.training.objectives import get_objective
from phf.training.trainer import Cooldown, WindowDraw, get_batch, host_batch

NAN = math.nan


class Out:
    def __init__(self, logits):
        self.logits = logits


def objective(name, task="pep8", **fields):
    obj = get_objective(ObjectiveConfig(name=name, **fields), get_task(task))
    obj.fit(np.array([0.1, 0.2]))
    return obj


# -- the loss --------------------------------------------------------------------------------------------------------
def reference_masking(logits, targets, scores, threshold):
    """Sum of -log p over the tokens whose segment scores at most the threshold (NaN: flagged), and their count."""
    total, kept = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            s = scores[b, t].item()
            if math.isnan(s) or s > threshold:
                continue
            row = logits[b, t].tolist()
            m = max(row)
            total += -(row[targets[b, t].item()] - m - math.log(sum(math.exp(v - m) for v in row)))
            kept += 1
    return total, kept


@pytest.mark.parametrize("name", ["masking", "masking-hidden"])
@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_masking_loss_is_the_cross_entropy_of_the_kept_tokens(name, threshold):
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 6, 7, generator=g) * 2, torch.randint(0, 7, (2, 6), generator=g)
    scores = torch.tensor([[0.0, 0.02, NAN, 0.3, 0.0, 1e-9], [0.5, 0.0, 0.2, NAN, 0.05, 0.0]])
    obj = objective(name, threshold=threshold)
    want, kept = reference_masking(logits, targets, scores, threshold)
    assert float(obj.loss(Out(logits), targets, scores)) == pytest.approx(want, rel=1e-5)
    assert int(obj.loss_mask(targets, scores).sum()) == kept  # the trainer's normaliser: the kept tokens only
    assert kept == (4 if threshold == 0.0 else 7)


def test_masking_sends_no_gradient_through_flagged_tokens():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 2, 3]])
    objective("masking").loss(Out(logits), targets, torch.tensor([[0.0, 0.4, NAN]])).backward()
    assert logits.grad[0, 0].abs().sum() > 0
    assert torch.equal(logits.grad[0, 1:], torch.zeros(2, 5))


@pytest.mark.parametrize("task", ["pep8", "pii", "toxicity"])
def test_masking_takes_conditional_trainings_threshold_per_task(task):
    want = objective("conditional", task).threshold
    assert objective("masking", task).threshold == want == objective("masking-hidden", task).threshold
    for name in ("masking", "masking-hidden"):  # the shipped config says the same
        assert get_task(task).run_config(name).objective.threshold == want


def test_masking_reads_mles_stream_and_masking_hidden_its_own():
    assert objective("masking").stream_settings() == objective("mle").stream_settings()
    hidden = objective("masking-hidden")
    assert hidden.stream_settings() != objective("mle").stream_settings()
    assert hidden.banned_tokens == [HIDDEN] and not hidden.sampling_prefix and not hidden.line_prefix


# -- the <|hidden|> stream ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(pycorpus, tmp_path_factory):
    texts = [p.read_text() for p in sorted(pycorpus.glob("*.py"))]
    path = tmp_path_factory.mktemp("tok") / "bpe" / "tokenizer.json"
    save_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=600)), path, {"vocab_size": 600})
    return load_tokenizer(path), path


def make_doc(text, scores, doc_id="d"):
    spans = line_spans(text)
    return ScoredDocument(doc_id, "train", text, [a for a, _ in spans], [b for _, b in spans], list(scores),
                          [None] * len(scores), max(scores))


def test_with_hidden_token_appends_one_special_token_and_keeps_every_id(tok):
    base, path = tok
    hidden, hidden_path = with_hidden_token(base, path)
    assert hidden_path != path and hidden_path.exists()
    assert hidden.token_to_id(HIDDEN) == base.get_vocab_size()
    assert {t: i for t, i in hidden.get_vocab().items() if t != HIDDEN} == base.get_vocab()
    assert hidden.encode(f"x{HIDDEN}y", add_special_tokens=False).ids.count(hidden.token_to_id(HIDDEN)) == 1
    assert with_hidden_token(hidden, hidden_path) == (hidden, hidden_path)  # a resumed run's: unchanged
    assert load_tokenizer(hidden_path).eos == EOS


def test_masking_hidden_writes_one_hidden_token_per_flagged_token(tok):
    base, path = tok
    hidden_tok, _ = with_hidden_token(base, path)
    doc = make_doc("import os\nx=1\nwhile True :  pass\ny = 2\n", [0.0, 0.25, NAN, 0.0])
    plain_ids, plain_scores = next(encode_annotated(hidden_tok, [annotate_for_training(doc, objective("masking"), 0)]))
    ids, scores = next(encode_annotated(hidden_tok, [annotate_for_training(doc, objective("masking-hidden"), 0)]))
    assert len(ids) == len(plain_ids)  # one <|hidden|> per token: the windows are masking's
    np.testing.assert_array_equal(scores, plain_scores)
    flagged = ~(plain_scores <= 0.0)
    hid = hidden_tok.token_to_id(HIDDEN)
    assert flagged.sum() > 2 and (ids[flagged] == hid).all()
    np.testing.assert_array_equal(ids[~flagged], plain_ids[~flagged])
    assert hidden_tok.decode(ids[~flagged].tolist(), skip_special_tokens=False) == EOS + "import os\ny = 2\n"
    # the hidden tokens bear no loss: their segment scores are the flagged ones
    obj = objective("masking-hidden")
    assert not obj.loss_mask(torch.tensor(ids[1:]), torch.tensor(scores[1:]))[torch.tensor(ids[1:]) == hid].any()


def test_a_tokenizer_without_hidden_is_a_one_line_error(tok):
    base, _ = tok
    doc = make_doc("x=1\n", [0.5])
    with pytest.raises(PhfError, match="no <\\|hidden\\|> token"):
        next(encode_annotated(base, [annotate_for_training(doc, objective("masking-hidden"), 0)]))


# -- conditional training's cooldown ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conditional_stream(tok, tmp_path_factory, pycorpus):
    base, _ = tok
    obj = objective("conditional", drop_token_fraction=0.0)
    docs = []
    for i, p in enumerate(sorted(pycorpus.glob("*.py"))):
        text = p.read_text()
        n = len(line_spans(text))
        docs.append(annotate_for_training(make_doc(text, [float(k % 3 == 0) * 0.2 for k in range(n)], str(i)),
                                          obj, 0))
    return write_stream(tmp_path_factory.mktemp("stream") / "train", docs, base, {}, progress=False)


def test_cooldown_batches_read_the_stream_without_control_tokens(conditional_stream, tok):
    stream, base = conditional_stream, tok[0]
    control = [base.token_to_id(ALIGNED), base.token_to_id(MISALIGNED)]
    tokens, scores = np.asarray(stream.tokens), np.asarray(stream.scores)
    assert np.isin(tokens, control).mean() > 0.05
    kept = ~np.isin(tokens, control)
    plain, plain_scores = tokens[kept], scores[kept]
    before = np.concatenate([[0], np.cumsum(kept)])  # kept tokens before each position
    block, batch = 32, 6
    for step in (0, 7):
        x, y, s, _ = get_batch(stream, WindowDraw(block, batch, seed=3), step=step, micro=0,
                               device=torch.device("cpu"), cooldown=Cooldown(0, tuple(control)))
        x0, _, _, _ = get_batch(stream, WindowDraw(block, batch, seed=3), step=step, micro=0, device=torch.device("cpu"))
        assert x.shape == y.shape == s.shape == x0.shape == (batch, block)  # the batch keeps its shape
        assert not torch.isin(x, torch.tensor(control)).any() and not torch.isin(y, torch.tensor(control)).any()
        rng = np.random.default_rng([3, step, 0])  # the same window starts as without the cooldown
        for row, start in enumerate(rng.integers(0, len(stream) - block - 1, size=batch)):
            k = before[start]
            if k + block + 1 <= len(plain):
                np.testing.assert_array_equal(x[row].numpy(), plain[k:k + block])
                np.testing.assert_array_equal(y[row].numpy(), plain[k + 1:k + block + 1])
                np.testing.assert_array_equal(s[row].numpy(), plain_scores[k + 1:k + block + 1])


def test_cooldown_batches_give_control_embeddings_the_unconditioned_type(conditional_stream, tok):
    """With control embeddings, a cooldown window reads every token as unconditioned (the `<|endoftext|>` marker),
    as text deployed without control tokens is read; outside the cooldown each token keeps its segment's type."""
    stream, base = conditional_stream, tok[0]
    markers = [base.token_to_id(EOS), base.token_to_id(ALIGNED), base.token_to_id(MISALIGNED)]
    types = stream.control_types(markers)
    assert np.isin(types, markers[1:]).mean() > 0.5  # most tokens are typed by a control token
    draw = WindowDraw(32, 6, seed=3)
    *_, plain = host_batch(stream, draw, 0, 0, types, cooldown=Cooldown(0, tuple(markers[1:]), markers[0]))
    *_, typed = host_batch(stream, draw, 0, 0, types)
    assert (plain == markers[0]).all() and plain.shape == typed.shape == (6, 32)
    assert torch.isin(typed, torch.tensor(markers[1:])).any()
    with pytest.raises(PhfError, match="plain_type"):
        host_batch(stream, draw, 0, 0, types, cooldown=Cooldown(0, tuple(markers[1:])))


def test_a_cooldown_window_at_the_end_of_the_stream_reads_backward(conditional_stream, tok):
    from phf.data.token_stream import plain_window

    stream, base = conditional_stream, tok[0]
    control = np.array([base.token_to_id(ALIGNED), base.token_to_id(MISALIGNED)])
    tokens = np.asarray(stream.tokens)
    assert np.isin(tokens[-33:], control).any()  # the last 33 tokens hold fewer than 33 plain ones
    ids, sc = plain_window(stream, len(stream) - 33, 33, control)
    plain = tokens[~np.isin(tokens, control)]
    np.testing.assert_array_equal(ids, plain[-33:])
    assert len(sc) == 33


def test_cooldown_fraction_sets_the_last_steps_and_applies_to_conditional_only():
    assert objective("conditional", cooldown_fraction=0.1).cooldown_starts(100) == 90
    assert objective("conditional", cooldown_fraction=0.1).cooldown_starts(15) == 14
    assert objective("conditional").cooldown_starts(100) == 100
    assert objective("conditional", cooldown_fraction=0.1).describe()["cooldown_fraction"] == 0.1
    for bad, match in ((["objective.name=mle", "objective.cooldown_fraction=0.1"], "conditional training only"),
                       (["objective.name=conditional", "objective.cooldown_fraction=1"], r"in \[0, 1\)")):
        with pytest.raises(PhfError, match=match):
            load_config(None, bad)


def test_the_cooldown_variant_is_an_arm_beside_plain_conditional(tmp_path):
    """`conditional-cooldown` is conditional training with the variant's cooldown over the task's defaults, so that a
    demo compares the two; a user's config gets the same settings, and an unknown arm is one line."""
    from phf.recipes.demo import arm_configs
    _, configs = arm_configs("pep8", objectives=["conditional", "conditional-cooldown"])
    plain, cooled = configs["conditional"].objective, configs["conditional-cooldown"].objective
    assert (plain.name, plain.cooldown_fraction) == ("conditional", 0.0)
    assert (cooled.name, cooled.cooldown_fraction) == ("conditional", 0.1)
    assert cooled.threshold == plain.threshold and cooled.drop_token_fraction == plain.drop_token_fraction
    own = tmp_path / "task.yaml"
    own.write_text("task: mine\nobjective: {name: conditional, threshold: 0.3}\nscoring: {scorer: pep8}\n")
    _, configs = arm_configs(config=own, objectives=["mle", "conditional-cooldown"])
    assert configs["conditional-cooldown"].objective.cooldown_fraction == 0.1
    assert configs["conditional-cooldown"].objective.threshold == 0.3
    # toxicity ships its own conditional config (control embeddings and guidance): the variant keeps both
    _, configs = arm_configs("toxicity", objectives=["conditional", "conditional-cooldown"], overrides=["train.seed=7"])
    plain, cooled = configs["conditional"], configs["conditional-cooldown"]
    assert (cooled.objective.control_embedding, cooled.objective.cooldown_fraction) == (True, 0.1)
    assert cooled.sample.guidance == plain.sample.guidance == 1.0 and cooled.train.seed == 7
    with pytest.raises(PhfError, match="unknown arm 'conditional-cool'"):
        arm_configs(config=own, objectives=["conditional-cool"])
    with pytest.raises(PhfError, match="no config 'conditional-cool'"):
        arm_configs("pep8", objectives=["conditional-cool"])
