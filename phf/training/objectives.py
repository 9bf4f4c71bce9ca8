"""Objectives: how each one prepares the scored corpus for training, its loss, and how its model is deployed.

Each objective is one class. `keep_document` and `segment_prefix` shape the token stream (phf/data/token_stream.py);
`loss_mask` says which target tokens bear loss and `loss` returns the sum of their per-token losses, so the
trainer can normalise by the global count of loss-bearing tokens across micro-batches and ranks. `forward`,
`attach` and `save_extra` let an objective own trainable modules besides the language model (AWR's value head).
`sampling_prefix`, `banned_tokens` and `line_prefix` say how the trained model is conditioned at deployment
(sampling and held-out evaluation).

Each class binds itself with `@registered(name)` to its record in the objective registry
(phf.core.objective_specs: its name, config fields, defaults, sweep arms, report colour). A config field left at
None takes the task's default (`Task.defaults_for`: the record's, or the paper's for a shipped task).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from phf.core.config import ObjectiveConfig, Quantile
from phf.core.errors import PhfError
from phf.core.objective_specs import ObjectiveSpec, spec_of
from phf.core.tokens import ALIGNED, HIDDEN, MISALIGNED
from phf.model.conditioning import type_inputs
from phf.model.lm import VALUE_HEAD, ValueHead, load_value_head, save_value_head
from phf.model.lm_loss import UNLIKELIHOOD_EPS, forward_hidden, weighted_token_loss
from phf.tasks import Task

log = logging.getLogger(__name__)

# The class of each registered objective, in the registry's order once every class below is bound.
OBJECTIVES: dict[str, type["Objective"]] = {}


def registered(name: str):
    """Bind an Objective class to its record in the registry (phf.core.objective_specs) under `name`."""
    spec = spec_of(name)

    def bind(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is bound twice: {OBJECTIVES[name].__name__} and {cls.__name__}")
        cls.name, cls.spec, cls.uses_threshold = name, spec, "threshold" in spec.fields
        OBJECTIVES[name] = cls
        return cls
    return bind


class Objective:
    name: ClassVar[str] = "base"  # set by @registered, from the objective's record
    spec: ClassVar[ObjectiveSpec | None] = None  # the objective's record (phf.core.objective_specs)
    sampling_prefix: ClassVar[list[str]] = []  # control tokens after <|endoftext|> when sampling
    banned_tokens: ClassVar[list[str]] = []  # tokens that can never be sampled
    line_prefix: ClassVar[str | None] = None  # control token before every segment of a prompt / held-out text
    uses_threshold: ClassVar[bool] = False  # whether `threshold` means anything (set by @registered: a spec field)
    control_embedding: bool = False  # whether the model also reads each token's control type (phf.model.conditioning)
    masks_segments: ClassVar[bool] = False  # whether flagged segments bear no loss (the conditioning check reads it)
    hides_segments: ClassVar[bool] = False  # whether flagged segments' tokens are written as <|hidden|>
    cooldown_fraction: float = 0.0  # the last fraction of steps trained without control tokens (conditional)

    def __init__(self, cfg: ObjectiveConfig, defaults: dict | None = None):
        """`defaults`: the task's values for the config fields left at None (`Task.defaults_for`)."""
        self.cfg = cfg
        self.defaults = dict(defaults or {})
        self.check_conditioning = cfg.check_conditioning  # phf.data.token_stream.check_conditioning
        self.threshold = cfg.threshold if self.uses_threshold else None
        rule = self._threshold_rule()
        if self.threshold is None and rule is not None and not isinstance(rule, Quantile):
            self.threshold = float(rule)  # an absolute default needs no data; a quantile waits for fit()

    def setting(self, field: str):
        """A config field's value, or the task's default when the config leaves it at None."""
        value = getattr(self.cfg, field)
        return self.defaults.get(field) if value is None else value

    def _threshold_rule(self) -> float | Quantile | None:
        if not self.uses_threshold:
            return None
        if self.cfg.threshold is not None:
            return self.cfg.threshold
        if self.cfg.threshold_quantile is not None:
            return Quantile(self.cfg.threshold_quantile)
        return self.defaults.get("threshold", 0.0)

    # -- data --------------------------------------------------------------------------------------------------
    def fit(self, train_document_scores: np.ndarray) -> None:
        """Resolve data-dependent settings (a threshold given as a quantile) from the training document scores."""
        rule = self._threshold_rule()
        if isinstance(rule, Quantile):
            valid = train_document_scores[~np.isnan(train_document_scores)]
            if not len(valid):
                raise PhfError(f"{self.name}: no scored training document to set the threshold from")
            self.threshold = float(np.quantile(valid, rule.q))

    def keep_document(self, score: float) -> bool:
        return True

    def segment_prefix(self, score: float, rng: np.random.Generator) -> str | None:
        return None

    def stream_settings(self) -> dict:
        """Everything that shapes this objective's token stream (`keep_document`, `segment_prefix`): objectives
        with equal settings share one written stream (MLE, unlikelihood, RWR and AWR read the same tokens and
        per-token scores; only their losses differ). An objective that shapes its stream without saying how
        gets a stream of its own."""
        cls = type(self)
        if cls.keep_document is Objective.keep_document and cls.segment_prefix is Objective.segment_prefix:
            return {"documents": "all", "prefixes": None}
        return {"documents": {"objective": self.describe()}, "prefixes": {"objective": self.describe()}}

    def cooldown_starts(self, total_steps: int) -> int:
        """The first step of the cooldown (conditional training's last steps, read without control tokens);
        total_steps when there is none."""
        return total_steps - math.floor(self.cooldown_fraction * total_steps)

    # -- model -------------------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, checkpoint: str | Path | None = None,
               required: bool = False) -> list[torch.nn.Module]:
        """Build the trainable modules this objective adds to `model` (loaded from `checkpoint` if it holds them;
        `required`: it must, as when resuming) and return them, so the trainer optimises and saves them too."""
        return []

    def extra_modules(self) -> list[torch.nn.Module]:
        """The modules `attach` returned (none by default)."""
        return []

    def save_extra(self, folder: Path) -> None:
        """Write the extra modules into a checkpoint folder (save_checkpoint's temporary one)."""

    def forward(self, model, x: torch.Tensor, fused: bool = False, types: torch.Tensor | None = None):
        """Run the model on inputs x (B, T); `loss` receives what this returns: the model's output (with `.logits`),
        or with `fused` a phf.model.lm_loss.HeadOutput (hidden states; the loss applies the LM head chunk by chunk).
        `types` (B, T): the control type of each input token, for a model with control embeddings."""
        inputs = type_inputs(types)
        return forward_hidden(model, x, **inputs) if fused else model(x, **inputs)

    # -- loss --------------------------------------------------------------------------------------------------
    def loss_mask(self, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Which target tokens bear loss (B, T) bool; the trainer divides by their global count."""
        return torch.ones_like(targets, dtype=torch.bool)

    def loss(self, output, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sum of per-token losses over the loss-bearing tokens.

        output: what `forward` returned (`.logits` (B, T, V), or a HeadOutput); targets (B, T) token ids;
        scores (B, T) the segment score of each target token."""
        return weighted_token_loss(output, targets)

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "sampling_prefix": self.sampling_prefix,
                "banned_tokens": self.banned_tokens, "line_prefix": self.line_prefix}


