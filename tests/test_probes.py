"""Probes: the mixture fit, per-segment log-likelihoods against an independent reference, attribution, mask sweep."""
import json
import math

import numpy as np
import pytest
import torch

from phf.analysis.probes import fit_mixture_weight, mixture_logprob, reweighting_figures
from phf.evaluation.loglik import segment_logprobs
from tests.helpers import tiny_untrained_model


@pytest.mark.parametrize("a_true", [0.0, 0.2, 0.5, 0.85, 1.0])
def test_mixture_fit_recovers_a_known_weight(a_true):
    # two distributions over 50 outcomes; draws from a_true * P + (1 - a_true) * Q
    rng = np.random.default_rng(7)
    p, q = rng.dirichlet(np.ones(50) * 0.3), rng.dirichlet(np.ones(50) * 0.3)
    mix = a_true * p + (1 - a_true) * q
    x = rng.choice(50, size=20_000, p=mix / mix.sum())
    a = fit_mixture_weight(np.log(p[x]), np.log(q[x]))
    assert a == pytest.approx(a_true, abs=0.02)
    # it is the maximum: no weight on a fine grid has a higher likelihood
    grid = np.linspace(0, 1, 201)
    best = grid[np.argmax([mixture_logprob(g, np.log(p[x]), np.log(q[x])).sum() for g in grid])]
    assert abs(a - best) <= 0.005 + 1e-9


def test_mixture_fit_is_invariant_to_a_common_shift_and_rejects_bad_input():
    la, lb = np.array([-1000.0, -1003.0, -999.0]), np.array([-1002.0, -1000.0, -1001.0])  # tiny probabilities
    assert fit_mixture_weight(la, lb) == pytest.approx(fit_mixture_weight(la + 990, lb + 990), abs=1e-8)
    from phf.core.errors import PhfError

    with pytest.raises(PhfError):
        fit_mixture_weight([0.0], [0.0, 1.0])
    with pytest.raises(PhfError):
        fit_mixture_weight([-np.inf], [0.0])


def test_kl_to_the_mixture_is_zero_when_the_finetune_is_the_mixture():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(30)), rng.dirichlet(np.ones(30))
    ft = 0.3 * p + 0.7 * q
    x = rng.choice(30, size=50_000, p=ft / ft.sum())
    base = (p + q) / 2
    fig = reweighting_figures(np.log(ft[x]), np.log(p[x]), np.log(q[x]), np.log(base[x]))
    assert fig["mixture_weight_aligned"] == pytest.approx(0.3, abs=0.02)
    assert abs(fig["kl_finetuned_to_mixture"]) < 5e-3 < fig["kl_finetuned_to_base"]


@pytest.fixture(scope="module")
def tiny(pycorpus):
    return tiny_untrained_model(pycorpus, block_size=32)


def reference_segment_logprobs(model, tok, text, prefix):
    """Independent reference: the annotated text encoded in one piece, each token given to the segment its first
    character is in, scored one position at a time with its whole history."""
    from phf.core.tokens import EOS, SPECIAL_TOKENS
    from phf.data.segments import line_spans

    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    spans = line_spans(text)
    annotated, starts = "", []
    for a, b in spans:
        starts.append(len(annotated))
        annotated += (prefix or "") + text[a:b]
    enc = tok.encode(annotated, add_special_tokens=False)
    ids = [tok.token_to_id(EOS)] + enc.ids
    seg = [-1] + [int(np.searchsorted(starts, o[0], side="right")) - 1 for o in enc.offsets]
    out = np.zeros(len(spans))
    with torch.no_grad():
        for t in range(1, len(ids)):
            if ids[t] not in special:
                logits = model(torch.tensor([ids[:t]])).logits[0, -1]
                out[seg[t]] += float(torch.log_softmax(logits.float(), -1)[ids[t]])
    return out


