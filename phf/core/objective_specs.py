"""The objective registry: one record per training objective, everything about it except its code.

An `ObjectiveSpec` says what an objective is called, which config fields it reads, the values they take when
left unset, whether the sweep's pretraining and finetune arms include it, its colour in the report and one line
about it. Config validation, the tasks' shipped run configs,
the sweep's default arms, the report's colours and the CLI's help all read this table; the class that trains
the objective (phf.training.objectives) binds itself to its record with `@registered(name)`.

The records are plain data in the lowest layer because the layers below training need them: a config is
validated (core), a task's run config is written from the defaults (tasks) and the CLI lists the objectives
without importing torch. A shipped task's own values (the paper's, per task) stay in the task's home
(`Task.objective_defaults`, phf/tasks/<task>/), which `Task.defaults_for` lays over the record's. Adding an
objective: its record here, its class in phf/training/objectives.py, a test and a line in the docs
(docs/architecture.md, "Adding an objective").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from phf.core.errors import PhfError

MISALIGNED_ABOVE = "misaligned_above"
"""A default that is the task's own misalignment threshold (`scoring.misaligned_above`)."""


@dataclass(frozen=True)
class Quantile:
    """A threshold set to quantile `q` of the training split's document scores (resolved when the objective is
    fitted to the scored corpus)."""
    q: float


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    """The objective's name in configs (`objective.name`), results and the CLI."""
    summary: str
    """One line: what the objective does (the CLI's help and docs)."""
    fields: tuple[str, ...] = ()
    """The `objective.*` config fields it reads besides `name` and `check_conditioning`."""
    defaults: Mapping[str, object] = field(default_factory=dict)
    """The values of its fields left at None on a task of your own: a number, a `Quantile` of the training document
    scores, or `MISALIGNED_ABOVE`. A shipped task replaces some with the paper's (its `objective_defaults`)."""
    defaults_of: str | None = None
    """Another objective whose task defaults this one takes (masking takes conditional training's threshold)."""
    sweep: bool = False
    """Whether `phf sweep` trains it from scratch by default (a new objective joins the default sweep only when its
    record says so)."""
    finetune: bool = False
    """Whether `phf sweep` also finetunes the MLE run with it by default."""
    color: str = "#7f7f7f"
    """Its colour in the report's figures."""


def _register(*specs: ObjectiveSpec) -> dict[str, ObjectiveSpec]:
    return {s.name: s for s in specs}


_THRESHOLD = ("threshold", "threshold_quantile")

# The defaults here are those of a task of your own; a shipped task's `objective_defaults` (phf/tasks/<task>/)
# replaces the ones the paper set otherwise for it.
OBJECTIVE_SPECS: dict[str, ObjectiveSpec] = _register(
    ObjectiveSpec(
        name="mle", summary="maximum likelihood: next-token cross-entropy on every token",
        sweep=True, color="#444444"),
    ObjectiveSpec(
        name="filtering", summary="MLE on the documents scoring at most a threshold; the others are dropped",
        fields=_THRESHOLD, sweep=True, finetune=True, color="#1f77b4",
        defaults={"threshold": Quantile(0.5)}),  # keep the better half: the median training document score
    ObjectiveSpec(
        name="conditional",
        summary="<|aligned|> or <|misaligned|> before each segment; deployed conditioned on <|aligned|>",
        fields=_THRESHOLD + ("drop_token_fraction", "control_embedding", "cooldown_fraction"),
        sweep=True, finetune=True, color="#2ca02c",
        defaults={"threshold": MISALIGNED_ABOVE, "drop_token_fraction": 0.01}),  # the paper's prose drop
    ObjectiveSpec(
        name="unlikelihood",
        summary="-alpha log(1 - p) on the tokens of segments above a threshold, -log p on the others",
        fields=_THRESHOLD + ("alpha",), sweep=True, color="#d62728",
        defaults={"threshold": MISALIGNED_ABOVE, "alpha": 1.0}),  # the paper's prose alpha
    ObjectiveSpec(
        name="rwr", summary="reward-weighted regression: each token's cross-entropy weighted by exp(-score / beta)",
        fields=("beta", "max_weight"), sweep=True, finetune=True, color="#9467bd",
        defaults={"beta": 10.0}),  # the paper's, for every task
    ObjectiveSpec(
        name="awr", summary="advantage-weighted regression, with a value head on the last hidden state",
        fields=("alpha", "beta", "max_weight"), sweep=True, finetune=True, color="#ff7f0e",
        defaults={"alpha": 0.5, "beta": 1.0}),  # the paper's prose alpha
    # The default sweep finetunes with neither masking objective (`--finetune masking,masking-hidden` adds them)
    # nor unlikelihood (at PEP8's alpha 0.01 its pretraining arm is indistinguishable from MLE): it keeps the
    # default sweep within 30 minutes on 2 cores.
    ObjectiveSpec(
        name="masking", summary="flagged segments stay in the context but bear no loss (Rathi & Radford 2026)",
        fields=_THRESHOLD, defaults_of="conditional", sweep=True, color="#393b79"),
    ObjectiveSpec(
        name="masking-hidden", summary="masking, each flagged token read as <|hidden|> (Rathi & Radford 2026)",
        fields=_THRESHOLD, defaults_of="conditional", sweep=True, color="#9c9ede"),
    ObjectiveSpec(
        name="tagging", summary="<|misaligned|> before the segments above a threshold only; deployed with it banned",
        fields=_THRESHOLD, defaults_of="conditional", color="#8c6d31"),
)

OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVE_SPECS)


def spec_of(name: str) -> ObjectiveSpec:
    """The record of objective `name`, or one line naming the choices."""
    try:
        return OBJECTIVE_SPECS[name]
    except KeyError:
        raise PhfError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVE_NAMES)}") from None


def sweep_objectives() -> list[str]:
    """The pretraining arms of the default sweep, in registry order."""
    return [s.name for s in OBJECTIVE_SPECS.values() if s.sweep]


def finetune_objectives() -> list[str]:
    """The finetune arms of the default sweep, in registry order."""
    return [s.name for s in OBJECTIVE_SPECS.values() if s.finetune]


@dataclass(frozen=True)
class ArmVariant:
    """An arm that is an objective with some of its fields set otherwise, named so that it can stand beside the
    plain objective in one demo or sweep (`--objectives conditional,conditional-cooldown`)."""
    name: str
    objective: str
    """The objective it trains (`objective.name`)."""
    settings: Mapping[str, object]
    """The `objective.*` fields it sets, over the task's defaults for that objective."""
    summary: str
    color: str = "#7f7f7f"


ARM_VARIANTS: dict[str, ArmVariant] = {v.name: v for v in (
    ArmVariant(
        name="conditional-cooldown", objective="conditional", settings={"cooldown_fraction": 0.1},
        summary="conditional training whose last 10% of steps read no control tokens (MeCo's cooldown); evaluated "
                "conditioned and unconditioned", color="#98df8a"),
)}

ARM_NAMES: tuple[str, ...] = OBJECTIVE_NAMES + tuple(ARM_VARIANTS)


def arm_objective(arm: str) -> tuple[str, dict]:
    """The objective an arm trains and the `objective.*` fields it sets: (`arm`, {}) for an objective, the
    variant's for a named variant, or one line naming the choices."""
    if arm in OBJECTIVE_SPECS:
        return arm, {}
    if arm in ARM_VARIANTS:
        return ARM_VARIANTS[arm].objective, dict(ARM_VARIANTS[arm].settings)
    raise PhfError(f"unknown arm {arm!r}; name an objective ({', '.join(OBJECTIVE_NAMES)}) or a variant "
                   f"({', '.join(ARM_VARIANTS)})")


def arm_color(arm: str) -> str | None:
    """An arm's colour in the report: its objective's record's, or its variant's."""
    if arm in OBJECTIVE_SPECS:
        return OBJECTIVE_SPECS[arm].color
    return ARM_VARIANTS[arm].color if arm in ARM_VARIANTS else None
