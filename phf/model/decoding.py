"""Decoders: one forward step for a whole batch of samples, each row at its own position.

Sampling from the small models phf trains is bound by per-step overhead, not arithmetic: `transformers`' forward
pays for mask building, cache bookkeeping and growing cache tensors at every layer of every step. `Gpt2Decoder`
runs GPT-2's arithmetic from the model's own weights with a preallocated (static) KV cache, so a step is a dozen
tensor operations per layer; `HfDecoder` runs any other architecture through `transformers` and its cache.

Both hold rows right-padded: a row's prompt fills cache slots 0..n-1 and its k-th new token slot n+k, so a row's
position is its length and no left padding shifts positions. Both can drop finished rows (`keep`), so the rows
still being sampled stop paying for those already done. tests/test_decoding.py checks every decoder against a
full forward pass of the model.

The static decoders (`StaticGpt2Decoder`, `StaticHfDecoder`, on `_FixedSlots`) trade that for fixed shapes, which
a GPU needs to replay a step as a CUDA graph: rows left-padded, a cache of the full length read through a mask,
all bookkeeping on the device, nothing dropped (phf.evaluation.sampling.StaticSampling).
tests/test_static_decoding.py checks them against a full forward pass too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import StaticCache

from phf.model.lm_loss import unwrap

_GPT2_ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                     "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                     "gelu": F.gelu, "relu": F.relu}


def context_length(model) -> int:
    """The number of positions the model can read (GPT-2's `n_positions`, other architectures'
    `max_position_embeddings`)."""
    config = unwrap(model).config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of a {type(config).__name__}")


def fast_gpt2(model) -> bool:
    """Whether `Gpt2Decoder` computes exactly what this model's own forward does."""
    config = unwrap(model).config
    return (config.model_type == "gpt2" and config.activation_function in _GPT2_ACTIVATIONS
            and config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
            and not getattr(config, "add_cross_attention", False))


DECODERS = ("auto", "gpt2", "hf", "static", "static-gpt2", "static-hf")


def static_unsupported(model) -> str | None:
    """Why the static decoders cannot run this model exactly (None: they can): `StaticHfDecoder` gives attention a
    4-D mask of full causal attention, which sliding-window layers and flash-attention kernels do not take."""
    if fast_gpt2(model):
        return None
    config = unwrap(model).config
    if getattr(config, "sliding_window", None):
        return f"its {config.model_type} layers attend through a sliding window"
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        return f"its attention implementation is {implementation} (sdpa and eager take a 4-D mask)"
    return None


def make_decoder(model, rows: int, max_length: int, kind: str = "auto", cache_dtype: torch.dtype | None = None):
    """A decoder for `rows` rows of up to `max_length` tokens each. kind: auto (the fast GPT-2 decoder where it
    applies, else transformers), gpt2, hf; static (fixed shapes, `StaticGpt2Decoder` where the fast GPT-2
    arithmetic applies, else `StaticHfDecoder`), static-gpt2, static-hf. `cache_dtype`: the static decoders'
    cache dtype (default: the model's)."""
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}: use one of {', '.join(DECODERS)}")
    if kind == "static-gpt2" or (kind == "static" and fast_gpt2(model)):
        return StaticGpt2Decoder(unwrap(model), rows, max_length, cache_dtype)
    if kind in ("static", "static-hf"):
        reason = static_unsupported(model)
        if reason:
            raise ValueError(f"the static decoder cannot run this model: {reason}; use decoder=hf")
        return StaticHfDecoder(unwrap(model), rows, max_length)
    if kind == "gpt2" or (kind == "auto" and fast_gpt2(model)):
        return Gpt2Decoder(unwrap(model), rows, max_length)
    return HfDecoder(unwrap(model), rows)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row over the cache. On CPU two plain matmuls are ~25% faster than the fused
    kernel for a single query (measured at 256 rows, 128 cached positions); elsewhere the fused kernel."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (R, H, 1, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, -float("inf"))
    return torch.softmax(scores, dim=-1) @ v


def _right_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), lengths


