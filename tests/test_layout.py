"""The package's shape, checked from its source: imports point down the flow, no circle, no task-name switches."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "phf"
# Each subpackage may import from those before it, never from those after it: the data flow, read top to bottom.
LAYERS = ["core", "data", "tasks", "model", "evaluation", "training", "analysis", "report", "recipes", "cli"]
# Heavy optional extras (and the prose scorers' models) are imported where they are used, so that a run that
# does not need them neither loads nor requires them.
LAZY = {"trl", "peft", "ray", "spacy", "matplotlib", "wandb", "tensorboard", "datasets", "profanity_check", "scrubadub",
        "en_core_web_sm", "accelerate", "onnx", "onnxruntime", "hatesonar", "torch.utils.tensorboard", "transformers.Trainer",
        "transformers.TrainingArguments", "transformers.TrainerCallback", "transformers.PrinterCallback"}
TASK_NAMES = {"pep8", "pii", "toxicity"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def layer(module: str) -> int | None:
    if module == "phf.__main__":  # `python -m phf`: the command line
        return LAYERS.index("cli")
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def imports(tree: ast.Module, top_level_only: bool = False):
    """(node, imported module, names) of every import; with `top_level_only`, those run at import time."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node, node.module, [a.name for a in node.names]


def function_level_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


MODULES = modules()


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m.count(".") >= 1 and layer(m) is None]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_imports_point_down_the_flow():
    wrong = []
    for name, tree in MODULES.items():
        own = layer(name)
        for node, target, _ in imports(tree):
            if target.startswith("phf.") and own is not None:
                theirs = layer(target)
                if theirs is not None and theirs > own:
                    wrong.append(f"{name}:{node.lineno} imports {target}")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {name: {t for _, t, names in imports(tree, top_level_only=True) if t.startswith("phf")}
             for name, tree in MODULES.items()}
    for name, tree in MODULES.items():  # `from phf.x import y` may import the module phf.x.y
        for _, target, names in imports(tree, top_level_only=True):
            graph[name] |= {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
    graph = {k: {t for t in v if t in MODULES and t != k} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_at_module_level_except_heavy_extras():
    local = []
    for name, tree in MODULES.items():
        for node in function_level_imports(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if not any(t == lazy or t.startswith(lazy + ".") for t in targets for lazy in LAZY):
                local.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not local, "function-level imports of light modules:\n" + "\n".join(local)


def test_the_package_does_not_import_the_benchmarks():
    """benchmarks/ lies beside the package, not in its wheel: `phf bench` loads it from the checkout by name
    (phf/cli/bench.py), and nothing in phf imports it."""
    wrong = [f"{name}:{node.lineno} {target}" for name, tree in MODULES.items()
             for node, target, _ in imports(tree) if target == "benchmarks" or target.startswith("benchmarks.")]
    assert not wrong, "the package imports the benchmarks:\n" + "\n".join(wrong)
    assert not (PACKAGE / "recipes" / "bench.py").exists() and (PACKAGE.parent / "benchmarks" / "bench.py").exists()


def test_no_private_helper_is_used_from_another_module():
    wrong = [f"{name}:{node.lineno} {target}.{n}" for name, tree in MODULES.items()
             for node, target, names in imports(tree) if target.startswith("phf")
             for n in names if n.startswith("_")]
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_no_task_name_is_compared_outside_tasks():
    wrong = []
    for name, tree in MODULES.items():
        if name.startswith("phf.tasks") or name == "phf.data.scorers":  # the scorer registry names scorers
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = {o.value for o in operands if isinstance(o, ast.Constant)}
                for o in operands:  # also `task in ("pii", "toxicity")`
                    if isinstance(o, (ast.Tuple, ast.List, ast.Set)):
                        consts |= {e.value for e in o.elts if isinstance(e, ast.Constant)}
                if consts & TASK_NAMES:
                    wrong.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.Dict) and {k.value for k in node.keys if isinstance(k, ast.Constant)} \
                    >= {"pep8", "pii"}:
                wrong.append(f"{name}:{node.lineno} a dict keyed by task names")
    assert not wrong, "task names compared outside phf/tasks:\n" + "\n".join(wrong)


def test_the_checks_find_what_they_look_for():
    """The checks are not vacuous: each flags a planted example."""
    bad = ast.parse("def f(task):\n    import json\n    return task == 'pep8'\n")
    assert list(function_level_imports(bad))
    compare = next(n for n in ast.walk(bad) if isinstance(n, ast.Compare))
    assert {c.value for c in compare.comparators} & TASK_NAMES
    assert layer("phf.training.trainer") > layer("phf.evaluation.sampling") > layer("phf.model.lm")


def test_objective_names_in_the_config_match_the_objective_classes():
    from phf.core.config import OBJECTIVE_NAMES
    from phf.training.objectives import OBJECTIVES

    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES


def test_no_objective_list_outside_the_registry():
    """An objective is named in its record (phf/core/objective_specs.py) and bound to its class
    (phf/training/objectives.py); no other module lists objectives (a sweep list, a colour table, a defaults table
    of every objective), so adding one touches no other module. A task may pick some (the objectives its demo
    trains, the paper's values for it): a choice of the task, which a new objective need not join."""
    from phf.core.objective_specs import OBJECTIVE_NAMES

    homes = {"phf.core.objective_specs", "phf.training.objectives"}
    wrong = []
    for name, tree in MODULES.items():
        if name in homes or name.startswith("phf.tasks"):
            continue
        for node in ast.walk(tree):
            elts = node.keys if isinstance(node, ast.Dict) else \
                node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else []
            named = {e.value for e in elts if isinstance(e, ast.Constant)} & set(OBJECTIVE_NAMES)
            if len(named) >= 3:
                wrong.append(f"{name}:{node.lineno} lists {sorted(named)}")
    assert not wrong, "objectives listed outside the registry:\n" + "\n".join(wrong)


MAX_LINES, MAX_PARAMETERS = 60, 8
# Argument parsing is a list of flags, read top to bottom; it is the one place a long function reads well.
PARSING = {"add_parsers", "add_config_arguments"}


def oversized(tree: ast.Module, module: str) -> list[str]:
    """Functions over MAX_LINES lines or with more than MAX_PARAMETERS parameters (self and cls not counted)."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in PARSING:
            continue
        a = fn.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
        params += ["*args"] * bool(a.vararg) + ["**kwargs"] * bool(a.kwarg)
        lines = fn.end_lineno - fn.lineno + 1
        if lines > MAX_LINES or len(params) > MAX_PARAMETERS:
            found.append(f"{module}:{fn.lineno} {fn.name}: {lines} lines, {len(params)} parameters")
    return found


def test_functions_are_short_and_take_few_parameters():
    """No function over 60 lines, none with more than 8 parameters (argument parsing aside): a long list of
    parameters travels as a config object, a long function is split into named steps."""
    planted = ast.parse("def f(a, b, c, d, e, f, g, h, i):\n" + "    pass\n" * 61)
    assert oversized(planted, "planted") == ["planted:1 f: 62 lines, 9 parameters"]
    wrong = [line for name, tree in MODULES.items() for line in oversized(tree, name)]
    assert not wrong, "split these functions (or group their parameters in a config object):\n" + "\n".join(wrong)
