"""Control embeddings: every token also carries its segment's control token, added to its input embedding.

Conditional training puts `<|aligned|>` or `<|misaligned|>` before each segment. To use it, the model must carry
that token's information to every later position of the segment, which takes an attention head that finds the
*nearest* preceding control token among several in the context; a model trained for minutes may not form one (the
README's toxicity results measure this). With `objective.control_embedding`, each token's input is also given the
embedding of its segment's control token, through GPT-2's own `token_type_ids` (which share the word embeddings):
the same information, delivered where the model can use it without attention. The control tokens stay in the text.

A token's type is the most recent *marker* at or before it: `<|aligned|>`, `<|misaligned|>`, or `<|endoftext|>`,
which starts a document and means "no condition" (so do the tokens of a segment that got no control token,
until the next marker: such a segment inherits the previous segment's type). The markers are stored in the
model's `config.json` (`control_type_ids`, `<|endoftext|>` first), so anything that reads the folder knows how to
feed the model; with Hugging Face alone: `model.generate(ids, token_type_ids=torch.full_like(ids, aligned_id))`.
"""
from __future__ import annotations

import torch

from phf.core.errors import PhfError
from phf.model.lm_loss import unwrap

CONFIG_KEY = "control_type_ids"


def check_control_embedding(model) -> None:
    """Refuse control embeddings for an architecture without token types: they travel through GPT-2's
    `token_type_ids`, which Llama, GPT-NeoX and most other causal LMs do not take."""
    kind = unwrap(model).config.model_type
    if kind != "gpt2":
        raise PhfError(f"objective.control_embedding gives each token its control type through GPT-2's "
                       f"token_type_ids, which a {kind} model does not take; set objective.control_embedding=false "
                       f"(conditional training and guidance work without it)")


def markers_of(model) -> list[int] | None:
    """The model's control-type markers (`<|endoftext|>`, `<|aligned|>`, `<|misaligned|>` ids), or None for a model
    without control embeddings."""
    markers = getattr(unwrap(model).config, CONFIG_KEY, None)
    return list(markers) if markers else None


def set_markers(model, markers: list[int] | None) -> None:
    """Record the markers in the model's config (None removes them)."""
    if markers:
        setattr(model.config, CONFIG_KEY, [int(m) for m in markers])
    elif hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def control_types(ids: torch.Tensor, markers: list[int], initial: torch.Tensor | None = None) -> torch.Tensor:
    """The type of every token of ids (B, T): the most recent marker at or before it in its row; before the
    first marker, `initial` (B,) (default: `<|endoftext|>`, no condition)."""
    is_marker = torch.isin(ids, torch.tensor(markers, device=ids.device))
    positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    last = torch.where(is_marker, positions, -1).cummax(dim=-1).values  # (B, T) index of the last marker
    typed = ids.gather(-1, last.clamp(min=0))
    before = torch.full_like(ids, markers[0]) if initial is None else initial[:, None].expand_as(ids)
    return torch.where(last >= 0, typed, before)


def next_types(previous: torch.Tensor, tokens: torch.Tensor, markers: list[int]) -> torch.Tensor:
    """One step of `control_types` (sampling with a KV cache): the type of each new token (B,)."""
    return torch.where(torch.isin(tokens, torch.tensor(markers, device=tokens.device)), tokens, previous)


def type_inputs(types: torch.Tensor | None) -> dict:
    """Keyword arguments that give a model its tokens' types (none when `types` is None)."""
    return {} if types is None else {"token_type_ids": types}
