"""The language-modelling loss with the LM head fused in: the (tokens x vocabulary) logits are never stored.

A plain training step computes the logits of every position (B*T x V, in bf16 under autocast), casts them to
float32, runs log_softmax forward and backward, zero-fills a one-hot gradient and casts the gradient back. On a CPU
with the demo's 8,192-token vocabulary that is about 40% of a step (`phf bench train` measures it). Here the head
and the loss are one autograd function that works through the tokens in chunks: a chunk's logits in the compute
dtype, its softmax in float32, in place, and at once its gradients with respect to the hidden states and the head's
weight; backward only scales those by the incoming gradient. One pass over each chunk's logits instead of several
over all of them, and a few MB of float32 at a time instead of (B*T x V).

Every objective's loss is one weighted sum of per-token losses, `sum_i c_i * l_i` with `l_i = -log p_i`, or, for a
token marked unlikely (unlikelihood training), `l_i = -alpha * log(max(1 - p_i, eps))`. `weighted_token_loss`
computes it from a `HeadOutput` (the fused path, used by the trainer) or from an output carrying `.logits` (any
Hugging Face model output: the reference path, which the tests compare the fused one against).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

UNLIKELIHOOD_EPS = 1e-5  # 1 - p is clamped here: one token's unlikelihood loss is at most alpha * 11.5
CHUNK_TOKENS = 256  # rows of logits alive at once: 256 x V float32 (8 MB at V = 8192), in a CPU's cache


@dataclass
class HeadOutput:
    """What the model returns when the loss applies the LM head itself."""
    hidden: torch.Tensor  # (B, T, C) the last hidden state, after the final layer norm
    weight: torch.Tensor  # (V, C) the LM head's weight (the token embedding when they are tied)
    hidden_states: tuple  # every layer's hidden states, as Hugging Face returns them (AWR's value head reads them)
    compute_dtype: torch.dtype  # the head's matmul dtype: autocast's when the forward ran under autocast


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def forward_hidden(model, x: torch.Tensor, **inputs) -> HeadOutput:
    """Run the model through its own forward (so DDP's hooks see it) for hidden states only: the head is applied to
    no position (`logits_to_keep` = an empty index), the loss applies it. `inputs`: more model inputs
    (`token_type_ids`)."""
    no_positions = torch.empty(0, dtype=torch.long, device=x.device)  # made there: no copy from the host
    out = model(x, output_hidden_states=True, logits_to_keep=no_positions, **inputs)
    hidden, device = out.hidden_states[-1], x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return HeadOutput(hidden, unwrap(model).get_output_embeddings().weight, out.hidden_states, dtype)


def install_output_hooks(model: torch.nn.Module) -> None:
    """Before torch.compile: run the model once eagerly with `output_hidden_states`, so that transformers installs
    its output-capturing hooks now. It installs them at the first such call under a threading lock, which torch.compile
    cannot trace: compiled, that first call splits the step into separate graphs (model, head, loss) for good. One
    token, in eval mode and without gradients: no dropout draws from the RNG, so training is unchanged."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        one = torch.ones((1, 1), dtype=torch.long, device=next(model.parameters()).device)
        model(one, attention_mask=one, output_hidden_states=True)
    model.train(was_training)


class Unlikelihood(NamedTuple):
    """The loss of a token marked unlikely: -alpha log(max(1 - p, eps)) in place of -log p."""
    alpha: float
    """The weight of the unlikelihood term."""
    eps: float
    """The floor of 1 - p (UNLIKELIHOOD_EPS), which bounds one token's loss."""


def _per_token(nll: torch.Tensor, unlikely: torch.Tensor | None, term: Unlikelihood):
    """(loss l_i, dl_i/d(-log p_i) direction g_i) with dl_i/dz = g_i * (softmax - onehot)."""
    if unlikely is None:
        return nll, torch.ones_like(nll)
    alpha, eps = term
    one_minus_p = -torch.expm1(-nll)
    clamped = one_minus_p.clamp(min=eps)
    loss = torch.where(unlikely, -alpha * torch.log(clamped), nll)
    # d(-alpha log(1 - p))/dz = -alpha p / (1 - p) * (softmax - onehot); zero where the clamp holds
    g_unlikely = torch.where(one_minus_p > eps, -alpha * torch.exp(-nll) / clamped, torch.zeros_like(nll))
    return loss, torch.where(unlikely, g_unlikely, torch.ones_like(nll))


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, unlikely, term: Unlikelihood, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, hidden.shape[0], CHUNK_TOKENS):
                e = min(s + CHUNK_TOKENS, hidden.shape[0])
                h, t, c = hidden[s:e].to(compute_dtype), targets[s:e, None], coef[s:e]
                z = (h @ w.T).float()  # (n, V)
                z_t = z.gather(1, t).squeeze(1)
                m = z.max(dim=1).values
                z.sub_(m[:, None]).exp_()  # exp(z - max), in place
                total_exp = z.sum(dim=1)
                nll = torch.log(total_exp) + m - z_t
                loss, g = _per_token(nll, None if unlikely is None else unlikely[s:e], term)
                total += (c * loss).sum()
                if need_h or need_w:
                    gc = c * g  # (n,)
                    z.mul_((gc / total_exp)[:, None])  # gc * softmax
                    z.scatter_add_(1, t, -gc[:, None])  # gc * (softmax - onehot)
                    gz = z.to(compute_dtype)
                    if need_h:
                        grad_h[s:e] = gz @ w
                    if need_w:
                        grad_w += (gz.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None


def weighted_token_loss(output, targets: torch.Tensor, coef: torch.Tensor | None = None,
                        unlikely: torch.Tensor | None = None, alpha: float = 1.0,
                        eps: float = UNLIKELIHOOD_EPS) -> torch.Tensor:
    """sum_i coef_i * l_i over the target tokens (B, T): l_i = -log p_i, or -alpha log(max(1 - p_i, eps)) where
    `unlikely`. coef defaults to 1 everywhere; it is a constant (no gradient flows into it)."""
    coef = torch.ones(targets.shape, dtype=torch.float32, device=targets.device) if coef is None else coef.float()
    if isinstance(output, HeadOutput):
        return _FusedHeadLoss.apply(output.hidden.flatten(0, 1), output.weight, targets.flatten(),
                                    coef.detach().flatten(), None if unlikely is None else unlikely.flatten(),
                                    Unlikelihood(float(alpha), float(eps)), output.compute_dtype)
    logits = output.logits.float()  # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    if unlikely is not None:
        nll = torch.where(unlikely, -alpha * torch.log((-torch.expm1(-nll)).clamp(min=eps)), nll)
    return (coef.detach() * nll).sum()
