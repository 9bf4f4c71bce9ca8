"""The fused LM-head loss (train.fused_loss) against the plain path, objective by objective; the allocator setting."""
import os
import subprocess
import sys

import pytest
import torch

from phf.core.config import ModelConfig, ObjectiveConfig
from phf.model import lm_loss
from phf.model.lm import build_model
from phf.tasks import get_task
from phf.training.objectives import get_objective


def _model(tied: bool = True):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, tie_word_embeddings=tied)
    return build_model(cfg, vocab_size=97, eos_id=0).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 40), generator=g)
    y = torch.randint(0, 97, (3, 40), generator=g)
    scores = torch.rand(3, 40, generator=g) * 0.02
    scores[0, :10] = 0.0
    scores[1, 5] = float("nan")  # an unscorable segment: no loss there, on either path
    return x, y, scores


def _loss_and_grads(objective, fused: bool, tied: bool, dtype: str):
    model = _model(tied)
    heads = objective.attach(model)
    x, y, s = _batch()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = objective.forward(model, x, fused=fused)
    loss = objective.loss(out, y, s)
    loss.backward()
    params = [*model.parameters(), *(p for h in heads for p in h.parameters())]
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("name,settings", [("mle", {}), ("conditional", {}), ("unlikelihood", {"alpha": 1.0}),
                                           ("rwr", {"beta": 0.01}), ("awr", {"alpha": 0.5, "beta": 0.1})])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_equals_plain_in_fp32(name, settings, tied, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_TOKENS", 7)  # several chunks and a ragged last one (120 tokens)
    cfg = ObjectiveConfig(name=name, threshold=0.005 if name in ("unlikelihood", "conditional") else None, **settings)
    objective = get_objective(cfg, get_task("pep8"))
    objective.fit(torch.zeros(4).numpy())
    plain, g_plain = _loss_and_grads(objective, False, tied, "fp32")
    objective = get_objective(cfg, get_task("pep8"))
    objective.fit(torch.zeros(4).numpy())
    fused, g_fused = _loss_and_grads(objective, True, tied, "fp32")
    assert torch.isfinite(plain) and fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert len(g_plain) == len(g_fused)
    for a, b in zip(g_plain, g_fused):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-8, (a - b).abs().max()  # float32 summation order only


def test_fused_loss_in_bf16_is_close_and_stores_no_logits(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_TOKENS", 16)
    objective = get_objective(ObjectiveConfig(name="mle"), get_task("pep8"))
    plain, g_plain = _loss_and_grads(objective, False, True, "bf16")
    fused, g_fused = _loss_and_grads(objective, True, True, "bf16")
    assert fused.item() == pytest.approx(plain.item(), rel=2e-3)
    for a, b in zip(g_plain, g_fused):
        assert (a - b).norm() <= 0.02 * a.norm() + 1e-6
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective.forward(model, _batch()[0], fused=True)
    assert isinstance(out, lm_loss.HeadOutput) and out.compute_dtype == torch.bfloat16
    assert out.hidden.shape == (3, 40, 32) and out.weight is model.lm_head.weight


def test_unlikelihood_gradient_vanishes_where_one_minus_p_is_clamped():
    # a token the model is certain of, marked unlikely: the loss is the clamp's constant and pushes nothing
    hidden = torch.zeros(1, 1, 2, requires_grad=True)
    weight = torch.tensor([[60.0, 0.0], [0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    out = lm_loss.HeadOutput(hidden + torch.tensor([1.0, 0.0]), weight, (), torch.float32)
    loss = lm_loss.weighted_token_loss(out, torch.tensor([[0]]), unlikely=torch.tensor([[True]]), alpha=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0 * torch.log(torch.tensor(lm_loss.UNLIKELIHOOD_EPS)).item(), rel=1e-6)
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_no_gradients_are_computed_without_autograd():
    model = _model()
    objective = get_objective(ObjectiveConfig(name="mle"), get_task("pep8"))
    with torch.no_grad():
        loss = objective.loss(objective.forward(model, _batch()[0], fused=True), _batch()[1], _batch()[2])
    assert not loss.requires_grad and torch.isfinite(loss)


_ALLOCATOR_PROBE = "from phf.core.runtime import tune_allocator, allocator_state; print(tune_allocator(), allocator_state())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_allocator_is_tuned_unless_opted_out():
    env = {k: v for k, v in os.environ.items() if k != "PHF_ALLOCATOR"}
    tuned = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert tuned[0] == "True" and "heap" in " ".join(tuned[1:])
    default = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=dict(env, PHF_ALLOCATOR="default"),
                             capture_output=True, text=True, check=True).stdout.split()
    assert default == ["False", "default"]
