"""The recipes' settings, one frozen config per recipe (`phf demo`, `phf sweep`, `phf scaling`), as a trainer
takes its arguments: every field documented once here, with its default, and checked when the config is made
(a bad value is one line naming the flag and what it accepts). The command line builds these from its flags and
takes its defaults from them; Python code builds them directly:

    run_sweep(SweepConfig(task="pii", finetune=("conditional",), seeds=3))

This module imports nothing heavy, so that the command line reads the defaults before torch is loaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from phf.core.errors import PhfError

HEAD_WIDTH = 32  # a scaling size's n_head = n_embd / 32: the default model's 4 heads of 128


def _freeze(cfg, *names: str) -> None:
    """Lists given for sequence fields stored as tuples (a frozen config is not changed through them)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, tuple):
            object.__setattr__(cfg, name, tuple(value))


def _as_path(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(cfg, name, Path(value))


def _check_seeds(seeds: int) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PhfError(f"--seeds must be at least 1, got {seeds}")


@dataclass(frozen=True)
class DemoConfig:
    """`phf demo`: one model per arm on the same token budget, each sampled and evaluated, and a table."""

    task: str = "pep8"
    """A shipped task (pep8, pii, toxicity) whose configs the arms start from; with `config`, the file's task."""
    out: Path = Path("runs/demo")
    """The demo's folder: DIR/<arm> per arm (DIR/seed-<seed>/<arm> with several seeds) and DIR/results.json."""
    overrides: tuple[str, ...] = ()
    """`KEY=VALUE` settings applied to every arm's run config (`--set`), e.g. `train.max_tokens=500000`."""
    objectives: tuple[str, ...] | None = None
    """The arms: objectives or named variants of one (`conditional-cooldown`); None: the task's demo arms."""
    config: Path | None = None
    """A run config file of your own for every arm instead of the task's shipped ones (or a preset's file)."""
    init_from: Path | None = None
    """A Hugging Face causal-LM folder every arm is finetuned from, with its own tokenizer; None: from scratch."""
    seeds: int = 1
    """Train and sample every arm this many times (train.seed and sample.seed + 0, 1, ...); results carry the mean
    over seeds with 95% intervals. One seed's intervals cover the sampling only."""
    data_dir: Path | None = None
    """Where the scored corpus, tokenizer and token streams are kept; None: DIR/data."""

    def __post_init__(self) -> None:
        _freeze(self, "overrides", "objectives")
        _as_path(self, "out", "config", "init_from", "data_dir")
        _check_seeds(self.seeds)
        if self.objectives is not None and not self.objectives:
            raise PhfError("--objectives names no arm; give at least one (e.g. mle,conditional)")


@dataclass(frozen=True)
class SweepConfig:
    """`phf sweep`: every objective of a task on one budget, from the start and as a late finetune (and RL, and
    the tamper probe, when asked), each measured against MLE; a table and a report."""

    task: str = "pep8"
    """A shipped task (pep8, pii, toxicity) whose configs the arms start from; with `config`, the file's task."""
    out: Path = Path("runs/sweep")
    """The sweep's folder: DIR/<arm> per arm (DIR/seed-<seed>/<arm> with several seeds) and DIR/results.json."""
    overrides: tuple[str, ...] = ()
    """`KEY=VALUE` settings applied to every arm's run config after the sweep's own (`--set`, except `rl.*`)."""
    objectives: tuple[str, ...] | None = None
    """The pretraining arms; mle is required (the KL reference, and the base of the finetune arms). None: the
    objectives the registry marks for the sweep."""
    finetune: tuple[str, ...] | None = None
    """The objectives of the finetune arms (`finetune:<objective>`); () for none, None: those the registry marks."""
    finetune_fraction: float = 0.5
    """Share of the budget the finetune arms train with feedback, after the MLE run's first (1 - f)."""
    report: bool = True
    """Write DIR/report.html."""
    rl: bool = False
    """Add RL arms: GRPO from the MLE weights the finetune arms start from, and from each of `rl_bases`' weights at
    the same step (needs the `rl` extra)."""
    rl_tokens: int = 60_000
    """Prompt + completion tokens of each RL arm."""
    rl_overrides: tuple[str, ...] = ()
    """`rl.KEY=VALUE` settings of the RL arms (phf.analysis.rl.RLConfig)."""
    config: Path | None = None
    """A run config file of your own for every arm instead of the task's shipped ones."""
    seeds: int = 1
    """Run the whole sweep this many times (DIR/seed-<seed>/, one data folder); results carry the mean over seeds
    with 95% intervals."""
    data_dir: Path | None = None
    """Where the scored corpus, tokenizer and token streams are kept; None: DIR/data."""
    rl_bases: tuple[str, ...] | None = None
    """Pretraining arms RL starts from (mle is always one); None: mle and conditional where the sweep has them."""
    tamper: dict | None = None
    """Run the tamper probe on every arm with these settings of phf.analysis.tamper.TamperConfig ({}: its
    defaults; e.g. {"lr": "1e-4,1e-3", "lora": True} for a grid of attacks); None: not."""

    def __post_init__(self) -> None:
        _freeze(self, "overrides", "objectives", "finetune", "rl_overrides", "rl_bases")
        _as_path(self, "out", "config", "data_dir")
        _check_seeds(self.seeds)
        if self.objectives is not None and "mle" not in self.objectives:
            raise PhfError("a sweep needs the mle arm: it is the KL reference and the base of the finetune arms")
        if not 0 < self.finetune_fraction < 1:
            raise PhfError(f"--finetune-fraction must be between 0 and 1 (exclusive), got {self.finetune_fraction}")
        if "mle" in (self.finetune or ()):
            raise PhfError("finetune:mle is the mle arm itself; name feedback objectives after --finetune")
        if self.rl and (isinstance(self.rl_tokens, bool) or not isinstance(self.rl_tokens, int) or self.rl_tokens < 1):
            raise PhfError(f"--rl-tokens must be a positive number of tokens, got {self.rl_tokens}")
        wrong = [o for o in self.rl_overrides if not o.startswith("rl.")]
        if wrong:
            raise PhfError(f"not an rl setting: {wrong[0]!r}; rl settings are rl.KEY=VALUE")
        if self.tamper is not None and not isinstance(self.tamper, dict):
            raise PhfError(f"tamper must be a dict of tamper-probe settings ({{}} for its defaults) or None, got "
                           f"{type(self.tamper).__name__}")


def parse_size(text: str) -> tuple[int, int]:
    """`LxE` -> (layers, width)."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < HEAD_WIDTH or int(m.group(2)) % HEAD_WIDTH:
        raise PhfError(f"--sizes: {text!r} is not LAYERSxWIDTH with a width a multiple of {HEAD_WIDTH} "
                       f"(e.g. 2x64, 4x128)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class ScalingConfig:
    """`phf scaling`: an objective's misalignment ratio to MLE over a grid of token budgets and model sizes, each
    point a demo of MLE and the objective with `seeds` seeds."""

    tokens: tuple[int, ...]
    """The grid's token budgets (kept sorted, without repeats), e.g. (350000, 700000, 1400000)."""
    task: str = "toxicity"
    """A shipped task (pep8, pii, toxicity)."""
    out: Path = Path("runs/scaling")
    """The grid's folder: DIR/<size>-<tokens> per point (a demo folder), DIR/results.json and DIR/scaling.png."""
    sizes: tuple[str, ...] = ("4x128",)
    """Model sizes as LAYERSxWIDTH (n_head = width / 32)."""
    seeds: int = 3
    """Seeds per grid point."""
    objective: str = "conditional"
    """The feedback objective compared with MLE."""
    overrides: tuple[str, ...] = ()
    """`KEY=VALUE` settings applied to every run's config (`--set`)."""

    def __post_init__(self) -> None:
        _freeze(self, "sizes", "overrides")
        _as_path(self, "out")
        try:
            tokens = tuple(sorted({int(t) for t in self.tokens}))
        except (TypeError, ValueError):
            raise PhfError(f"--tokens must be token budgets (e.g. 350000,700000), got {self.tokens}") from None
        object.__setattr__(self, "tokens", tokens)
        if not tokens or tokens[0] < 1:
            raise PhfError(f"--tokens must be positive token budgets, got {list(tokens)}")
        if self.objective == "mle":
            raise PhfError("--objective is compared with mle: give a feedback objective (e.g. conditional)")
        _check_seeds(self.seeds)
        for size in self.sizes:
            parse_size(size)
