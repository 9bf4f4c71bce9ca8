"""What a task is: everything that varies with the preference being taught, in one object.

A task names its scorer and how its text is cut into segments, says when a sample counts as misaligned, where its
prompts come from, which objective settings the paper used for it, how the report labels its scores, and which
shipped configs start its runs. Code outside `phf.tasks` asks the task; it never compares task names.

A task of your own is a config, not code (`UserTask`): a corpus, a scorer (`module:callable`), a segmenter, a
threshold (`scoring.misaligned_above`), an aggregate (mean or max) and optionally a prompts file (`sample.prompts`,
jsonl with a `prompt` field).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterable, Mapping

from phf.core.config import Quantile, RunConfig
from phf.core.errors import PhfError
from phf.tasks.prompts import installed_texts

# (argument after "name:", the corpus' skip counter) -> [(document id, text or file path)]
SourceLister = Callable[..., list]
PromptBuilder = Callable[[Iterable[str], int], list[str]]


@dataclass(frozen=True)
class Task:
    name: str
    scorer: str = ""
    """The registered scorer (`scoring.scorer`'s value in the shipped configs)."""
    segmenter: str = "lines"
    """How text is cut into segments where no scorer is at hand: `lines` or `sentences`."""
    misaligned_above: float = 0.0
    """A sample (or document) scoring above this is misaligned (`misaligned_share`, the report's flagged spans)."""
    code: bool = False
    """Samples are Python code: evaluation reports the share that parses."""
    objective_defaults: Mapping[str, Mapping] = field(default_factory=dict)
    """Per objective, the values of the config fields left at None (a `Quantile` waits for the training scores)."""
    demo_objectives: tuple[str, ...] = ("mle", "filtering", "conditional")
    misalignment_label: str = "misalignment score"
    """The report's axis label for a score."""
    score_scale: str = "log"
    """The report's scale for scores: `log` for rates spanning orders of magnitude, `linear` for probabilities."""
    corpus_sources: Mapping[str, SourceLister] = field(default_factory=dict)
    """Named corpus sources this task brings (`corpus.source: NAME` or `NAME:ARGUMENT`)."""
    prompt_builder: PromptBuilder | None = None
    """Texts -> prompts of the prompted scenario (held-out texts for evaluation, training texts for RL)."""
    prompts_file: str = ""
    """A jsonl file of prompts (`{"prompt": ...}` per line) that replaces the prompt builder."""
    elsewhere: str = ""
    """Where the prompts of the out-of-distribution scenario come from (`prompted_elsewhere`): text of another
    origin than the corpus, read offline from the installed packages (`code`: their Python files; `metadata`: their
    METADATA files; `descriptions`: only the prose of those), cut into prompts by the prompt builder. "" = no such
    scenario."""
    fixed_window_chars: int = 200
    """Evaluation also scores the first this many characters (whole segments) of every sample that long, so that
    models writing samples of different lengths compare on the same amount of text."""
    short_sample_chars: int = 100
    """Samples shorter than this count as short (the `short_share` of the length distribution)."""
    judge: str = ""
    """The held-out judge of its samples (`eval.judge`'s default): a scorer of the same preference that training
    never saw (phf.data.scorers.judges)."""
    config_package: str = ""
    """The package whose `configs/` folder holds the shipped configs (`<objective>.yaml`)."""

    def defaults_for(self, objective: str) -> dict:
        return dict(self.objective_defaults.get(objective, {}))

    def replace(self, **changes) -> "Task":
        return dataclasses.replace(self, **changes)

    # -- prompts ---------------------------------------------------------------------------------------------------
    def eval_prompts(self, scored, limit: int) -> list[str]:
        """The prompted scenario's prompts, built from the held-out test documents (or read from the prompts file)."""
        if self.prompts_file:
            return read_prompts(self.prompts_file, limit)
        if self.prompt_builder is None:
            return []
        return self.prompt_builder((d.text for d in scored.documents("test")), limit)

    def elsewhere_prompts(self, limit: int) -> list[str]:
        """Prompts of the out-of-distribution scenario: the prompt builder over text the model never trained on,
        of another origin than its corpus (`elsewhere`)."""
        if not self.elsewhere or self.prompt_builder is None or not limit:
            return []
        return list(_elsewhere_prompts(self.prompt_builder, self.elsewhere, limit))

    def training_prompts(self, scored, limit: int) -> list[str]:
        """Prompts from the training split (RL trains on them, so the held-out prompts stay unseen)."""
        if self.prompts_file:
            return read_prompts(self.prompts_file, limit)
        if self.prompt_builder is None or not limit:
            return []
        return self.prompt_builder((d.text for d in scored.documents("train")), limit)

    # -- shipped configs -------------------------------------------------------------------------------------------
    def config_dir(self) -> Path | None:
        if not self.config_package:
            return None
        return Path(str(files(self.config_package) / "configs"))

    def config_path(self, objective: str) -> Path:
        folder = self.config_dir()
        if folder is None:
            raise PhfError(f"task {self.name!r} ships no configs; give your own with --config FILE")
        path = folder / f"{objective}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")
            raise PhfError(f"task {self.name} has no shipped config for {objective!r}; it has: {', '.join(shipped)}")
        return path


