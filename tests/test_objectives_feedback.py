"""Unlikelihood, RWR and AWR: each loss against reference math written out here (loops over tokens, plain `math`),
their per-task defaults, the value head's gradients and its round trip through a checkpoint, and a few training
steps that move every parameter."""
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from phf.core.config import ObjectiveConfig, load_config
from phf.core.errors import PhfError
from phf.model.lm import VALUE_HEAD, ValueHead, load_value_head
from phf.tasks import get_task
from phf.training.objectives import get_objective

NAN = math.nan


class Out:
    """Stands in for a model output: `.logits` (B, T, V) and optionally `.hidden_states`."""

    def __init__(self, logits, hidden=None):
        self.logits = logits
        self.hidden_states = (hidden,) if hidden is not None else None


def softmax_prob(row: list[float], k: int) -> float:
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    return exps[k] / sum(exps)


def case(seed=0, B=2, T=6, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    scores = torch.tensor([[0.0, 0.02, NAN, 0.3, 0.0, 1e-9],
                           [0.5, 0.0, 0.2, NAN, 0.05, 0.0]])[:B, :T]
    return logits, targets, scores


# -- unlikelihood ---------------------------------------------------------------------------------------------------
def reference_unlikelihood(logits, targets, scores, threshold, alpha):
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            s = scores[b, t].item()
            if math.isnan(s):
                continue
            p = softmax_prob(logits[b, t].tolist(), targets[b, t].item())
            if s > threshold:
                total += -alpha * math.log(max(1.0 - p, 1e-5))
            else:
                total += -math.log(p)
    return total


@pytest.mark.parametrize("threshold, alpha", [(0.0, 0.01), (0.0, 1.0), (0.1, 0.5), (0.25, 2.0)])
def test_unlikelihood_matches_reference(threshold, alpha):
    logits, targets, scores = case()
    obj = get_objective(ObjectiveConfig(name="unlikelihood", threshold=threshold, alpha=alpha), get_task("pep8"))
    got = obj.loss(Out(logits), targets, scores)
    assert got.item() == pytest.approx(reference_unlikelihood(logits, targets, scores, threshold, alpha), rel=1e-5)
    assert torch.equal(obj.loss_mask(targets, scores), ~torch.isnan(scores))


def test_unlikelihood_threshold_zero_means_any_positive_score_is_misaligned():
    logits, targets, _ = case()
    obj = get_objective(ObjectiveConfig(name="unlikelihood"), get_task("pep8"))  # the PEP8 default: threshold 0, alpha 0.01
    assert obj.threshold == 0.0 and obj.alpha == 0.01
    tiny = torch.full(targets.shape, 1e-9)
    got = obj.loss(Out(logits), targets, tiny).item()
    # every token is misaligned: the whole loss is 0.01 * -log(1 - p) ...
    assert got == pytest.approx(reference_unlikelihood(logits, targets, tiny, 0.0, 0.01), rel=1e-5)
    # ... not the soft mix (1 - s) * -log p + s * alpha * -log(1 - p) that "threshold 0 = no threshold" gives,
    # which at s = 1e-9 is plain likelihood
    soft_mix = sum(-math.log(softmax_prob(logits[b, t].tolist(), targets[b, t].item()))
                   for b in range(2) for t in range(6))
    assert abs(got - soft_mix) > 1.0
    # and a score of exactly 0 is aligned: plain likelihood
    zero = torch.zeros(targets.shape)
    assert obj.loss(Out(logits), targets, zero).item() == pytest.approx(soft_mix, rel=1e-5)


def test_unlikelihood_threshold_is_hard_where_the_soft_mix_is_not():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 5)
    targets = torch.tensor([[1, 3]])
    scores = torch.tensor([[0.2, 0.5]])  # threshold 0.3: first aligned, second misaligned
    obj = get_objective(ObjectiveConfig(name="unlikelihood", threshold=0.3, alpha=1.0), get_task("pep8"))
    p0 = softmax_prob(logits[0, 0].tolist(), 1)
    p1 = softmax_prob(logits[0, 1].tolist(), 3)
    hard = -math.log(p0) - math.log(1 - p1)
    soft = (0.8 * -math.log(p0) + 0.2 * -math.log(1 - p0)) + (0.5 * -math.log(p1) + 0.5 * -math.log(1 - p1))
    got = obj.loss(Out(logits), targets, scores).item()
    assert got == pytest.approx(hard, rel=1e-6) and abs(got - soft) > 1e-3


