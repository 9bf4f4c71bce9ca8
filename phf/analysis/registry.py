"""The probes and the report's studies: one record each, declared by the module that implements it.

A probe module of phf.analysis declares its `phf probe NAME` at import time with `register(Probe(...))`: its name
and help line, its config class, the function that runs it, what the terminal shows of its results and, when the
report shows it, its `Study` (where its results lie in a result folder, its caption, table and figure). The config
class is a frozen dataclass whose fields are the probe's settings, each with its documentation under it (as in
phf.core.config): the CLI builds the probe's parser from those fields, and the defaults are written there once.

    probes()    every probe record, after importing each module of phf.analysis
    studies()   every study record, the same way

So adding a probe touches its module (and its test and docs): neither the CLI nor the report lists probes.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from phf.core.errors import PhfError
from phf.core.io import read_json
from phf.core.run_folder import RunFolder, results_path

_PROBES: dict[str, "Probe"] = {}
_STUDIES: dict[str, "Study"] = {}


class ProbeConfig:
    """The base of a probe's config dataclass: built from a mapping of settings (`of`) and validated on creation.

    Field metadata the CLI reads (all optional): `required` (the flag must be given), `append` (a repeatable flag
    collecting a tuple of strings), `positional` (a positional argument taking one or more values), `choices`,
    `metavar`. A tuple of numbers is written on the command line as one value separated by commas."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line PhfError naming the bad setting and the fix; nothing to check by default."""

    @classmethod
    def of(cls, values: Mapping[str, Any]):
        """The config of these settings (the others at their defaults); an unknown setting, or a list of numbers
        that is not one, is a one-line PhfError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise PhfError(f"unknown setting {unknown[0]!r} of {cls.__name__}; it accepts: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _as_field(name, value, hints[name]) for name, value in values.items()})


def _as_field(name: str, value: Any, hint: Any) -> Any:
    """A tuple field from a string of values separated by commas, a list or one value; a number or yes/no field
    from its text (as `--set KEY=VALUE` gives it); other fields as given."""
    if isinstance(value, str) and hint in (bool, int, float):
        return _scalar(name, value, hint)
    if typing.get_origin(hint) is not tuple or value is None:
        return value
    item = typing.get_args(hint)[0]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    if item is str:
        return tuple(str(v) for v in value)
    try:
        return tuple(item(float(v)) if item is int and float(v).is_integer() else item(v) for v in value)
    except (TypeError, ValueError):
        kind = "whole numbers" if item is int else "numbers"
        raise PhfError(f"--{name.replace('_', '-')} takes {kind} separated by commas (e.g. 1e-4,1e-3 or 0,4,16), "
                       f"got {','.join(map(str, value))!r}") from None


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _scalar(name: str, text: str, hint: type) -> Any:
    """A bool, int or float setting from its text, or one line naming the setting and what it takes."""
    try:
        if hint is bool:
            return _BOOLEANS[text.strip().lower()]
        return hint(float(text)) if hint is int and float(text).is_integer() else hint(text)
    except (KeyError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number"}[hint]
        raise PhfError(f"setting {name} takes {kind}, got {text!r}") from None


@dataclass(frozen=True)
class Study:
    """What the report shows of a probe's (or a recipe's) results found in a result folder: a section with a caption,
    a table and its figure."""
    name: str
    """The figure's name in the report (figures/NAME.png)."""
    title: str
    """The section's title."""
    find: Callable[[Path, dict], "tuple[dict, Path | None] | None"]
    """(results, figure PNG or None) of the study in a result folder, given the folder and its results.json;
    None when the folder holds none."""
    caption: Callable[[dict], str]
    """The caption of the figure and the section, from the results."""
    table: Callable[[dict], list[list[str]]]
    """Header and rows of the section's table."""
    notes: Callable[[dict], list[str]] = lambda results: []
    """Paragraphs after the table."""


def results_file(probe_folder: str, figure: str, only_with: str | None = None) -> Callable:
    """A `Study.find` for results a probe wrote inside a result folder: FOLDER/`probe_folder`/results.json, else the
    first seed's (FOLDER/seed-<seed>/`probe_folder`), with the PNG `figure` beside it. `only_with`: only when the
    folder's results.json has that key (the recipe that writes it ran the study)."""

    def find(folder: Path, results: dict):
        if only_with is not None and not results.get(only_with):
            return None
        places = [folder / probe_folder, *(d / probe_folder for d in RunFolder(folder).seed_dirs())]
        found = next((results_path(p) for p in places if results_path(p).exists()), None)
        if found is None:
            return None
        png = found.parent / figure
        return read_json(found), (png if png.exists() else None)

    return find


@dataclass(frozen=True)
class Probe:
    """One `phf probe NAME`."""
    name: str
    """The sub-command: `phf probe NAME`."""
    help: str
    """One line for `phf probe --help`."""
    config: type
    """Its config class (a frozen dataclass deriving from ProbeConfig): the settings, their defaults and docs."""
    run: Callable[..., dict]
    """run(config, progress=True) -> results (written where the config says)."""
    show: Callable[[dict, Any], str]
    """show(results, config) -> what the terminal prints."""
    study: Study | None = None
    """What the report shows of its results, if anything."""
    report_folder: Callable[[Any], Path | None] = lambda config: None
    """The result folder whose report to write again after a run (the probe wrote its study into it), or None."""


def register(probe: Probe) -> Probe:
    """Declare a probe (and its study); called once by the probe's module at import time."""
    if probe.name in _PROBES and _PROBES[probe.name] is not probe:
        raise PhfError(f"two probes are named {probe.name!r}; rename one")
    _PROBES[probe.name] = probe
    if probe.study is not None:
        register_study(probe.study)
    return probe


def register_study(study: Study) -> Study:
    """Declare a study of the report that is not a probe's (a recipe's, e.g. RL from each base)."""
    _STUDIES[study.name] = study
    return study


def _import_analysis() -> None:
    """Import every module of phf.analysis: each declares its records."""
    package = importlib.import_module("phf.analysis")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"phf.analysis.{info.name}")


def probes() -> dict[str, Probe]:
    """Every probe, by name, in alphabetical order."""
    _import_analysis()
    return dict(sorted(_PROBES.items()))


def studies() -> dict[str, Study]:
    """Every study of the report, by name, in alphabetical order."""
    _import_analysis()
    return dict(sorted(_STUDIES.items()))


def summary(results: dict) -> dict:
    """The figures of a results dict without its long lists (scores, pools, segments)."""
    out = {}
    for k, v in results.items():
        if isinstance(v, dict):
            v = summary(v)
        elif isinstance(v, list) and len(v) > 12:
            continue
        out[k] = v
    return out