class Gpt2Decoder:
    """GPT-2 with a static KV cache of shape (layers, rows, heads, max_length, head width)."""

    def __init__(self, model, rows: int, max_length: int, cache_dtype: torch.dtype | None = None):
        config, t = model.config, model.transformer
        self.wte, self.wpe, self.head = t.wte.weight, t.wpe.weight, model.lm_head.weight
        self.blocks = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        self.ln_f = t.ln_f
        self.heads, self.width = config.n_head, config.n_embd
        self.act = _GPT2_ACTIVATIONS[config.activation_function]
        shape = (len(self.blocks), rows, self.heads, max_length, self.width // self.heads)
        # zeros, not empty: a masked slot's weight is 0, and 0 * (NaN left in unused memory) would be NaN
        self.k = torch.zeros(shape, dtype=cache_dtype or self.wte.dtype, device=self.wte.device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(rows, dtype=torch.long)  # filled slots per row, on the host: no device sync
        self.positions = self.lengths.to(self.wte.device)  # the same on the device

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        x = self.wte[ids] + self.wpe[positions]
        return x if types is None else x + self.wte[types]  # control embeddings (phf.model.conditioning)

    @staticmethod
    def _norm(ln, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def _mlp(self, x: torch.Tensor, ln, fc, proj) -> torch.Tensor:
        return x + proj(self.act(fc(self._norm(ln, x))))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.ln_f, x) @ self.head.T

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], types: list[list[int]] | None = None) -> torch.Tensor:
        """Read the prompts (one per row); the logits after each prompt's last token (rows, V)."""
        ids, lengths = _right_padded(prompts, self.wte.device)
        R, W = ids.shape
        pos = torch.arange(W, device=ids.device).expand(R, W)
        x = self._embed(ids, pos, None if types is None else _right_padded(types, ids.device)[0])
        for l, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            qkv = c_attn(self._norm(ln_1, x)).view(R, W, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (R, H, W, D)
            self.k[l, :, :, :W], self.v[l, :, :, :W] = k, v  # a row's padding slots are overwritten before read
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # padding follows the text: never read
            x = x + c_proj(a.transpose(1, 2).reshape(R, W, self.width))
            x = self._mlp(x, ln_2, c_fc, mlp_proj)
        self.lengths = lengths
        self.positions = lengths.to(ids.device)
        last = x[torch.arange(R, device=ids.device), self.positions - 1]  # (R, C)
        return self._logits(last)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (R,); the logits after it (R, V)."""
        R, pos = self.rows, self.positions
        x = self._embed(tokens, pos, types)  # (R, C)
        span = int(self.lengths.max()) + 1  # cache slots any row reads
        uniform = bool((self.lengths == self.lengths[0]).all())  # all rows at one position: no mask, plain writes
        slot = int(self.lengths[0])
        mask = None if uniform else (torch.arange(span, device=pos.device) <= pos[:, None])[:, None, None, :]
        rows = torch.arange(R, device=pos.device)
        for l, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            q, k, v = c_attn(self._norm(ln_1, x)).view(R, 3, self.heads, -1).unbind(1)  # each (R, H, D)
            if uniform:
                self.k[l, :, :, slot], self.v[l, :, :, slot] = k, v
            else:
                self.k[l][rows, :, pos], self.v[l][rows, :, pos] = k, v
            a = _attend(q[:, :, None], self.k[l, :, :, :span], self.v[l, :, :, :span], mask)  # (R, H, 1, D)
            x = x + c_proj(a.reshape(R, self.width))
            x = self._mlp(x, ln_2, c_fc, mlp_proj)
        self.lengths = self.lengths + 1
        self.positions = pos + 1
        return self._logits(x)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current rows, host tensor), in that order."""
        span = int(self.lengths.max())
        k = self.k.new_zeros((self.k.shape[0], len(rows), *self.k.shape[2:]))
        v = torch.zeros_like(k)
        index = rows.to(self.k.device)
        k[:, :, :, :span] = self.k[:, index, :, :span]  # only the slots in use are copied
        v[:, :, :, :span] = self.v[:, index, :, :span]
        self.k, self.v = k, v
        self.lengths = self.lengths[rows]
        self.positions = self.positions[index]


class HfDecoder:
    """Any `transformers` causal LM, through its own forward and cache. Rows are right-padded; the attention mask
    hides the padding and position ids keep each row's own positions."""

    def __init__(self, model, rows: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(rows, dtype=torch.long)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def _forward(self, ids, positions, types) -> torch.Tensor:
        extra = {} if types is None else {"token_type_ids": types}
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, **extra)
        self.cache = out.past_key_values
        return out.logits

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], types: list[list[int]] | None = None) -> torch.Tensor:
        ids, lengths = _right_padded(prompts, self.device)
        R, W = ids.shape
        self.mask = (torch.arange(W) < lengths[:, None]).long().to(self.device)
        positions = torch.arange(W, device=self.device).expand(R, W)
        logits = self._forward(ids, positions, None if types is None else _right_padded(types, self.device)[0])
        self.lengths = lengths
        return logits[torch.arange(R, device=self.device), lengths.to(self.device) - 1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        positions = self.lengths.to(self.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=-1)
        logits = self._forward(tokens[:, None], positions, None if types is None else types[:, None])
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        index = rows.to(self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths = self.lengths[rows]


def _left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) ids with each prompt at the right end, and each row's first slot of text (rows,)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


class _FixedSlots:
    """The bookkeeping shared by the static decoders: rows left-padded, so that every row writes its k-th new
    token to the same slot (prompt width + k) and a step is the same operations on the same shapes whatever the
    rows' lengths; a row reads the slots from its own first one (`start`) to the current one (`slot`). All of it
    lives on the device and is updated in place, so a step needs no host value and can be replayed as a CUDA
    graph."""

    def _init_slots(self, rows: int, max_length: int, device) -> None:
        self.slots = torch.arange(max_length, device=device)
        self.start = torch.zeros(rows, dtype=torch.long, device=device)  # each row's first slot of text
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next token goes, every row
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # the next token's position

    def _prefill_inputs(self, prompts, types):
        """Left-padded ids (R, W), positions (R, W) (0 over the padding), types or None, and the attention mask
        (R, 1, W, max_length): causal, blind to the padding; a padding slot sees itself, so that no softmax
        row is empty (its output is never read)."""
        ids, start = _left_padded(prompts, self.slots.device)
        W = ids.shape[1]
        slots = self.slots[:W]
        positions = (slots - start[:, None]).clamp(min=0)
        keys, queries = self.slots[None, None, :], slots[None, :, None]
        mask = (keys <= queries) & ((keys >= start[:, None, None]) | (keys == queries))
        typed = None if types is None else _left_padded(types, ids.device)[0]
        self.start.copy_(start)
        self.slot.fill_(W)
        self.positions.copy_(W - start)
        return ids, positions, typed, mask[:, None]

    def span_at(self, slot: int) -> int | None:
        """How many cache slots a step that writes `slot` reads (None: all of them). A decoder that can read fewer
        rounds up to whole buckets, so that one CUDA graph serves a bucket's steps."""
        return None

    def _step_mask(self, span: int | None = None) -> torch.Tensor:
        """(R, 1, 1, span): the slots each row reads at this step, its own text up to the current slot."""
        slots = self.slots[:span]
        return ((slots >= self.start[:, None]) & (slots <= self.slot))[:, None, None, :]

    def _advance(self) -> None:
        self.slot += 1
        self.positions += 1


class StaticGpt2Decoder(_FixedSlots, Gpt2Decoder):
    """`Gpt2Decoder`'s arithmetic with fixed shapes (`_FixedSlots`): every step attends over the whole cache
    through a mask, so that the step can be captured once as a CUDA graph and replayed. Rows are not dropped
    (`keep` is not supported): a finished row is masked by the sampler."""

    SPAN_BUCKET = 128  # attention reads the cache in whole buckets of this many slots (0: always all of it)

    def __init__(self, model, rows: int, max_length: int, cache_dtype: torch.dtype | None = None):
        Gpt2Decoder.__init__(self, model, rows, max_length, cache_dtype)
        self._init_slots(rows, max_length, self.wte.device)
        self.span = None  # the slots a step reads (set per bucket with `span_at`; None: all)

    def span_at(self, slot: int) -> int | None:
        """Reading only the buckets in use halves the attention's memory traffic over a long sample, for one
        CUDA graph per bucket."""
        if not self.SPAN_BUCKET:
            return None
        return min(self.slots.shape[0], (slot // self.SPAN_BUCKET + 1) * self.SPAN_BUCKET)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], types: list[list[int]] | None = None) -> torch.Tensor:
        ids, positions, typed, mask = self._prefill_inputs(prompts, types)
        R, W = ids.shape
        x = self._embed(ids, positions, typed)
        for l, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            q, k, v = c_attn(self._norm(ln_1, x)).view(R, W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            self.k[l, :, :, :W], self.v[l, :, :, :W] = k, v
            a = _attend(q, self.k[l, :, :, :W], self.v[l, :, :, :W], mask[..., :W])
            x = x + c_proj(a.transpose(1, 2).reshape(R, W, self.width))
            x = self._mlp(x, ln_2, c_fc, mlp_proj)
        return self._logits(x[:, -1])  # every row's last token is in the last slot

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        R, span = self.rows, self.span
        x = self._embed(tokens, self.positions, types)
        mask = self._step_mask(span)
        for l, (ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj) in enumerate(self.blocks):
            q, k, v = c_attn(self._norm(ln_1, x)).view(R, 3, self.heads, -1).unbind(1)  # each (R, H, D)
            self.k[l].index_copy_(2, self.slot, k[:, :, None].to(self.k.dtype))
            self.v[l].index_copy_(2, self.slot, v[:, :, None].to(self.v.dtype))
            a = _attend(q[:, :, None], self.k[l, :, :, :span], self.v[l, :, :, :span], mask)  # (R, H, 1, D)
            x = x + c_proj(a.reshape(R, self.width))
            x = self._mlp(x, ln_2, c_fc, mlp_proj)
        self._advance()
        return self._logits(x)

    def keep(self, rows: torch.Tensor) -> None:
        raise NotImplementedError("a static decoder keeps its rows: finished rows are masked, not dropped")


class StaticHfDecoder(_FixedSlots):
    """Any `transformers` causal LM with fixed shapes (`_FixedSlots`): its own forward over a `StaticCache` of
    `max_length` slots, given the cache position and each row's position ids, and a 4-D attention mask built here
    (bool for sdpa, additive for eager attention), so that `transformers` builds no mask and reads no host value."""

    def __init__(self, model, rows: int, max_length: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self.additive = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.dtype = next(model.parameters()).dtype
        self.rows = rows
        self._init_slots(rows, max_length, self.device)

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not self.additive:
            return mask
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(self.dtype).min)

    def _forward(self, ids, positions, types, mask, cache_position) -> torch.Tensor:
        extra = {} if types is None else {"token_type_ids": types}
        out = self.model(input_ids=ids, attention_mask=self._attention_mask(mask), position_ids=positions,
                         past_key_values=self.cache, cache_position=cache_position, use_cache=True,
                         logits_to_keep=1, **extra)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], types: list[list[int]] | None = None) -> torch.Tensor:
        ids, positions, typed, mask = self._prefill_inputs(prompts, types)
        return self._forward(ids, positions, typed, mask, self.slots[:ids.shape[1]])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        logits = self._forward(tokens[:, None], self.positions[:, None], None if types is None else types[:, None],
                               self._step_mask(), self.slot)
        self._advance()
        return logits


def cache_bytes(model, rows: int, max_length: int) -> int:
    """Memory of a static KV cache for `rows` rows (what `Gpt2Decoder` allocates)."""
    config = unwrap(model).config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    kv_heads = getattr(config, "num_key_value_heads", None)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    if kv_heads:
        width = width * kv_heads // heads
    return 2 * layers * rows * max_length * width * next(unwrap(model).parameters()).element_size()

