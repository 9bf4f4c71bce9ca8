"""The run-folder format: what `phf demo`, `phf sweep` and `phf scaling` write, in one place.

    DIR/results.json                  the folder's results: "format_version", "task", "seeds", "objectives" (arm ->
                                      its entry), ...
    DIR/<arm>/                        an arm's run folder with one seed (`finetune-conditional` for the arm
                                      `finetune:conditional`)
    DIR/seed-<seed>/<arm>/            an arm's run folder for one seed of several
    <run>/checkpoint/                 the trained model (a Hugging Face folder)
    <run>/run.json, config.yaml, metrics.jsonl, samples.jsonl, results.json   the run's record, config, training
                                      metrics, samples and its own results (the arm's entry before seeds are combined)

Every results.json a recipe writes carries `format_version`; a folder written before the key existed reads as
version 1. The records below hold the fields readers use; every other field travels in `raw`, so a record read
and written again gives the same JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from phf.core.errors import PhfError
from phf.core.io import read_json, write_json

FORMAT_VERSION = 1  # raise it when a reader can no longer read what an older writer wrote
VERSION_KEY = "format_version"
RESULTS_JSON = "results.json"
CHECKPOINT_DIR = "checkpoint"
RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
SAMPLES_JSONL = "samples.jsonl"
SEED_PREFIX = "seed-"
REFERENCE_ARM = "mle"  # the arm every ratio is taken to, and the sweep's KL reference


def arm_folder_name(arm: str) -> str:
    """The run folder's name of an arm: `finetune:conditional` -> `finetune-conditional`."""
    return arm.replace(":", "-")


def seed_folder_name(seed: int) -> str:
    return f"{SEED_PREFIX}{seed}"


def results_path(folder: str | Path) -> Path:
    return Path(folder) / RESULTS_JSON


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The trained model of a run folder."""
    return Path(run_dir) / CHECKPOINT_DIR


def samples_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / SAMPLES_JSONL


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_JSONL


def run_json_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_JSON


def recorded_path(run_dir: str | Path, key: str) -> Path | None:
    """A path a run recorded in its run.json (`scored_corpus`, `tokenizer`, `data_dir`), found from anywhere: as
    recorded, else, for a relative path (recorded from the folder training ran in), under the nearest folder above
    the run that holds it. None when the run recorded none or it is gone."""
    file = run_json_file(run_dir)
    recorded = read_json(file).get(key) if file.exists() else None
    if not recorded:
        return None
    path = Path(recorded)
    if path.exists() or path.is_absolute():
        return path if path.exists() else None
    return next((a / path for a in Path(run_dir).resolve().parents if (a / path).exists()), None)


def run_dir_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to: `runs/demo/conditional/checkpoint` -> `runs/demo/conditional`;
    any other model folder is its own."""
    p = Path(checkpoint)
    return p.parent if p.name == CHECKPOINT_DIR else p


# -- reading and writing results.json ------------------------------------------------------------------------------
def write_results(folder: str | Path, data: dict | Results) -> Path:
    """Write `folder/results.json` atomically, `format_version` first; `data` itself is left as it is."""
    content = data.to_dict() if isinstance(data, Results) else data
    path = results_path(folder)
    write_json(path, {VERSION_KEY: FORMAT_VERSION, **{k: v for k, v in content.items() if k != VERSION_KEY}})
    return path


def read_results_dict(folder: str | Path) -> dict:
    """`folder/results.json` as written, less its `format_version`; one line naming the fix for a missing file,
    a damaged one or one written by a newer phf."""
    path = results_path(folder)
    if not path.exists():
        raise PhfError(f"{path} not found; give a folder written by `phf demo`, `phf sweep` or `phf scaling`, or "
                       f"run the recipe into {Path(folder)} again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PhfError(f"{path} is not valid JSON ({exc}); delete it and run the recipe into {Path(folder)} "
                       f"again") from exc
    if not isinstance(data, dict):
        raise PhfError(f"{path} is not a results file (a JSON object); run the recipe into {Path(folder)} again")
    version = data.pop(VERSION_KEY, 1)  # written before the key existed: version 1
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise PhfError(f"{path} has format_version {version!r}, newer than this phf reads ({FORMAT_VERSION}); "
                       f"upgrade phf to read it")
    return data


def read_results(folder: str | Path) -> Results:
    """A demo or sweep folder's results.json as typed records (see `read_results_dict` for its errors)."""
    data = read_results_dict(folder)
    if not isinstance(data.get("objectives"), dict) or not data["objectives"]:
        raise PhfError(f"{results_path(folder)} has no objectives; run `phf demo` or `phf sweep` into "
                       f"{Path(folder)} again")
    return Results.from_dict(data)


# -- the records ------------------------------------------------------------------------------------------------
def _merged(raw: dict, typed: dict) -> dict:
    """`raw` with the typed fields written back in their places; a typed field absent from `raw` is added only
    when it has a value, so a record read and written again keeps its keys and their order."""
    out = dict(raw)
    for key, value in typed.items():
        if key in out or value is not None:
            out[key] = value
    return out


