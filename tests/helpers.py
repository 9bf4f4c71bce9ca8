"""Helpers importable by tests as `tests.helpers` (a user-style custom scorer)."""


def count_x(texts):
    return [float(t.count("x")) for t in texts]


def slow_length(texts):
    """A deliberately slow scorer (for tests that interrupt scoring): characters / 1000, 20 ms per call."""
    import time

    time.sleep(0.02)
    return [len(t) / 1000 for t in texts]


def always_misaligned(texts):
    return [1.0 for _ in texts]


def flaky(texts):
    """Fails on some inputs the way real scorers do: raises on one kind of line, NaN on another."""
    if any("import" in t for t in texts):
        raise RuntimeError("model crashed on this batch")
    return [float("nan") if "return" in t else 0.0 for t in texts]


def assert_spans_tile(text, spans):
    """Segment spans cover the text exactly: contiguous, non-empty, from 0 to len(text)."""
    assert "".join(text[a:b] for a, b in spans) == text
    pos = 0
    for a, b in spans:
        assert a == pos and b > a
        pos = b
    assert pos == len(text)


def tiny_untrained_model(corpus_dir, block_size: int):
    """A 400-token tokenizer trained on the test corpus' Python files and an untrained 1-layer GPT-2 (seed 0)."""
    import torch

    from phf.core.config import ModelConfig, TokenizerConfig
    from phf.core.tokens import EOS
    from phf.data.tokenizer import train_tokenizer
    from phf.model.lm import build_model

    tok = train_tokenizer([p.read_text() for p in sorted(corpus_dir.glob("*.py"))], TokenizerConfig(vocab_size=400))
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size), tok.get_vocab_size(),
                        tok.token_to_id(EOS)).eval()
    return tok, model


def x_per_char(texts):
    """A rate: the share of a segment's characters that are "x" (0 for an empty segment)."""
    return [t.count("x") / len(t) if t else 0.0 for t in texts]


def never_called(texts):
    """A scorer for runs that must not score (a pre-scored corpus): it fails loudly if called."""
    raise AssertionError("the scorer ran on a pre-scored corpus")