@registered("mle")
class MLE(Objective):
    """Plain maximum likelihood: next-token cross-entropy on every token."""


@registered("filtering")
class Filtering(Objective):
    """MLE on the documents whose score is at most a threshold; the others (and unscorable ones) are dropped.

    Default threshold: the median training document score (`threshold_quantile` sets another quantile)."""

    def keep_document(self, score: float) -> bool:
        assert self.threshold is not None, "call fit() first"
        return not math.isnan(score) and score <= self.threshold

    def stream_settings(self) -> dict:
        return {"documents": {"max_score": self.threshold}, "prefixes": None}


@registered("conditional")
class Conditional(Objective):
    """Conditional training: `<|aligned|>` before each segment scoring at most the threshold (default for PEP8 and
    PII: 0, no violation at all), `<|misaligned|>` before the others; a `drop_token_fraction` of segments gets no
    token, and so does a segment whose scoring failed. Deployed conditioned on `<|aligned|>` with `<|misaligned|>`
    banned."""
    sampling_prefix = [ALIGNED]
    banned_tokens = [MISALIGNED]
    line_prefix = ALIGNED

    def __init__(self, cfg: ObjectiveConfig, defaults: dict | None = None):
        super().__init__(cfg, defaults)
        self.drop_token_fraction = float(self.setting("drop_token_fraction"))
        self.control_embedding = bool(cfg.control_embedding)
        self.cooldown_fraction = float(cfg.cooldown_fraction)

    def segment_prefix(self, score: float, rng: np.random.Generator) -> str | None:
        assert self.threshold is not None, "call fit() first"
        drop = rng.random() < self.drop_token_fraction
        if drop or math.isnan(score):
            return None
        return ALIGNED if score <= self.threshold else MISALIGNED

    def describe(self) -> dict:
        return dict(super().describe(), drop_token_fraction=self.drop_token_fraction,
                    control_embedding=self.control_embedding, cooldown_fraction=self.cooldown_fraction)

    def stream_settings(self) -> dict:
        return {"documents": "all", "prefixes": {"threshold": self.threshold, "drop": self.drop_token_fraction}}