@pytest.mark.parametrize("prefix", [None, "<|aligned|>"])
def test_segment_logprobs_match_a_token_by_token_reference_within_the_context(tiny, prefix):
    from phf.data.segments import line_spans

    tok, model = tiny
    text = "def f(x):\n    return x\n\n"  # short: fits the 32-token context, so both see the whole history
    ours = segment_logprobs(model, tok, [text], prefix, line_spans)[0]
    ref = reference_segment_logprobs(model, tok, text, prefix)
    assert len(ours) == len(line_spans(text))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_long_texts_are_read_in_windows_and_every_token_is_counted(tiny):
    from phf.data.segments import line_spans

    tok, model = tiny
    text = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(40))  # far beyond 32 tokens
    per_seg = segment_logprobs(model, tok, [text], None, line_spans, batch_size=3)[0]
    assert len(per_seg) == 40 and np.all(per_seg < 0)  # every line got its tokens' log-probabilities
    # batching does not change the result
    again = segment_logprobs(model, tok, [text, "x = 1\n"], None, line_spans, batch_size=64)[0]
    np.testing.assert_allclose(per_seg, again, rtol=1e-5, atol=1e-5)


def test_attribution_is_the_difference_of_the_conditioned_log_likelihoods(tiny):
    from phf.analysis.probes import attribute
    from phf.data.segments import line_spans

    tok, model = tiny
    texts = ["import os\nx=1\n", "y = 2\n"]
    attr = attribute(model, tok, texts, line_spans)
    al = segment_logprobs(model, tok, texts, "<|aligned|>", line_spans)
    mis = segment_logprobs(model, tok, texts, "<|misaligned|>", line_spans)
    for a, x, y in zip(attr, al, mis):
        np.testing.assert_allclose(a, x - y)
    assert any(np.abs(a).sum() > 0 for a in attr)


def test_two_sample_test_orders_samples():
    from phf.analysis.probes import two_sample_test

    hi, lo = [0.5, 0.6, 0.7, 0.8] * 5, [0.0, 0.1, 0.2, 0.3] * 5
    res = two_sample_test(hi, lo)
    assert res["auc"] == 1.0 and res["p_value"] < 1e-3
    assert two_sample_test(lo, hi)["p_value"] > 0.99


@pytest.fixture(scope="module")
def tiny_conditional(tiny_cfg_factory, data_dir, tmp_path_factory):
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("conditional", ["train.max_steps=3"])
    root = tmp_path_factory.mktemp("probes")
    return run_training(cfg, root / "conditional", data_dir, progress=False).checkpoint


def test_probe_commands_write_their_figures(tiny_conditional, data_dir, tmp_path):
    from phf.cli.main import main

    run = tiny_conditional.parent
    main(["-q", "probe", "masks", "--model", str(run), "--out", str(tmp_path / "masks"), "--num-samples", "6",
          "--max-new-tokens", "24"])
    res = json.loads((tmp_path / "masks" / "results.json").read_text())
    assert set(res["conditions"]) == {"aligned", "misaligned", "none"}
    assert all(len(res["scores"][c]) == 6 for c in res["conditions"])
    assert "p_value" in res["tests"]["misaligned_vs_aligned"]
    assert (tmp_path / "masks" / "masks.png").stat().st_size > 1000

    main(["-q", "probe", "reweighting", "--base", str(run), "--finetuned", str(run), "--out", str(tmp_path / "rw"),
          "--num-samples", "6", "--num-heldout", "6", "--max-new-tokens", "24"])
    rw = json.loads((tmp_path / "rw" / "results.json").read_text())
    # a conditional model compared with itself: deployed, it reads <|aligned|> before every line, so it is its own
    # base|aligned (KL exactly 0), and the fitted mixture can only do as well or better on the same samples
    fs = rw["finetuned_samples"]
    assert fs["kl_finetuned_to_base_aligned"] == pytest.approx(0.0, abs=1e-6)
    assert fs["kl_finetuned_to_mixture"] <= 1e-6
    assert 0.0 <= rw["finetuned_samples"]["mixture_weight_aligned"] <= 1.0
    assert math.isfinite(rw["heldout"]["bits_per_char"]["mixture_fitted_on_heldout"])

    text = tmp_path / "t.py"
    text.write_text("def f(x):\n    return x\nx=1\n")
    main(["-q", "probe", "attribution", "--model", str(run), "--out", str(tmp_path / "attr"), "--text-file",
          str(text), "--heldout-chars", "3000"])
    at = json.loads((tmp_path / "attr" / "results.json").read_text())
    assert [r["segment"] for r in at["text_file"]["segments"]] == ["def f(x):\n", "    return x\n", "x=1\n"]
    assert at["text_file"]["segments"][2]["score"] > 0  # the real scorer's verdict beside the learned one
    assert at["heldout"]["segments"] > 0 and "spearman_attribution_vs_score" in at["heldout"]