@functools.lru_cache(maxsize=8)
def _elsewhere_prompts(builder: PromptBuilder, kind: str, limit: int) -> tuple[str, ...]:
    """Built once per process: every arm of a demo evaluates the same prompts (parsing 400 files takes seconds)."""
    return tuple(builder(installed_texts(kind), limit))


def user_objective_defaults(misaligned_above: float) -> dict[str, dict]:
    """Defaults for a task of your own: the misalignment threshold you gave labels segments (conditional,
    unlikelihood); filtering keeps the better half of the documents; the remaining values are the paper's for its
    prose tasks (drop fraction 0.01, unlikelihood alpha 1, RWR beta 10, AWR alpha 0.5) and AWR beta 1."""
    return {
        "filtering": {"threshold": Quantile(0.5)},
        "conditional": {"threshold": misaligned_above, "drop_token_fraction": 0.01},
        "unlikelihood": {"threshold": misaligned_above, "alpha": 1.0},
        "rwr": {"beta": 10.0},
        "awr": {"alpha": 0.5, "beta": 1.0},
    }


def user_task(name: str, misaligned_above: float = 0.0, segmenter: str = "lines", aggregate: str = "mean") -> Task:
    """A task defined by its config alone."""
    return Task(name=name, segmenter=segmenter or "lines", misaligned_above=misaligned_above,
                objective_defaults=user_objective_defaults(misaligned_above),
                score_scale="linear" if aggregate == "max" else "log")


def read_prompts(path: str | Path, limit: int) -> list[str]:
    """Up to `limit` prompts from a jsonl file with a string `prompt` field per line."""
    path = Path(path).expanduser()
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PhfError(f"prompts file {path} does not exist; set sample.prompts to a jsonl file with a `prompt` "
                       f"field per line, or leave it empty") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PhfError(f"cannot read prompts file {path} ({exc}); it must be UTF-8 jsonl") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PhfError(f"{path}:{lineno} is not JSON; each line must be an object like "
                           f'{{"prompt": "def area(r):"}}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise PhfError(f"{path}:{lineno} has no string `prompt` field")
        prompts.append(rec["prompt"])
        if len(prompts) >= limit:
            break
    if not prompts and limit:
        raise PhfError(f"prompts file {path} holds no prompt")
    return prompts


def configured(task: Task, cfg: RunConfig) -> Task:
    """The task as a run's config refines it (its own threshold, segmenter or prompts file)."""
    changes = {}
    if cfg.scoring.misaligned_above is not None:
        changes["misaligned_above"] = cfg.scoring.misaligned_above
    if cfg.scoring.segmenter:
        changes["segmenter"] = cfg.scoring.segmenter
    if cfg.sample.prompts:
        changes["prompts_file"] = cfg.sample.prompts
    return task.replace(**changes) if changes else task