def test_unlikelihood_is_finite_when_the_misaligned_token_is_certain():
    logits = torch.zeros(1, 2, 4)
    logits[0, :, 2] = 60.0  # p(token 2) == 1 in float32
    logits.requires_grad_(True)
    obj = get_objective(ObjectiveConfig(name="unlikelihood", threshold=0.0, alpha=1.0), get_task("pep8"))
    loss = obj.loss(Out(logits), torch.tensor([[2, 2]]), torch.tensor([[0.1, NAN]]))
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1e-5), rel=1e-4)  # the clamp bounds it; NaN token bears nothing
    assert torch.isfinite(logits.grad).all()


# -- RWR ------------------------------------------------------------------------------------------------------------
def reference_rwr(logits, targets, scores, beta, max_weight):
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            s = scores[b, t].item()
            if math.isnan(s):
                continue
            w = min(math.exp(-s / beta), max_weight)
            total += w * -math.log(softmax_prob(logits[b, t].tolist(), targets[b, t].item()))
    return total


@pytest.mark.parametrize("beta, max_weight", [(10.0, 1000.0), (0.1, 1000.0), (0.05, 0.5)])
def test_rwr_matches_reference(beta, max_weight):
    logits, targets, scores = case(seed=2)
    logits.requires_grad_(True)
    obj = get_objective(ObjectiveConfig(name="rwr", beta=beta, max_weight=max_weight), get_task("pep8"))
    got = obj.loss(Out(logits), targets, scores)
    assert got.item() == pytest.approx(reference_rwr(logits, targets, scores.clone(), beta, max_weight), rel=1e-5)
    got.backward()
    assert torch.isfinite(logits.grad).all()  # NaN scores send no NaN gradient back
    assert torch.equal(obj.loss_mask(targets, scores), ~torch.isnan(scores))


def test_rwr_weights_and_clip():
    obj = get_objective(ObjectiveConfig(name="rwr"), get_task("pep8"))  # the paper's beta: 10
    assert obj.beta == 10.0 and obj.max_weight == 1000.0
    scores = torch.tensor([[0.0, 0.5, 2.0]])
    w = obj.weights(scores, torch.ones_like(scores, dtype=torch.bool))
    assert w.tolist()[0] == pytest.approx([1.0, math.exp(-0.05), math.exp(-0.2)])
    clipped = get_objective(ObjectiveConfig(name="rwr", beta=1.0, max_weight=0.5), get_task("pep8"))
    w = clipped.weights(scores, torch.ones_like(scores, dtype=torch.bool))
    assert w.tolist()[0] == pytest.approx([0.5, 0.5, math.exp(-2.0)])


# -- AWR ------------------------------------------------------------------------------------------------------------
def awr_case(alpha=0.3, beta=0.5, max_weight=50.0, seed=3):
    logits, targets, scores = case(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(2, 6, 8, generator=g)
    obj = get_objective(ObjectiveConfig(name="awr", alpha=alpha, beta=beta, max_weight=max_weight), get_task("pep8"))
    obj.value_head = ValueHead(8)
    with torch.no_grad():
        obj.value_head.weight.copy_(torch.randn(1, 8, generator=g))
        obj.value_head.bias.fill_(-0.5)
    return obj, logits, hidden, targets, scores


def reference_awr(obj, logits, hidden, targets, scores):
    w_head = obj.value_head.weight[0].tolist()
    b_head = obj.value_head.bias.item()
    total, clipped, unclipped, dvalue = 0.0, 0, 0, 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            s = scores[b, t].item()
            if math.isnan(s):
                continue
            v = sum(h * w for h, w in zip(hidden[b, t].tolist(), w_head)) + b_head
            r = -s
            raw = math.exp((r - v) / obj.beta)
            weight = min(raw, obj.max_weight)
            clipped += raw > obj.max_weight
            unclipped += raw < obj.max_weight
            ce = -math.log(softmax_prob(logits[b, t].tolist(), targets[b, t].item()))
            total += obj.alpha * weight * ce + (1 - obj.alpha) * (v - r) ** 2
            dvalue += (1 - obj.alpha) * 2 * (v - r)  # d loss / d bias: the weight is a constant
    return total, clipped, unclipped, dvalue


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3, 1.0])
def test_awr_matches_reference_and_trains_the_head(alpha):
    obj, logits, hidden, targets, scores = awr_case(alpha=alpha)
    hidden.requires_grad_(True)
    got = obj.loss(Out(logits, hidden), targets, scores)
    ref, clipped, unclipped, dbias = reference_awr(obj, logits, hidden, targets, scores)
    assert clipped and unclipped  # the case exercises the clip on some tokens and not on others
    assert got.item() == pytest.approx(ref, rel=1e-5)
    got.backward()
    # gradients reach the value head (through the squared error only: the weights use a detached value)
    assert obj.value_head.bias.grad.item() == pytest.approx(dbias, rel=1e-5, abs=1e-6)
    if alpha < 1:
        assert obj.value_head.weight.grad.abs().sum() > 0
        assert hidden.grad.abs().sum() > 0  # ... and through the head into the transformer (not detached)
    assert torch.isfinite(hidden.grad).all()


