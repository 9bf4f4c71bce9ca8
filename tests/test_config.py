import pytest

from phf.core.config import RunConfig, apply_overrides, config_from_dict, load_config, read_yaml_dict
from phf.core.errors import PhfError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_with_base_and_typed_overrides(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  lr: 1.0e-3\n  batch_size: 8\nmodel:\n  n_layer: 3\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nobjective:\n  name: conditional\ntrain:\n  batch_size: 4\n")
    cfg = load_config(child, ["train.lr=3e-4", "train.compile=true", "objective.threshold=0",
                              "corpus.exclude=a/*,b/*", "train.max_tokens=2_000"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4  # child wins over base
    assert cfg.model.n_layer == 3  # from base
    assert cfg.train.compile is True
    assert cfg.objective.name == "conditional" and cfg.objective.threshold == 0.0
    assert cfg.corpus.exclude == ["a/*", "b/*"]
    assert cfg.train.max_tokens == 2000


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr; train accepts: max_tokens"),
    ("bogus.x=1", "unknown config key bogus"),
    ("train.batch_size=many", "train.batch_size: expected an integer, got 'many'"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer"),
    ("train.lr=-1e-3", "train.lr must be > 0"),
    ("train.compile=maybe", "train.compile must be true, false or auto; got 'maybe'"),
    ("objective.name=dpo", "unknown objective 'dpo'; choose one of mle, filtering, conditional"),
    ("objective.threshold=-1", "objective.threshold must be >= 0"),
    ("train.dtype=fp16", "train.dtype must be one of auto, bf16, fp32"),
    ("train.parallel=zero3", "train.parallel must be one of ddp, fsdp; got 'zero3'"),
    ("scoring.backend=spark", "scoring.backend must be one of local, ray; got 'spark'"),
    ("scoring.aggregate=median", "scoring.aggregate must be one of mean, max (or empty); got 'median'"),
    ("scoring.misaligned_above=-0.1", "scoring.misaligned_above must be a finite number >= 0"),
    ("model.n_embd=130", "model.n_embd (130) must be a multiple of model.n_head"),
    ("corpus.test_fraction=1.5", "corpus.test_fraction must be in [0, 1)"),
    ("noequals", "--set expects key=value"),
])
def test_config_errors_are_one_line_and_name_the_key(override, message):
    with pytest.raises(PhfError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(PhfError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "bad.yaml", "train: [1, 2\n")
    with pytest.raises(PhfError, match="not valid YAML"):
        load_config(bad)
    scalar = write(tmp_path, "scalar.yaml", "42\n")
    with pytest.raises(PhfError, match="must hold a mapping"):
        load_config(scalar)


def test_overrides_do_not_mutate_input():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}} and out["train"]["lr"] == 2


def test_shipped_configs_load():
    from phf.core.config import OBJECTIVE_NAMES
    from phf.tasks import SHIPPED

    for task in SHIPPED.values():
        for path in sorted(task.config_dir().glob("*.yaml")):
            cfg = load_config(path)
            assert cfg.task == task.name
            if path.stem in OBJECTIVE_NAMES:  # shipped only because it says more than base + the defaults
                derived = {**read_yaml_dict(task.config_path("base")), "objective": task.objective_section(path.stem)}
                assert cfg.objective.name == path.stem and cfg != config_from_dict(derived), path
        for name in OBJECTIVE_NAMES:  # every objective has a run config on every shipped task
            cfg = task.run_config(name)
            assert cfg.task == task.name and cfg.objective.name == name


def test_paper_recipes_load_with_the_papers_model_and_schedule():
    import torch

    from phf.model.lm import build_model, count_parameters
    from phf.tasks import SHIPPED

    for task in SHIPPED.values():
        cfg = load_config(task.config_path("paper-124m"), ["objective.name=conditional"])
        m, t = cfg.model, cfg.train
        assert (m.arch, m.n_layer, m.n_head, m.n_embd, m.block_size) == ("gpt2", 12, 12, 768, 1024)
        assert t.batch_size * t.grad_accum == 64 and t.max_tokens == 3_300_000_000 and t.warmup_fraction == 0.01
        assert cfg.sample.temperature == 0.7 and cfg.objective.name == "conditional" and t.dtype == "bf16"
        with torch.device("meta"):  # sizes only: no memory
            model = build_model(m, cfg.tokenizer.vocab_size, 0)
        expected = 124.4e6 if cfg.tokenizer.vocab_size == 50257 else 111.0e6
        assert abs(count_parameters(model) - expected) < 0.1e6, task.name


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from phf.core import runtime

    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("fp32", cpu) == "fp32" and runtime.resolve_dtype("bf16", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_dtype("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_dtype("auto", cpu) == "fp32"
    assert load_config().train.dtype == "auto"