@dataclass
class ArmResult:
    """One arm's entry in results.json: an objective trained (and sampled) with one or more seeds."""
    name: str  # the key in "objectives": "conditional", "finetune:conditional", "rl:conditional"
    run_dir: str | None = None  # its run folder relative to the results folder (the first seed's with several)
    kind: str | None = None  # a sweep's "pretrain", "finetune" or "rl"
    misalignment_mean: float | None = None  # mean score of the unconditional samples (over seeds)
    misalignment_mean_ci95: list[float] | None = None
    misalignment_ratio_to_mle: float | None = None
    misalignment_ratio_ci95: list[float] | None = None
    misalignment_p_vs_mle: float | None = None  # Mann-Whitney of the sample scores against MLE's
    heldout_bits_per_char: float | None = None
    heldout_bits_per_char_ci95: list[float] | None = None
    heldout_ratio_to_mle: float | None = None
    heldout_ratio_ci95: list[float] | None = None
    kl_from_reference_bits: float | None = None  # a sweep's KL(mle || arm) in bits per character
    judge: dict | None = None  # the held-out judge's block (its misalignment, ratios and intervals)
    train_seconds: float | None = None
    seeds: list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the whole entry as written

    TYPED = ("run_dir", "kind", "misalignment_mean", "misalignment_mean_ci95", "misalignment_ratio_to_mle",
             "misalignment_ratio_ci95", "misalignment_p_vs_mle", "heldout_bits_per_char",
             "heldout_bits_per_char_ci95", "heldout_ratio_to_mle", "heldout_ratio_ci95", "kl_from_reference_bits",
             "judge", "train_seconds", "seeds")

    @classmethod
    def from_dict(cls, name: str, entry: dict) -> ArmResult:
        return cls(name, **{k: entry.get(k) for k in cls.TYPED}, raw=dict(entry))

    def to_dict(self) -> dict:
        return _merged(self.raw, {k: getattr(self, k) for k in self.TYPED})

    def run_folder(self, root: str | Path) -> Path:
        """Its run folder under the results folder `root` (the first seed's with several)."""
        return Path(root) / (self.run_dir or arm_folder_name(self.name))


@dataclass
class Results:
    """A demo's or sweep's results.json: its task, seeds and arms; every other field in `raw`."""
    task: str | None  # None in files written before the task was recorded (they are pep8's)
    arms: dict[str, ArmResult]  # "objectives" in the file
    seeds: list[int] = field(default_factory=list)  # [] in files written before seeds were recorded
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict) -> Results:
        arms = {name: ArmResult.from_dict(name, entry) for name, entry in data.get("objectives", {}).items()}
        return cls(data.get("task"), arms, list(data.get("seeds") or []), raw=dict(data))

    def to_dict(self) -> dict:
        typed = {"task": self.task, "objectives": {n: a.to_dict() for n, a in self.arms.items()},
                 "seeds": self.seeds or self.raw.get("seeds")}
        return _merged({k: v for k, v in self.raw.items() if k != VERSION_KEY}, typed)

    @property
    def reference(self) -> ArmResult | None:
        return self.arms.get(REFERENCE_ARM)


@dataclass(frozen=True)
class RunFolder:
    """A demo, sweep or scaling output folder and where its parts live."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))  # a str given is kept as a Path

    @property
    def results_path(self) -> Path:
        return results_path(self.path)

    def seed_dir(self, seed: int | None) -> Path:
        """DIR for a single-seed run (`seed` None), DIR/seed-<seed> for one seed of several."""
        return self.path if seed is None else self.path / seed_folder_name(seed)

    def replicate_dir(self, seed: int, seeds: list[int] | int) -> Path:
        """The folder of one replicate: DIR with one seed, DIR/seed-<seed> with several."""
        several = (seeds if isinstance(seeds, int) else len(seeds)) > 1
        return self.seed_dir(seed if several else None)

    def arm_dir(self, arm: str, seed: int | None = None) -> Path:
        """An arm's run folder: DIR/<arm> (seed None), DIR/seed-<seed>/<arm>."""
        return self.seed_dir(seed) / arm_folder_name(arm)

    def checkpoint(self, arm: str, seed: int | None = None) -> Path:
        return checkpoint_dir(self.arm_dir(arm, seed))

    def seed_dirs(self) -> list[Path]:
        """The DIR/seed-<seed> folders present, by name."""
        return sorted(self.path.glob(f"{SEED_PREFIX}*"), key=lambda p: p.name)

    def replicate_roots(self) -> list[Path]:
        """The folders holding one replicate's arms: each seed folder present, else DIR itself."""
        return self.seed_dirs() or [self.path]

    def replicate_run_dirs(self, results: Results) -> list[tuple[int | None, dict[str, Path]]]:
        """(seed, arm -> run folder) of each replicate in `results` (seed None in files without seeds)."""
        seeds = results.seeds or [None]
        return [(seed, {name: self.replicate_dir(seed, seeds) / Path(a.run_dir or arm_folder_name(name)).name
                        for name, a in results.arms.items()}) for seed in seeds]

    def read(self) -> Results:
        return read_results(self.path)

    def write(self, data: dict | Results) -> Path:
        return write_results(self.path, data)


def sibling_run(run_dir: str | Path, arm: str) -> Path:
    """The run folder of another arm of the same replicate: `runs/X/conditional` -> `runs/X/mle`."""
    return Path(run_dir).parent / arm_folder_name(arm)