def test_awr_defaults_and_loss_mask():
    obj = get_objective(ObjectiveConfig(name="awr"), get_task("pep8"))
    assert (obj.alpha, obj.beta, obj.max_weight) == (0.05, 1.0, 1000.0)  # the paper's PEP8 setting
    _, targets, scores = case()
    assert torch.equal(obj.loss_mask(targets, scores), ~torch.isnan(scores))


@pytest.mark.parametrize("task, name, expected", [
    ("pep8", "unlikelihood", {"threshold": 0.0, "alpha": 0.01}),
    ("pii", "unlikelihood", {"threshold": 0.0, "alpha": 1.0}),
    ("toxicity", "unlikelihood", {"threshold": 0.25, "alpha": 1.0}),  # median of the document scores below
    ("pep8", "awr", {"alpha": 0.05, "beta": 1.0}),
    ("pii", "awr", {"alpha": 0.5, "beta": 0.1}),
    ("toxicity", "awr", {"alpha": 0.5, "beta": 10.0}),
    ("pep8", "rwr", {"beta": 10.0}),
    ("pep8", "conditional", {"threshold": 0.0, "drop_token_fraction": 0.1}),
    ("pii", "conditional", {"threshold": 0.0, "drop_token_fraction": 0.01}),
    ("toxicity", "conditional", {"threshold": 0.5, "drop_token_fraction": 0.01}),  # the classifier's own 0.5
    # a task of your own: each objective record's defaults (phf.core.objective_specs), not another task's row
    ("my-own-task", "unlikelihood", {"threshold": 0.0, "alpha": 1.0}),
    ("my-own-task", "conditional", {"threshold": 0.0, "drop_token_fraction": 0.01}),
    ("my-own-task", "filtering", {"threshold": 0.25}),
])
def test_task_defaults(task, name, expected):
    obj = get_objective(ObjectiveConfig(name=name), get_task(task))
    obj.fit(np.array([0.0, 0.1, 0.25, 0.3, NAN, 0.9]))
    assert {k: getattr(obj, k) for k in expected} == pytest.approx(expected)


def test_a_task_of_your_own_labels_segments_by_its_misalignment_threshold():
    from phf.core.config import load_config
    from phf.tasks import task_for

    cfg = load_config(None, ["task=mine", "scoring.scorer=tests.helpers:flaky", "scoring.misaligned_above=0.4",
                             "objective.name=conditional"])
    obj = get_objective(cfg.objective, task_for(cfg))
    assert obj.threshold == 0.4 and obj.drop_token_fraction == 0.01


def test_explicit_values_and_quantiles_win_over_task_defaults():
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    obj = get_objective(ObjectiveConfig(name="unlikelihood", threshold_quantile=0.75, alpha=0.5), get_task("pep8"))
    obj.fit(scores)
    assert obj.threshold == pytest.approx(0.3) and obj.alpha == 0.5
    obj = get_objective(ObjectiveConfig(name="unlikelihood", threshold=0.0, threshold_quantile=0.75), get_task("toxicity"))
    obj.fit(scores)
    assert obj.threshold == 0.0  # an absolute threshold wins over a quantile
    assert get_objective(ObjectiveConfig(name="awr", beta=3.0), get_task("pii")).beta == 3.0


