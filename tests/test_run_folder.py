"""The run-folder format (phf.core.run_folder): results.json written with its version and read back as it was,
older folders read, and a missing, damaged or newer file refused in one line."""
import json

import pytest

from phf.core.errors import PhfError
from phf.core.run_folder import (FORMAT_VERSION, ArmResult, Results, RunFolder, checkpoint_dir, read_results,
                                 read_results_dict, results_path, run_dir_of_checkpoint, write_results)

RESULTS = {
    "task": "pep8",
    "objectives": {
        "mle": {"misalignment_mean": 0.02, "heldout_bits_per_char": 2.5, "run_dir": "mle", "seeds": [42],
                "unconditional": {"mean_chars": 310.0}, "misalignment_mean_ci95": [0.01, 0.03]},
        "finetune:conditional": {"misalignment_mean": 0.01, "heldout_bits_per_char": 2.6, "kind": "finetune",
                                 "run_dir": "finetune-conditional", "misalignment_ratio_to_mle": 0.5,
                                 "misalignment_ratio_ci95": [0.3, 0.8], "kl_from_reference_bits": 0.04},
    },
    "wall_seconds": 12.5,
    "init_from": "",
    "seeds": [42],
}


def test_round_trip_writes_the_same_json_with_the_version_first(tmp_path):
    data = json.loads(json.dumps(RESULTS))
    write_results(tmp_path, data)
    written = json.loads(results_path(tmp_path).read_text())
    assert list(written) == ["format_version", *RESULTS] and written["format_version"] == FORMAT_VERSION
    assert {k: v for k, v in written.items() if k != "format_version"} == RESULTS
    assert data == RESULTS  # the caller's dict is not changed

    results = read_results(tmp_path)
    assert results.task == "pep8" and results.seeds == [42] and list(results.arms) == list(RESULTS["objectives"])
    arm = results.arms["finetune:conditional"]
    assert (arm.name, arm.kind, arm.misalignment_ratio_to_mle, arm.misalignment_ratio_ci95) == (
        "finetune:conditional", "finetune", 0.5, [0.3, 0.8])
    assert results.reference.heldout_bits_per_char == 2.5 and results.reference.misalignment_mean_ci95 == [0.01, 0.03]
    # the record written back is byte for byte the file it came from
    before = results_path(tmp_path).read_bytes()
    write_results(tmp_path / "again", results)
    assert results_path(tmp_path / "again").read_bytes() == before
    # keys keep their order, and a typed field changed is written in its place
    arm.misalignment_mean = 0.5
    assert list(arm.to_dict()) == list(RESULTS["objectives"]["finetune:conditional"])
    assert arm.to_dict()["misalignment_mean"] == 0.5


def test_an_unversioned_folder_loads_as_version_one(tmp_path):
    old = {"task": "pii", "objectives": {"mle": {"misalignment_mean": 0.3}}}  # no seeds, no run_dir, no version
    results_path(tmp_path).write_text(json.dumps(old))
    results = read_results(tmp_path)
    assert results.task == "pii" and results.seeds == [] and results.arms["mle"].run_dir is None
    assert results.arms["mle"].run_folder(tmp_path) == tmp_path / "mle"
    assert results.to_dict() == old
    assert read_results_dict(tmp_path) == old


@pytest.mark.parametrize("content, problem, fix", [
    (None, "not found", "phf demo"),
    ("{\"task\": \"pep8\", ", "not valid JSON", "run the recipe"),
    (json.dumps({"format_version": FORMAT_VERSION + 1, **RESULTS}), f"format_version {FORMAT_VERSION + 1}",
     "upgrade phf"),
    (json.dumps({"format_version": "2", **RESULTS}), "format_version '2'", "upgrade phf"),
    (json.dumps([1, 2]), "not a results file", "run the recipe"),
    (json.dumps({"task": "pep8", "objectives": {}}), "has no objectives", "phf demo"),
])
def test_bad_results_fail_with_one_line_naming_the_fix(tmp_path, content, problem, fix):
    if content is not None:
        results_path(tmp_path).write_text(content)
    with pytest.raises(PhfError) as err:
        read_results(tmp_path)
    message = str(err.value)
    assert "\n" not in message and problem in message and fix in message and str(tmp_path) in message


def test_layout_of_one_seed_and_of_several(tmp_path):
    folder = RunFolder(str(tmp_path))
    assert folder.path == tmp_path and folder.results_path == tmp_path / "results.json"
    # one seed: DIR/<arm>; several: DIR/seed-<seed>/<arm>; an arm's colon becomes a dash
    assert folder.replicate_dir(42, [42]) == tmp_path and folder.replicate_dir(43, [42, 43]) == tmp_path / "seed-43"
    assert folder.arm_dir("finetune:conditional") == tmp_path / "finetune-conditional"
    assert folder.arm_dir("mle", seed=43) == tmp_path / "seed-43" / "mle"
    assert folder.checkpoint("mle", seed=43) == tmp_path / "seed-43" / "mle" / "checkpoint"
    assert checkpoint_dir(tmp_path / "mle") == tmp_path / "mle" / "checkpoint"
    assert run_dir_of_checkpoint(tmp_path / "mle" / "checkpoint") == tmp_path / "mle"
    assert run_dir_of_checkpoint(tmp_path / "model") == tmp_path / "model"

    one = Results.from_dict(RESULTS)
    assert folder.replicate_run_dirs(one) == [(42, {"mle": tmp_path / "mle",
                                                    "finetune:conditional": tmp_path / "finetune-conditional"})]
    several = Results.from_dict({**RESULTS, "seeds": [42, 43]})
    assert [(seed, runs["finetune:conditional"]) for seed, runs in folder.replicate_run_dirs(several)] == [
        (42, tmp_path / "seed-42" / "finetune-conditional"), (43, tmp_path / "seed-43" / "finetune-conditional")]

    assert folder.replicate_roots() == [tmp_path]
    for seed in (43, 42):
        folder.arm_dir("mle", seed).mkdir(parents=True)
    assert folder.replicate_roots() == [tmp_path / "seed-42", tmp_path / "seed-43"]


def test_arm_result_from_an_entry_without_the_typed_fields():
    arm = ArmResult.from_dict("rl:conditional", {"kind": "rl", "extra": {"a": 1}})
    assert arm.misalignment_mean is None and arm.to_dict() == {"kind": "rl", "extra": {"a": 1}}
    assert arm.run_folder("runs/x").name == "rl-conditional"


def test_a_relative_path_a_run_recorded_is_found_from_any_working_folder(tmp_path, monkeypatch):
    """run.json records paths as training saw them, relative to the folder it ran in; a probe run from elsewhere
    finds them under the folder above the run that holds them, and a path that is gone is None."""
    import json

    from phf.core.run_folder import recorded_path

    run = tmp_path / "work" / "runs" / "demo" / "seed-42" / "mle"
    run.mkdir(parents=True)
    scored = tmp_path / "work" / "runs" / "demo" / "data" / "scored" / "pep8-abc"
    scored.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"scored_corpus": "runs/demo/data/scored/pep8-abc",
                                              "tokenizer": str(tmp_path / "gone" / "tokenizer.json")}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert recorded_path(run, "scored_corpus") == scored
    assert recorded_path(run, "tokenizer") is None and recorded_path(run, "data_dir") is None
    monkeypatch.chdir(tmp_path / "work")
    assert recorded_path(run, "scored_corpus").resolve() == scored
    assert recorded_path(tmp_path / "no-run", "scored_corpus") is None
