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

from phf.core.config import Quantile, RunConfig, config_from_dict, load_config, read_yaml_dict
from phf.core.errors import PhfError
from phf.core.objective_specs import ARM_NAMES, MISALIGNED_ABOVE, arm_objective, spec_of
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
    """Per objective, the paper's values for this task of the config fields left at None, where they differ from
    the objective's own defaults (phf.core.objective_specs; a `Quantile` waits for the training scores)."""
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
    """The package whose `configs/` folder holds the shipped configs: `base.yaml`, and `<name>.yaml` where a config
    says more than an objective's defaults (toxicity's conditional training) or is a setup of its own (paper-124m)."""

    def defaults_for(self, objective: str) -> dict:
        """The values objective `objective` takes for its fields left at None: its record's defaults with this
        task's own laid over them (both those of `defaults_of` where the record names one)."""
        spec = spec_of(objective)
        source = spec.defaults_of or objective
        merged = {**spec_of(source).defaults, **self.objective_defaults.get(source, {})}
        return {k: self.misaligned_above if v == MISALIGNED_ABOVE else v for k, v in merged.items()
                if k in spec.fields}

    def objective_section(self, objective: str) -> dict:
        """A run config's `objective:` section for this task: the name and every default written out (a
        `Quantile` as `threshold_quantile`), so that the config shows each value the run takes."""
        section = {"name": objective}
        for key, value in self.defaults_for(objective).items():
            if isinstance(value, Quantile):
                section[f"{key}_quantile"] = value.q
            else:
                section[key] = value
        return section

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

    def config_path(self, name: str) -> Path:
        """A shipped config file (`base`, `paper-124m`, ...); `run_config` also knows every objective."""
        folder = self.config_dir()
        if folder is None:
            raise PhfError(f"task {self.name!r} ships no configs; give your own with --config FILE")
        path = folder / f"{name}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in folder.glob("*.yaml"))
            raise PhfError(f"task {self.name} has no shipped config {name!r}; it has: {', '.join(shipped)}")
        return path

    def run_config(self, name: str = "mle", overrides: list[str] | None = None) -> RunConfig:
        """The task's run config `name`: its shipped file where there is one (`configs/<name>.yaml`), else for an
        objective or an arm variant (phf.core.objective_specs) the task's `base.yaml` with that objective's
        defaults for the task written in, and the variant's settings over them (over the shipped file of the variant's
        objective, where there is one); then `overrides`."""
        folder = self.config_dir()
        if folder is not None and (folder / f"{name}.yaml").exists():
            return load_config(folder / f"{name}.yaml", overrides)
        if name not in ARM_NAMES:
            shipped = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base") if folder else []
            raise PhfError(f"task {self.name} has no config {name!r}; name an objective or a variant "
                           f"({', '.join(ARM_NAMES)}) or a shipped config ({', '.join(shipped) or 'none'})")
        objective, settings = arm_objective(name)
        if folder is not None and (folder / f"{objective}.yaml").exists():  # a variant of a shipped objective config
            written = [f"objective.{k}={v}" for k, v in settings.items()]
            return load_config(folder / f"{objective}.yaml", written + list(overrides or []))
        data = read_yaml_dict(self.config_path("base"))
        data["objective"] = {**(data.get("objective") or {}), **self.objective_section(objective), **settings}
        return config_from_dict(data, overrides)


@functools.lru_cache(maxsize=8)
def _elsewhere_prompts(builder: PromptBuilder, kind: str, limit: int) -> tuple[str, ...]:
    """Built once per process: every arm of a demo evaluates the same prompts (parsing 400 files takes seconds)."""
    return tuple(builder(installed_texts(kind), limit))


def user_task(name: str, misaligned_above: float = 0.0, segmenter: str = "lines", aggregate: str = "mean") -> Task:
    """A task defined by its config alone."""
    return Task(name=name, segmenter=segmenter or "lines", misaligned_above=misaligned_above,
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