@pytest.mark.parametrize("override, message", [
    ("objective.alpha=-1", "objective.alpha must be a finite number >= 0"),
    ("objective.beta=0", "objective.beta must be a finite number > 0"),
    ("objective.max_weight=0", "objective.max_weight must be > 0"),
    ("objective.threshold_quantile=1.5", "objective.threshold_quantile must be in [0, 1]"),
])
def test_config_errors(override, message):
    with pytest.raises(PhfError) as exc:
        load_config(None, [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(PhfError, match=r"objective.alpha must be in \[0, 1\]"):
        load_config(None, ["objective.name=awr", "objective.alpha=1.5"])


# -- training and the value head's round trip -----------------------------------------------------------------------
# every step of these settings draws windows with misaligned lines (with batch 4 and seed 42 none of the first three
# does, and the value head, which starts at the aligned reward 0, would have nothing to learn from)
FEEDBACK_RUN = ["train.max_steps=3", "train.batch_size=8", "train.seed=0"]

@pytest.fixture(scope="module")
def awr_run(tiny_cfg_factory, data_dir, tmp_path_factory):
    from phf.training.trainer import run_training

    cfg = tiny_cfg_factory("awr", FEEDBACK_RUN)
    out = tmp_path_factory.mktemp("awr")
    return cfg, run_training(cfg, out / "run", data_dir, progress=False)


@pytest.mark.parametrize("objective", ["unlikelihood", "rwr", "awr"])
def test_a_few_steps_change_every_parameter(objective, tiny_cfg_factory, data_dir, tmp_path, awr_run):
    from phf.core.io import read_jsonl
    from phf.core.tokens import EOS
    from phf.data.tokenizer import load_tokenizer
    from phf.model.lm import build_model
    from phf.training.trainer import prepare_data, run_training

    if objective == "awr":
        cfg, result = awr_run
    else:
        cfg = tiny_cfg_factory(objective, FEEDBACK_RUN)
        result = run_training(cfg, tmp_path / objective, data_dir, progress=False)
    data = prepare_data(cfg, data_dir, progress=False)
    tok = load_tokenizer(data.tokenizer_file)
    torch.manual_seed(cfg.train.seed)  # the initial weights, built the way the trainer builds them
    init = build_model(cfg.model, tok.get_vocab_size(), tok.token_to_id(EOS)).state_dict()
    trained = load_file(str(result.checkpoint / "model.safetensors"))
    for name, before in init.items():
        if name.endswith("attn.bias") or name.endswith("masked_bias"):
            continue  # causal-mask buffers, not parameters
        key = name if name in trained else name.replace("lm_head.weight", "transformer.wte.weight")
        assert not torch.equal(trained[key], before), f"{name} did not change"
    if objective == "awr":
        head = load_file(str(result.checkpoint / VALUE_HEAD))
        assert head["weight"].abs().sum() > 0 and head["bias"].abs().sum() > 0  # moved from its zero start
    losses = [m["loss"] for m in read_jsonl(result.out_dir / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_value_head_round_trip(awr_run, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from phf.model.lm import load_model

    _, result = awr_run
    folder = result.checkpoint
    trained = result.objective.value_head
    # saved next to the weights, not inside them
    assert (folder / VALUE_HEAD).exists()
    assert not any("value_head" in k for k in load_file(str(folder / "model.safetensors")))
    # phf loads it back: for a resumed run (required) and for a run starting from the checkpoint
    model = load_model(folder)
    obj = get_objective(ObjectiveConfig(name="awr"), get_task("pep8"))
    (head,) = obj.attach(model, folder, required=True)
    assert torch.equal(head.weight, trained.weight.detach().cpu()) and torch.equal(head.bias, trained.bias.detach().cpu())
    assert torch.equal(load_value_head(folder, model.config.hidden_size).weight, head.weight)
    # plain transformers loads the folder untouched, without a word about the head, and generates
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            plain = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        hf_logging.disable_propagation()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "value_head" in m or "unexpected" in m.lower() or "not used" in m.lower() or "load report" in m.lower()], said
    ours = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(ours[k], plain.state_dict()[k]) for k in ours)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("<|endoftext|>def f", return_tensors="pt", add_special_tokens=False)
    out = plain.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_resuming_awr_needs_its_value_head(awr_run, tmp_path):
    from phf.model.lm import load_model

    _, result = awr_run
    model = load_model(result.checkpoint)
    obj = get_objective(ObjectiveConfig(name="awr"), get_task("pep8"))
    with pytest.raises(PhfError, match="has no value_head.safetensors"):
        obj.attach(model, tmp_path, required=True)
    (head,) = obj.attach(model, tmp_path)  # starting from a checkpoint without one: a new head at zero
    assert head.weight.abs().sum() == 0 and head.bias.item() == 0
    assert obj.extra_modules() == [head]


def test_a_resumed_awr_run_matches_an_uninterrupted_one(tiny_cfg_factory, data_dir, tmp_path):
    from phf.core.io import read_jsonl
    from phf.training.trainer import run_training

    settings = FEEDBACK_RUN + ["train.dtype=fp32"]
    whole = run_training(tiny_cfg_factory("awr", settings), tmp_path / "whole", data_dir, progress=False)
    cut = run_training(tiny_cfg_factory("awr", settings + ["train.max_seconds=1e-9"]), tmp_path / "cut", data_dir,
                       progress=False)
    assert cut.steps == 1  # stopped by the time limit after one step, with a resumable checkpoint
    resumed = run_training(tiny_cfg_factory("awr", settings), tmp_path / "cut", data_dir, resume=True, progress=False)
    assert resumed.steps == whole.steps == 3
    curve = [(m["step"], m["loss"]) for m in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "loss" in m]
    assert [(m["step"], m["loss"]) for m in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in m] == curve
    for name in ("model.safetensors", VALUE_HEAD):  # the head and its optimizer state came back exactly
        a, b = load_file(str(whole.checkpoint / name)), load_file(str(resumed.checkpoint / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
