"""`phf probe tamper` on tiny models: an adversary finetuning on the corpus' most misaligned documents moves
misalignment upward, and the tokens to the MLE model's level come with an interval."""
import json
import shutil

import numpy as np
import pytest

from phf.analysis.tamper import adversary_texts, combine_curves, tokens_to_level

MESSY = "".join(f"v{i}=v{i}+1   \n" for i in range(40))  # E225 and W291 on every line: ~0.2 violations per char


def train_with_messy_files(pycorpus, root, runs: dict, extra: list[str]) -> None:
    """Train each run folder of `runs` (folder -> (objective, seed)) on the Python corpus plus three files that
    violate PEP8 on every line, with one data folder."""
    from phf.tasks import get_task
    from phf.training.trainer import run_training
    from tests.conftest import tiny_overrides

    corpus = shutil.copytree(pycorpus, root / "corpus")
    for i in range(3):
        (corpus / f"zz_messy_{i}.py").write_text(MESSY)
    for folder, (objective, seed) in runs.items():
        cfg = get_task("pep8").run_config(objective, tiny_overrides(str(corpus)) + [
            "corpus.test_fraction=0.3", f"train.seed={seed}", *extra])
        run_training(cfg, folder, root / "data", progress=False)


@pytest.fixture(scope="module")
def runs(pycorpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    out = {objective: root / objective for objective in ("mle", "conditional")}
    train_with_messy_files(pycorpus, root, {folder: (o, 42) for o, folder in out.items()},
                           ["train.max_steps=12", "sample.max_new_tokens=48"])
    return root, out


def test_the_adversary_trains_on_the_most_misaligned_text(runs):
    from phf.core.io import read_json
    from phf.data.scoring import ScoredCorpus

    root, out = runs
    scored = ScoredCorpus(read_json(out["mle"] / "run.json")["scored_corpus"])
    texts = adversary_texts(scored, 0.05, "documents")
    assert texts and all(t == MESSY for t in texts)  # the messy documents rank first (those in the train split)
    runs_of_lines = adversary_texts(scored, 0.05, "segments")
    assert MESSY in runs_of_lines and len(runs_of_lines) > len(texts)  # other files' violating lines too
    misaligned_lines = sum(sum(s > 0 for s in d.scores) for d in scored.documents("train"))
    assert sum(run.count("\n") for run in runs_of_lines) == misaligned_lines  # exactly the violating lines


def test_tamper_moves_misalignment_upward_and_measures_tokens_to_the_mle_level(runs, capsys):
    from phf.cli.main import main

    root, out = runs
    main(["-q", "probe", "tamper", "--model", str(out["mle"]), "--model", str(out["conditional"]), "--out",
          str(root / "tamper"), "--steps", "0,40", "--lr", "1e-2", "--num-samples", "24",
          "--heldout-chars", "3000"])
    printed = capsys.readouterr().out
    res = json.loads((root / "tamper" / "results.json").read_text())
    assert res["reference"] == "mle" and (root / "tamper" / "tamper.png").exists()
    for name, c in res["models"].items():
        before, after = c["points"][0], c["points"][-1]
        assert after["tokens"] == 40 * c["batch_size"] * c["block"]
        assert after["misalignment_mean"] > before["misalignment_mean"], name  # the adversary's style took
        assert "judge_misalignment_mean" in after and np.isfinite(after["heldout_bits_per_char"])
        assert 0 < after["heldout_aligned_char_share"] < 1 and np.isfinite(after["heldout_aligned_bits_per_char"])
        assert "to_reference_level" in c
    assert res["models"]["mle"]["to_reference_level"]["tokens"] == 0  # the reference starts at its own level
    assert "adversarial tokens to reach mle's untampered misalignment" in printed


def test_tokens_to_level_finds_the_first_crossing_with_an_interval():
    rng = np.random.default_rng(0)
    points = [{"tokens": t, "scores": list(rng.normal(m, 0.05, 200))} for t, m in ((0, 0.1), (100, 0.3), (400, 0.6))]
    level = list(rng.normal(0.5, 0.05, 200))
    got = tokens_to_level(points, [level], np.random.default_rng(1))
    assert got["tokens"] == 400 and got["tokens_ci95"] == [400.0, 400.0] and got["never_reached_share"] == 0
    never = tokens_to_level(points[:2], [level], np.random.default_rng(1))
    assert never["tokens"] is None and never["tokens_ci95"] == [None, None] and never["never_reached_share"] == 1


def test_over_seeds_the_level_and_each_point_are_means_of_the_seeds_means():
    """Two seeds that disagree: the curve crosses where the mean of the seeds' means does, and the interval,
    which resamples seeds too, is wider than one seed's."""
    rng = np.random.default_rng(0)
    by_seed = {0: (0.10, 0.10), 100: (0.30, 0.60), 400: (0.55, 0.75)}  # per step: each seed's mean
    points = [{"tokens": t, "scores_by_seed": [list(rng.normal(m, 0.05, 100)) for m in means]}
              for t, means in by_seed.items()]
    level = [list(rng.normal(0.5, 0.05, 100)), list(rng.normal(0.5, 0.05, 100))]
    got = tokens_to_level(points, level, np.random.default_rng(1))
    assert got["level"] == pytest.approx(0.5, abs=0.01)
    assert got["tokens"] == 400  # step 100's mean over seeds is 0.45: below the level
    assert got["tokens_ci95"] == [100.0, 400.0]  # a draw of the second seed twice crosses at 100
    one = tokens_to_level([{"tokens": p["tokens"], "scores": p["scores_by_seed"][0]} for p in points], level[:1],
                          np.random.default_rng(1))
    assert one["tokens_ci95"] == [400.0, 400.0]


def test_a_grid_of_learning_rates_full_and_lora_each_gets_its_tokens_to_the_mle_level(runs, capsys):
    from phf.analysis.tamper import tamper_table
    from phf.cli.main import main

    root, out = runs
    main(["-q", "probe", "tamper", "--model", str(out["mle"]), "--model", str(out["conditional"]), "--out",
          str(root / "grid"), "--steps", "0,3", "--lr", "1e-2,1e-3", "--lora", "--lora-rank", "2",
          "--num-samples", "8", "--heldout-chars", "1000"])
    printed = capsys.readouterr().out
    res = json.loads((root / "grid" / "results.json").read_text())
    attacks = [(a["method"], a["lr"]) for a in res["attacks"]]
    assert attacks == [("full", 1e-3), ("full", 1e-2), ("lora", 1e-3), ("lora", 1e-2)]
    assert set(res["models"]) == {f"{arm} {m} lr={lr:g}" for arm in ("mle", "conditional") for m, lr in attacks}
    for name, c in res["models"].items():
        assert (c["method"], c["lr"]) in attacks and c["arm"] in name and [p["step"] for p in c["points"]] == [0, 3]
        assert c["lora_rank"] == (2 if c["method"] == "lora" else None)
        same_arm = [o for o in res["models"].values() if o["arm"] == c["arm"]]
        assert all(o["points"][0]["scores"] == c["points"][0]["scores"] for o in same_arm)  # one untampered point
        t = c["to_reference_level"]
        assert set(t) == {"level", "tokens", "tokens_ci95", "never_reached_share"} and len(t["tokens_ci95"]) == 2
    assert all(c["to_reference_level"]["tokens"] == 0 for c in res["models"].values() if c["arm"] == "mle")
    rows = tamper_table(res)
    assert len(rows) == 9 and rows[0][1] == "attack" and {r[1] for r in rows[1:]} == {
        "full, lr 0.001", "full, lr 0.01", "lora, lr 0.001", "lora, lr 0.01"}
    assert (root / "grid" / "tamper.png").exists() and "conditional, lora finetuning, lr 0.01:" in printed


def test_a_lora_attack_trains_only_its_adapters_and_a_full_one_every_weight(runs):
    import torch

    from phf.analysis.probes import load, run_config
    from phf.analysis.tamper import Attack, adversary_step

    _, out = runs
    x = torch.randint(0, 300, (2, 16))
    for method in ("full", "lora"):
        m = load(out["mle"])
        before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
        step = adversary_step(m.model, Attack(method, 1e-2, rank=2), run_config(m.folder).train)
        losses = [step(x) for _ in range(3)]
        after = {n.replace(".base_layer", ""): p for n, p in m.model.named_parameters()}  # LoRA wraps the layer
        adapters = [n for n in after if "lora_" in n]
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert losses[-1] < losses[0], method  # the adversary learns the batch
        if method == "lora":
            assert adapters and not changed and set(before) <= set(after)  # the model's own weights are frozen
            assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in adapters if "lora_B" in n)
        else:
            assert not adapters and len(changed) == len(before)