class _TokenFeedback(Objective):
    """Shared by the objectives that read per-token scores in the loss: a token whose segment could not be scored
    (NaN) bears no loss — it is neither rewarded nor punished, and not counted in the normaliser."""

    def loss_mask(self, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return ~torch.isnan(scores)

    @staticmethod
    def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """values where mask holds, 0 elsewhere (where(), not a product: a NaN masked out stays out)."""
        return torch.where(mask, values, torch.zeros_like(values))

    @classmethod
    def _clean(cls, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # NaN replaced *before* any arithmetic: where() after the fact would still send NaN gradients back
        return cls._masked(scores, mask).float()


@registered("unlikelihood")
class Unlikelihood(_TokenFeedback):
    """Token-level unlikelihood (Welleck et al. 2019) as in the paper: a target token whose segment scores above
    the threshold is misaligned and gets `-alpha * log(1 - p)`, which pushes its probability down; every other
    token gets the likelihood loss `-log p`.

    The threshold is a real threshold at every value: 0 (the default for PEP8 and PII) makes any positive score
    misaligned. (The reference code treated 0 as "no threshold" and silently trained a soft mix instead.)
    `1 - p` is clamped at 1e-5, so one token's unlikelihood loss is at most alpha * 11.5."""

    def __init__(self, cfg: ObjectiveConfig, defaults: dict | None = None):
        super().__init__(cfg, defaults)
        self.alpha = float(self.setting("alpha"))

    def loss(self, output, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert self.threshold is not None, "call fit() first"
        mask = self.loss_mask(targets, scores)
        misaligned = (self._clean(scores, mask) > self.threshold) & mask  # (B, T)
        return weighted_token_loss(output, targets, coef=mask, unlikely=misaligned, alpha=self.alpha,
                                   eps=UNLIKELIHOOD_EPS)

    def describe(self) -> dict:
        return dict(super().describe(), alpha=self.alpha)


@registered("rwr")
class RWR(_TokenFeedback):
    """Reward-weighted regression: each token's cross-entropy weighted by `exp(reward / beta)`, reward = minus the
    score of the token's segment, the weight clipped at `max_weight`. Scores are >= 0, so the weights lie in
    (0, 1]: an aligned token weighs 1 and a misaligned one less, the more so the worse its segment. No value
    head (the reference code ran RWR as AWR with alpha 1, its value head untrained but still in the weights)."""

    def __init__(self, cfg: ObjectiveConfig, defaults: dict | None = None):
        super().__init__(cfg, defaults)
        self.beta = float(self.setting("beta"))
        self.max_weight = float(cfg.max_weight)

    def weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        reward = -self._clean(scores, mask)
        return torch.exp(reward / self.beta).clamp(max=self.max_weight)

    def loss(self, output, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = self.loss_mask(targets, scores)
        return weighted_token_loss(output, targets, coef=self._masked(self.weights(scores, mask), mask))

    def describe(self) -> dict:
        return dict(super().describe(), beta=self.beta, max_weight=self.max_weight)


@registered("awr")
class AWR(_TokenFeedback):
    """Advantage-weighted regression as in the paper. A value head V (phf.model.lm.ValueHead: a linear map of the
    last hidden state at each position) predicts the reward r of the next token (minus its segment's score).
    Per token: `alpha * w * CE + (1 - alpha) * (V - r)^2`, with `w = min(exp((r - V) / beta), max_weight)`
    computed from a detached V (the weights steer the language model; they do not train the head).

    The squared error reaches the transformer too, not only the head (the paper's runs did not detach it). The
    head starts at zero, so the first weights are RWR's. It is saved as `value_head.safetensors` next to the
    weights of every checkpoint and loaded back when a run resumes or starts from that checkpoint."""

    def __init__(self, cfg: ObjectiveConfig, defaults: dict | None = None):
        super().__init__(cfg, defaults)
        self.alpha = float(self.setting("alpha"))
        self.beta = float(self.setting("beta"))
        self.max_weight = float(cfg.max_weight)
        self.value_head = None

    def attach(self, model: torch.nn.Module, checkpoint: str | Path | None = None,
               required: bool = False) -> list[torch.nn.Module]:

        width = model.config.hidden_size
        head = load_value_head(checkpoint, width) if checkpoint else None
        if head is None:
            if required:
                raise PhfError(f"{checkpoint} has no {VALUE_HEAD}: it was not written by an AWR run, so it cannot "
                               f"be resumed with objective awr; start a new run with --init-from instead")
            if checkpoint:
                log.info("%s has no value head; AWR starts a new one at zero", checkpoint)
            head = ValueHead(width)
        device = next(model.parameters()).device
        self.value_head = head.to(device)
        return [self.value_head]

    def extra_modules(self) -> list[torch.nn.Module]:
        return [self.value_head] if self.value_head is not None else []

    def save_extra(self, folder: Path) -> None:
        if self.value_head is not None:
            save_value_head(self.value_head, folder)

    def forward(self, model, x: torch.Tensor, fused: bool = False, types: torch.Tensor | None = None):
        inputs = type_inputs(types)
        return forward_hidden(model, x, **inputs) if fused else model(x, output_hidden_states=True, **inputs)

    def values(self, output) -> torch.Tensor:
        """V at every position (B, T), from the last hidden state (after the final layer norm)."""
        assert self.value_head is not None, "call attach() first"
        return self.value_head(output.hidden_states[-1].float())

    def loss(self, output, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = self.loss_mask(targets, scores)
        reward = -self._clean(scores, mask)  # (B, T)
        value = self.values(output)  # (B, T)
        weight = torch.exp((reward - value.detach()) / self.beta).clamp(max=self.max_weight)
        weighted_ce = weighted_token_loss(output, targets, coef=self.alpha * self._masked(weight, mask))
        return weighted_ce + self._masked((1 - self.alpha) * (value - reward) ** 2, mask).sum()

    def describe(self) -> dict:
        return dict(super().describe(), alpha=self.alpha, beta=self.beta, max_weight=self.max_weight,
                    value_head="value_head.safetensors")


@registered("masking")
class Masking(Objective):
    """Token-level filtering by loss masking (Rathi & Radford 2026): every document and segment stays in the
    context, but the tokens of a segment scoring above the threshold, or whose scoring failed, bear no loss. The
    loss is the cross-entropy summed over the kept tokens; the trainer divides it by their global count, so it is
    the mean over kept tokens as MLE's is over all. It reads MLE's token stream. Default threshold: conditional
    training's (the task's misalignment threshold per segment)."""
    masks_segments = True

    def flagged(self, scores):
        """Whether each score's segment is flagged (above the threshold, or NaN); numpy or torch."""
        assert self.threshold is not None, "call fit() first"
        return ~(scores <= self.threshold)  # NaN compares False: an unscorable segment is flagged

    def loss_mask(self, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return ~self.flagged(scores)

    def loss(self, output, targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return weighted_token_loss(output, targets, coef=self.loss_mask(targets, scores))


@registered("masking-hidden")
class MaskingHidden(Masking):
    """Loss masking with removal (Rathi & Radford's second variant): each token of a flagged segment is written
    into the token stream as `<|hidden|>`, so the model never reads the flagged text either, and bears no loss.
    One `<|hidden|>` per token, as they replace every forget token: the windows, positions and kept tokens are
    exactly masking's, so the two arms differ only in what the forward pass reads, and the model still sees how much
    was hidden. `<|hidden|>` is appended to the run's tokenizer and banned when sampling."""
    banned_tokens = [HIDDEN]
    hides_segments = True

    def hide_segment(self, score: float) -> bool:
        return bool(self.flagged(np.float64(score)))

    def stream_settings(self) -> dict:
        return {"documents": "all", "prefixes": None, "hidden": {"threshold": self.threshold}}


@registered("tagging")
class Tagging(Objective):
    """Conditional training with one control token, an ablation of the paper's: `<|misaligned|>` before each
    segment scoring above the threshold, nothing before the others (nor before an unscorable one). Deployed with
    no prefix and `<|misaligned|>` banned, so whatever the model learned about the tag, it never writes it and never
    reads it; whether `<|aligned|>` is needed at all is what it tests. Default threshold: conditional training's.
    The conditioning check compares its share of tagged segments with the corpus' misaligned share."""
    banned_tokens = [MISALIGNED]
    tags_segments = True

    def segment_prefix(self, score: float, rng: np.random.Generator) -> str | None:
        assert self.threshold is not None, "call fit() first"
        return MISALIGNED if score > self.threshold else None  # NaN compares False: an unscorable segment is bare

    def stream_settings(self) -> dict:
        return {"documents": "all", "prefixes": {"threshold": self.threshold, "tags": [MISALIGNED]}}


def get_objective(cfg: ObjectiveConfig, task: Task) -> Objective:
    """The objective named in the config, with the task's defaults (`Task.defaults_for`) for fields left at None."""
    try:
        cls = OBJECTIVES[cfg.name]
    except KeyError:
        raise PhfError(f"unknown objective {cfg.name!r}; choose one of {', '.join(OBJECTIVES)}") from None
    return cls(cfg, task.defaults_for(cfg.name))
