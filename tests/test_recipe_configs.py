"""The recipes' config objects: a bad value is one line naming the flag, and `phf demo`, `phf sweep` and
`phf scaling` take their defaults from them."""
from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from phf.core.config import field_docs
from phf.core.errors import PhfError
from phf.recipes.configs import DemoConfig, ScalingConfig, SweepConfig


@pytest.mark.parametrize("make, message", [
    (lambda: DemoConfig(seeds=0), "--seeds must be at least 1, got 0"),
    (lambda: DemoConfig(objectives=[]), "--objectives names no arm"),
    (lambda: SweepConfig(seeds=-1), "--seeds must be at least 1, got -1"),
    (lambda: SweepConfig(finetune_fraction=1.0), "--finetune-fraction must be between 0 and 1"),
    (lambda: SweepConfig(objectives=["conditional"]), "a sweep needs the mle arm"),
    (lambda: SweepConfig(finetune=["mle"]), "finetune:mle is the mle arm itself"),
    (lambda: SweepConfig(rl=True, rl_tokens=0), "--rl-tokens must be a positive number of tokens"),
    (lambda: SweepConfig(rl_overrides=["train.lr=1"]), "not an rl setting: 'train.lr=1'"),
    (lambda: SweepConfig(tamper=[4]), "tamper must be a dict"),
    (lambda: ScalingConfig(tokens=[0]), "--tokens must be positive token budgets"),
    (lambda: ScalingConfig(tokens=["many"]), "--tokens must be token budgets"),
    (lambda: ScalingConfig(tokens=[1000], sizes=["4x100"]), "LAYERSxWIDTH"),
    (lambda: ScalingConfig(tokens=[1000], objective="mle"), "give a feedback objective"),
    (lambda: ScalingConfig(tokens=[1000], seeds=1.5), "--seeds must be at least 1"),
])
def test_a_bad_value_is_one_line(make, message):
    with pytest.raises(PhfError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_configs_are_frozen_documented_and_normalised():
    cfg = SweepConfig(out="x", overrides=["train.lr=1e-3"], finetune=["conditional"])
    assert cfg.out == Path("x") and cfg.overrides == ("train.lr=1e-3",) and cfg.finetune == ("conditional",)
    with pytest.raises(FrozenInstanceError):
        cfg.seeds = 2
    assert ScalingConfig(tokens=[700, 350, 700]).tokens == (350, 700)
    for cls in (DemoConfig, SweepConfig, ScalingConfig):
        docs = field_docs(cls)
        assert all(docs.get(f.name) for f in fields(cls)), cls.__name__


def _parsed(argv: list[str]):
    from phf.cli.main import build_parser

    return build_parser(argv[0]).parse_args(argv)


def test_the_command_line_defaults_are_the_configs():
    from phf.cli.commands import demo_config, scaling_config, sweep_config

    assert demo_config(_parsed(["demo"])) == DemoConfig()
    assert sweep_config(_parsed(["sweep"])) == SweepConfig()
    assert scaling_config(_parsed(["scaling", "--tokens", "1000"])) == ScalingConfig(tokens=(1000,))


def test_the_command_line_builds_the_config_from_its_flags():
    from phf.cli.commands import demo_config, sweep_config

    demo = demo_config(_parsed(["demo", "--task", "pii", "--out", "d", "--objectives", "mle, conditional",
                                "--seeds", "2", "--set", "train.lr=1e-3"]))
    assert demo == DemoConfig("pii", Path("d"), ("train.lr=1e-3",), ("mle", "conditional"), seeds=2)
    sweep = sweep_config(_parsed(["sweep", "--finetune", "none", "--rl", "--rl-tokens", "300", "--tamper",
                                  "--no-report", "--set", "rl.beta=0.1", "--set", "train.lr=1e-3"]))
    assert sweep.finetune == () and sweep.rl and sweep.rl_tokens == 300 and sweep.tamper == {}
    assert not sweep.report and sweep.rl_overrides == ("rl.beta=0.1",) and sweep.overrides == ("train.lr=1e-3",)
    with pytest.raises(PhfError, match="--finetune-fraction"):
        sweep_config(_parsed(["sweep", "--finetune-fraction", "1.5"]))
    grid = sweep_config(_parsed(["sweep", "--tamper-set", "lr=1e-4,1e-3", "--tamper-set", "lora=true",
                                 "--tamper-set", "num-samples=256"]))  # a grid of attacks; implies --tamper
    assert grid.tamper == {"lr": "1e-4,1e-3", "lora": "true", "num_samples": "256"}
    from phf.analysis.tamper import TamperConfig
    probe = TamperConfig.of({**grid.tamper, "model": ["m"], "out": "o"})
    assert (probe.lr, probe.lora, probe.num_samples) == ((1e-4, 1e-3), True, 256)
    with pytest.raises(PhfError, match="--tamper-set takes KEY=VALUE"):
        sweep_config(_parsed(["sweep", "--tamper-set", "lora"]))


@pytest.mark.parametrize("settings, message", [
    ({"lr": "fast"}, "--lr takes numbers"),
    ({"lora": "maybe"}, "setting lora takes true or false, got 'maybe'"),
    ({"num_samples": "0"}, "--num-samples must be >= 1"),
    ({"rate": "1"}, "unknown setting 'rate' of TamperConfig"),
    ({"out": "x"}, "tamper setting 'out' is the sweep's own"),
])
def test_bad_tamper_settings_stop_the_sweep_before_any_arm_trains(tmp_path, settings, message):
    from phf.recipes.sweep import run_sweep

    with pytest.raises(PhfError, match=message):
        run_sweep(SweepConfig(out=tmp_path / "sweep", tamper=settings), progress=False)
    assert not (tmp_path / "sweep").exists()