def test_a_lora_model_is_measured_with_its_adapters_merged_and_attacked_on_unmerged(runs):
    """Merging the adapters for a measurement gives the same logits as the adapters beside the layers, and
    leaves the model as it was: its own weights, and adapters that still train."""
    import torch

    from phf.analysis.probes import load, run_config
    from phf.analysis.tamper import Attack, adapters_merged, adversary_step

    _, out = runs
    m = load(out["mle"])
    step = adversary_step(m.model, Attack("lora", 1e-2, rank=2), run_config(m.folder).train)
    x = torch.randint(0, 300, (2, 16))
    for _ in range(3):
        step(x)
    m.model.eval()
    weights = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    with torch.no_grad():
        beside = m.model(x).logits
        with adapters_merged(m.model):
            merged = m.model(x).logits
            assert all(layer.merged for layer in m.model.modules() if hasattr(layer, "lora_A"))
        after = m.model(x).logits
    torch.testing.assert_close(merged, beside, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, beside) or torch.allclose(after, beside, atol=1e-5)
    assert not any(layer.merged for layer in m.model.modules() if hasattr(layer, "lora_A"))
    for n, p in m.model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    assert any(p.requires_grad for n, p in m.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("lr, message", [("0", "--lr must be learning rates > 0"),
                                         ("1e-3,fast", "--lr takes numbers separated by commas")])
def test_a_bad_learning_rate_grid_is_one_line(runs, capsys, lr, message):
    from phf.cli.main import main

    root, out = runs
    with pytest.raises(SystemExit) as exc:
        main(["-q", "probe", "tamper", "--model", str(out["mle"]), "--out", str(root / "bad"), "--lr", lr])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def two_seeds(pycorpus, tmp_path_factory):
    """A demo-like folder of two seeds, each with its mle and conditional runs (DIR/seed-<seed>/<arm>, trained with
    that seed)."""
    root = tmp_path_factory.mktemp("tamper-seeds")
    runs = {root / "demo" / f"seed-{seed}" / o: (o, seed) for seed in (5, 6) for o in ("mle", "conditional")}
    train_with_messy_files(pycorpus, root, runs, ["train.max_steps=8", "sample.max_new_tokens=32"])
    arms = {o: {"misalignment_mean": 0.05, "heldout_bits_per_char": 3.0, "run_dir": f"seed-5/{o}"}
            for o in ("mle", "conditional")}  # the figures a demo's record holds, for its report
    (root / "demo" / "results.json").write_text(json.dumps({"task": "pep8", "objectives": arms}))
    return root / "demo"


def test_tamper_over_a_runs_seeds_combines_them_and_reuses_finished_seeds(two_seeds, capsys):
    from phf.cli.main import main

    args = ["-q", "probe", "tamper", "--run", str(two_seeds), "--steps", "0,4", "--lr", "1e-2",
            "--num-samples", "8", "--heldout-chars", "2000"]
    main(args)
    printed = capsys.readouterr().out
    out = two_seeds / "tamper"
    res = json.loads((out / "results.json").read_text())
    seeds = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (5, 6)]
    assert res["seeds"] == ["seed-5", "seed-6"] and set(res["models"]) == {"mle", "conditional"}  # masking: absent
    for name, c in res["models"].items():
        for i, point in enumerate(c["points"]):
            means = [s["models"][name]["points"][i]["misalignment_mean"] for s in seeds]
            assert point["misalignment_mean"] == pytest.approx(np.mean(means))
            for key in ("heldout_bits_per_char", "heldout_aligned_bits_per_char"):
                assert point[f"{key}_per_seed"] == [s["models"][name]["points"][i][key] for s in seeds]
        assert c["to_reference_level_per_seed"] == [s["models"][name]["to_reference_level"]["tokens"] for s in seeds]
    assert res["models"]["mle"]["to_reference_level"]["tokens"] == 0
    assert seeds[0]["settings"]["seed"] == 0 and seeds[1]["settings"]["seed"] == 1  # each seed samples its own
    assert "over 2 seeds" in printed and "(per seed: 0, 0)" in printed and (out / "tamper.png").exists()
    page = (two_seeds / "report.html").read_text()  # the run's report shows the curves beside its arms
    assert "report:" in printed and "Tamper resistance" in page and "2 seeds" in page
    stamps = [(out / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (5, 6)]
    main(args)  # the finished seeds are reused
    assert [(out / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (5, 6)] == stamps
    assert json.loads((out / "results.json").read_text())["models"]["mle"]["points"][0]["misalignment_mean"] == \
        res["models"]["mle"]["points"][0]["misalignment_mean"]


@pytest.mark.parametrize("extra, message", [
    (["--arms", "conditional"], "has no mle run with a checkpoint in every seed"),
    (["--model", "x"], "needs --run DIR (a demo or sweep folder) or --model (repeatable), not both"),
])
def test_a_run_without_the_reference_or_with_models_too_is_one_line(two_seeds, capsys, extra, message):
    from phf.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", "probe", "tamper", "--run", str(two_seeds), "--steps", "0", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


def test_a_seed_measured_before_a_figure_existed_combines_without_it():
    """A finished seed is reused as it was recorded: a figure later seeds measure (held-out bits/char on the
    aligned segments) is left out of the combined points rather than failing the combination."""
    def curve(aligned: bool) -> dict:
        point = {"step": 0, "tokens": 0, "scores": [0.1, 0.2], "heldout_bits_per_char": 2.0}
        if aligned:
            point["heldout_aligned_bits_per_char"] = 1.9
        return {"mle": {"arm": "mle", "model": "m", "points": [point], "to_reference_level": {"tokens": 0}}}

    for seeds in ([curve(True), curve(False)], [curve(False), curve(True)]):
        [point] = combine_curves(seeds, np.random.default_rng(0))["mle"]["points"]
        assert point["heldout_bits_per_char_per_seed"] == [2.0, 2.0]
        assert "heldout_aligned_bits_per_char" not in point
    [point] = combine_curves([curve(True), curve(True)], np.random.default_rng(0))["mle"]["points"]
    assert point["heldout_aligned_bits_per_char_per_seed"] == [1.9, 1.9]
