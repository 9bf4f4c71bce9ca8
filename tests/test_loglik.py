"""The log-likelihood engine: sliding windows score every target once with at least half a context of history, and
the batched, padded, windowed result equals a direct computation (one unpadded forward per window, or one forward
over the whole text when it fits the context), with and without control embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phf.core.tokens import CONTROL_TOKENS, EOS, SPECIAL_TOKENS
from phf.evaluation.loglik import (sliding_windows, sum_cross_entropy, sum_logprobs, sum_logprobs_within,
                                   token_logprobs, windows_at)
from phf.model.conditioning import control_types, set_markers, type_inputs
from tests.helpers import tiny_untrained_model

BLOCK = 32


@pytest.fixture(scope="module")
def tiny(pycorpus):
    tok, model = tiny_untrained_model(pycorpus, block_size=BLOCK)
    torch.manual_seed(1)
    with torch.no_grad():  # away from the near-uniform initialisation, so that positions differ clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return tok, model


@pytest.fixture(params=[False, True], ids=["plain", "typed"])
def model_and_ids(tiny, request):
    tok, model = tiny
    markers = [tok.token_to_id(t) for t in (EOS, *CONTROL_TOKENS)]
    set_markers(model, markers if request.param else None)
    text = "".join(f"{t}value_{i} = compute({i})\n" for i, t in zip(range(30), ["<|aligned|>", "<|misaligned|>"] * 15))
    ids = np.array([tok.token_to_id(EOS), *tok.encode(text, add_special_tokens=False).ids], dtype=np.int64)
    yield tok, model, ids, markers if request.param else None
    set_markers(model, None)


def direct(model, ids: np.ndarray, markers) -> torch.Tensor:
    """log p of each target of `ids` from one unpadded forward (no mask, no batch), float32."""
    x = torch.from_numpy(ids)[None]
    types = control_types(x, markers) if markers else None
    with torch.no_grad():
        logits = model(x[:, :-1], **type_inputs(None if types is None else types[:, :-1])).logits.float()
    return torch.log_softmax(logits, -1)[0].gather(-1, x[0, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("n", [1, 2, 33, 34, 50, 200])
@pytest.mark.parametrize("block", [4, 5, 32])
def test_sliding_windows_score_every_target_once_with_half_a_context_of_history(n, block):
    counts = np.zeros(n, int)
    for w in sliding_windows([n], block):
        end = min(w.start + block + 1, n)
        for target in range(w.start + 1 + w.first, end):
            counts[target] += 1
            assert target - w.start >= (block + 1) // 2 or w.start == 0  # tokens of history within the window
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_windows_within_the_context_equal_one_direct_forward(model_and_ids):
    _, model, ids, markers = model_and_ids
    short = ids[:BLOCK + 1]
    ((lp, scored),) = token_logprobs(model, [short], sliding_windows([len(short)], BLOCK), attention_mask=False)
    assert scored.all()
    np.testing.assert_allclose(lp, direct(model, short, markers).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_sliding_windows_equal_direct_forwards_of_each_window(model_and_ids, batch_size):
    tok, model, ids, markers = model_and_ids
    other = ids[:20]  # a shorter stream in the same batches: right padding must not change anything
    given = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    windows = sliding_windows([len(ids), len(other)], BLOCK)
    got = token_logprobs(model, [ids, other], windows, given=given, batch_size=batch_size,
                         pad_id=tok.token_to_id(EOS))
    for k, stream in enumerate([ids, other]):
        lp, scored = got[k]
        expected, covered = np.zeros(len(stream) - 1), np.zeros(len(stream) - 1, bool)
        for w in (w for w in windows if w.stream == k):
            # the window's types come from the whole stream (a segment's type reaches into the next window)
            piece = stream[w.start:w.start + BLOCK + 1]
            x = torch.from_numpy(piece)[None]
            types = control_types(torch.from_numpy(stream)[None], markers)[:, w.start:w.start + len(piece) - 1] \
                if markers else None
            with torch.no_grad():
                logits = model(x[:, :-1], **type_inputs(types)).logits.float()
            one = torch.log_softmax(logits, -1)[0].gather(-1, x[0, 1:, None]).squeeze(-1).numpy()
            expected[w.start + w.first:w.start + len(piece) - 1] = one[w.first:]
            covered[w.start + w.first:w.start + len(piece) - 1] = True
        assert covered.all()
        text = ~np.isin(stream[1:], given)
        np.testing.assert_array_equal(scored, text)  # control tokens and <|endoftext|> are given, not scored
        np.testing.assert_allclose(lp[text], expected[text], rtol=1e-5, atol=1e-5)
        assert (lp[~text] == 0).all()
    total, count = sum_logprobs(model, [ids, other], windows, given=given, batch_size=batch_size)
    assert count == sum(int(s.sum()) for _, s in got)
    assert total == pytest.approx(sum(float(lp[s].sum()) for lp, s in got), rel=1e-5)


def test_a_part_of_the_targets_is_summed_in_the_same_forwards_as_the_whole(model_and_ids):
    """sum_logprobs_within: the whole equals sum_logprobs, the part equals the per-target log-probabilities summed
    over the scored targets inside the mask, for streams longer than a context read in batches of windows."""
    tok, model, ids, _ = model_and_ids
    streams = [ids, ids[::-1].copy()]
    windows = sliding_windows([len(s) for s in streams], BLOCK)
    rng = np.random.default_rng(0)
    within = [rng.random(len(s) - 1) < 0.3 for s in streams]
    given = [tok.token_to_id(t) for t in (EOS, *CONTROL_TOKENS)]
    whole, count, part, inside = sum_logprobs_within(model, streams, windows, within, given=given, batch_size=3)
    assert (whole, count) == pytest.approx(sum_logprobs(model, streams, windows, given=given, batch_size=3))
    per_target = token_logprobs(model, streams, windows, given=given, batch_size=3)
    assert inside == sum(int((s & w).sum()) for (_, s), w in zip(per_target, within)) > 0
    assert part == pytest.approx(sum(float(lp[s & w].sum()) for (lp, s), w in zip(per_target, within)), rel=1e-5)


def test_fixed_windows_cross_entropy_counts_every_target(model_and_ids):
    _, model, ids, markers = model_and_ids
    starts = [0, 7, 40]
    total, count = sum_cross_entropy(model, [ids], windows_at(starts), block=16, batch_size=2)
    assert count == 16 * len(starts)  # control tokens and <|endoftext|> included: the training loss's tokens
    expected = 0.0
    for s in starts:
        x = torch.from_numpy(ids)[None]
        types = control_types(x, markers)[:, s:s + 16] if markers else None
        with torch.no_grad():
            logits = model(x[:, s:s + 16], **type_inputs(types)).logits.float()
        expected += float(torch.nn.functional.cross_entropy(logits[0], x[0, s + 1:s + 17], reduction="sum"))
    assert total == pytest.approx(expected, rel=1e-5)


def test_the_engine_leaves_the_model_in_its_mode(tiny):
    tok, model = tiny
    ids = np.array([tok.token_to_id(EOS), *tok.encode("x = 1\n").ids])
    model.train()
    sum_logprobs(model, [ids], sliding_windows([len(ids)], BLOCK))
    assert model.training
    model.eval()
    sum_logprobs(model, [ids], sliding_windows([len(ids)], BLOCK))
    assert not model.training


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_guided_log_likelihoods_are_the_normalised_guided_distribution(model_and_ids, guidance):
    """With guidance g each target's log-probability is log softmax((1 + g) log p(. | text) - g log p(. | text with
    every <|aligned|> read as <|misaligned|>)), the distribution phf samples from; g = 0 is the plain model."""
    tok, model, ids, markers = model_and_ids
    aligned, misaligned = (tok.token_to_id(t) for t in CONTROL_TOKENS)
    short = ids[:BLOCK + 1]
    swapped = np.where(short == aligned, misaligned, short)
    ((lp, _),) = token_logprobs(model, [ids], sliding_windows([len(ids)], BLOCK), attention_mask=False,
                                guidance=guidance, negative={aligned: misaligned})

    def full(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)[None]
        types = control_types(t, markers)[:, :-1] if markers else None
        with torch.no_grad():
            return torch.log_softmax(model(t[:, :-1], **type_inputs(types)).logits.float(), -1)[0]

    guided = torch.log_softmax((1 + guidance) * full(short) - guidance * full(swapped), -1)
    expected = guided.gather(-1, torch.from_numpy(short)[1:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(lp[:BLOCK], expected, rtol=1e-5, atol=1e-5)
    if guidance == 0:
        np.testing.assert_allclose(lp[:BLOCK], direct(model, short, markers).numpy(), rtol=1e-6, atol=1e-6)
    else:  # guidance moves probability: the test would pass vacuously if it were ignored
        assert np.abs(lp[:BLOCK] - direct(model, short, markers).numpy()).max() > 1e-2


def test_the_device_side_reductions_equal_the_host_side_ones_they_replace(model_and_ids):
    """sum_logprobs and sum_cross_entropy now add their batches on the model's device and read the total once;
    on the CPU the figures are bit for bit those of the per-batch host reductions they had before."""
    from phf.evaluation.loglik import WindowReading, window_batches

    _, model, ids, _ = model_and_ids
    windows = sliding_windows([len(ids)], 8)
    for bf16 in (False, True):
        kw = dict(block=8, batch_size=3, bf16=bf16, given=[0])
        before_lp = before_ce = 0.0
        before_n = 0
        for batch in window_batches(model, [ids], windows, WindowReading(**kw)):  # the reductions as they were
            before_lp += float(batch.token_logprobs()[batch.scored].sum())
            before_ce += batch.cross_entropy_sum().item()
            before_n += int(batch.scored.sum())
        assert sum_logprobs(model, [ids], windows, **kw) == (before_lp, before_n)
        assert sum_cross_entropy(model, [ids], windows, **kw) == (before_ce, before_n)
    assert sum_logprobs(model, [ids], [], block=8) == (0.0, 0)


def test_the_log_likelihood_batch_is_the_cpus_sixteen_and_unchanged_figures(model_and_ids):
    """Without a batch size the engine takes the device's (16 windows on the CPU, as every CPU figure was
    measured), so held-out bits/char are what they were with the explicit 16."""
    from phf.evaluation.loglik import batch_size_for

    _, model, ids, _ = model_and_ids
    assert batch_size_for(model) == 16
    windows = sliding_windows([len(ids)], 4)
    assert len(windows) > 16
    assert sum_logprobs(model, [ids], windows, block=4) == sum_logprobs(model, [ids], windows, block=4, batch_size=16)
