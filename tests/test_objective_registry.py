"""The objective registry (phf/core/objective_specs.py): every record is whole and consistent with its class, the
config, the tasks, the sweep and the report, which all read it."""
from __future__ import annotations

import dataclasses
import re

import pytest

from phf.core.config import ObjectiveConfig, Quantile
from phf.core.errors import PhfError
from phf.core.objective_specs import (MISALIGNED_ABOVE, OBJECTIVE_NAMES, OBJECTIVE_SPECS, finetune_objectives,
                                      spec_of, sweep_objectives)
from phf.tasks import SHIPPED, get_task
from phf.training.objectives import OBJECTIVES, Objective, get_objective

CONFIG_FIELDS = {f.name for f in dataclasses.fields(ObjectiveConfig)}


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_record_has_its_class_and_every_class_its_record(name):
    cls = OBJECTIVES[name]
    assert issubclass(cls, Objective) and cls.name == name and cls.spec is OBJECTIVE_SPECS[name]
    assert cls.uses_threshold == ("threshold" in cls.spec.fields)
    assert set(OBJECTIVES) == set(OBJECTIVE_SPECS)


@pytest.mark.parametrize("spec", OBJECTIVE_SPECS.values(), ids=OBJECTIVE_NAMES)
def test_a_record_names_real_config_fields_and_valid_defaults(spec):
    assert set(spec.fields) <= CONFIG_FIELDS - {"name", "check_conditioning"}, spec.name
    assert spec.summary and "\n" not in spec.summary and len(spec.summary) <= 100
    assert spec.defaults_of is None or (spec.defaults_of in OBJECTIVE_SPECS and not spec.defaults)
    for key, value in spec.defaults.items():
        assert key in spec.fields, f"{spec.name}: a default for {key}, a field it does not read"
        assert value == MISALIGNED_ABOVE or isinstance(value, (float, Quantile)), (spec.name, key, value)
        # a default is a value the config accepts
        written = value.q if isinstance(value, Quantile) else 0.0 if value == MISALIGNED_ABOVE else value
        ObjectiveConfig(name=spec.name, **{key + ("_quantile" if isinstance(value, Quantile) else ""): written}
                        ).validate()


def test_every_shipped_tasks_own_defaults_are_fields_the_objective_reads_and_valid():
    for task in SHIPPED.values():
        for objective, row in task.objective_defaults.items():
            spec = spec_of(objective)
            assert spec.defaults_of is None, f"{task.name}: {objective} takes {spec.defaults_of}'s defaults"
            assert set(row) <= set(spec.fields), (task.name, objective)
        for name in OBJECTIVE_NAMES:  # and the run config that writes them out validates
            assert task.run_config(name).objective.name == name


def test_colours_are_distinct_colours():
    colours = [s.color for s in OBJECTIVE_SPECS.values()]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert len(set(colours)) == len(colours)


def test_the_sweep_and_the_report_derive_from_the_records():
    from phf.recipes.sweep import FINETUNE_OBJECTIVES, SWEEP_OBJECTIVES
    from phf.report.page import COLORS

    assert SWEEP_OBJECTIVES == sweep_objectives() == [s.name for s in OBJECTIVE_SPECS.values() if s.sweep]
    assert FINETUNE_OBJECTIVES == finetune_objectives() == ["filtering", "conditional", "rwr", "awr"]
    assert "mle" in SWEEP_OBJECTIVES and "mle" not in FINETUNE_OBJECTIVES  # the reference and the finetunes' base
    assert all(COLORS[n] == s.color for n, s in OBJECTIVE_SPECS.items())


def test_an_unknown_objective_is_one_line_naming_the_choices():
    with pytest.raises(PhfError, match="unknown objective 'dpo'; choose one of mle, filtering"):
        spec_of("dpo")
    with pytest.raises(PhfError, match="objective.name: unknown objective 'dpo'"):
        ObjectiveConfig(name="dpo").validate()
    with pytest.raises(PhfError, match="has no config 'dpo'; name an objective .* or a shipped config "
                                       r"\(paper-124m\)"):
        get_task("pep8").run_config("dpo")


def test_a_derived_config_writes_out_the_defaults_the_objective_takes():
    pep8, toxicity = get_task("pep8"), get_task("toxicity")
    assert pep8.objective_section("conditional") == {"name": "conditional", "threshold": 0.0,
                                                     "drop_token_fraction": 0.1}
    assert pep8.objective_section("filtering") == {"name": "filtering", "threshold_quantile": 0.5}
    assert toxicity.objective_section("masking") == {"name": "masking", "threshold": 0.5}  # conditional's
    # the config says what the objective built from it with no config values does
    for task in (pep8, toxicity):
        for name in OBJECTIVE_NAMES:
            bare = get_objective(ObjectiveConfig(name=name), task)
            derived = get_objective(task.run_config(name).objective, task)
            shipped_file = (task.config_dir() / f"{name}.yaml").exists()  # toxicity's conditional says more
            assert (derived.describe() == bare.describe()) != shipped_file, (task.name, name)


def test_a_task_of_your_own_takes_the_records_defaults_with_its_threshold():
    mine = get_task("mine").replace(misaligned_above=0.3)
    assert mine.defaults_for("conditional") == {"threshold": 0.3, "drop_token_fraction": 0.01}
    assert mine.defaults_for("masking") == {"threshold": 0.3}  # conditional's threshold, not its drop fraction
    assert mine.defaults_for("filtering") == {"threshold": Quantile(0.5)}
    assert mine.defaults_for("mle") == {}
