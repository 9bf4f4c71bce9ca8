"""`phf probe guidance`: a conditional model's misalignment, KL from MLE and held-out bits/char per guidance
strength; guidance 0 reproduces the plain measurements, and the curve lands in the folder's report."""
import json

import pytest

from phf.core.errors import PhfError


@pytest.fixture(scope="module")
def demo_like(tiny_cfg_factory, data_dir, tmp_path_factory):
    """mle and conditional runs side by side, as `phf demo` leaves them, with a results.json of their figures."""
    from phf.training.trainer import run_training

    root = tmp_path_factory.mktemp("guidance")
    objectives = {}
    for objective in ("mle", "conditional"):
        cfg = tiny_cfg_factory(objective, ["train.max_steps=12", "sample.max_new_tokens=32"])
        run_training(cfg, root / objective, data_dir, progress=False)
        objectives[objective] = {"misalignment_mean": 0.05, "heldout_bits_per_char": 3.0, "run_dir": objective}
    (root / "results.json").write_text(json.dumps({"task": "pep8", "objectives": objectives}))
    return root


def test_the_curve_starts_at_the_plain_measurements_and_enters_the_report(demo_like, capsys):
    from phf.analysis.probes import load, run_config, scored_corpus_for
    from phf.cli.main import main
    from phf.data.segments import get_segmenter
    from phf.evaluation.evaluate import heldout_bits_per_char
    from phf.evaluation.kl import DeployedModel, KLReference

    main(["-q", "probe", "guidance", "--run", str(demo_like), "--strengths", "0,2", "--num-samples", "16",
          "--kl-samples", "8", "--heldout-chars", "3000"])
    printed = capsys.readouterr().out
    res = json.loads((demo_like / "guidance" / "results.json").read_text())
    assert (demo_like / "guidance" / "guidance.png").exists() and "KL from mle" in printed
    plain, guided = res["curve"]
    assert [plain["guidance"], guided["guidance"]] == [0.0, 2.0]
    for row in res["curve"]:
        assert row["misalignment_ratio_ci95"] is not None and row["misalignment_mean_ci95"] is not None
        assert len(res["per_replicate"][0]["points"][0]["scores"]) == 16

    m = load(demo_like / "conditional")
    cfg = run_config(m.folder)
    scored = scored_corpus_for(m.folder, cfg)
    direct = heldout_bits_per_char(m.model, m.backend, scored.documents("test"), m.deployment,
                                   get_segmenter("lines"), 3000, progress=False, bf16=False)
    assert plain["heldout_bits_per_char"] == pytest.approx(direct["heldout_bits_per_char"], rel=1e-6)
    ref = KLReference.sample(demo_like / "mle" / "checkpoint", 8, cfg.eval.kl_max_new_tokens, cfg.eval.kl_seed,
                             "lines", progress=False)
    kl = ref.kl(DeployedModel.load(demo_like / "conditional" / "checkpoint"))
    assert plain["kl_from_reference_bits"] == pytest.approx(kl["kl_from_reference_bits"], rel=1e-5)
    # guidance changes the distribution both log-likelihoods are taken under (a 12-step model barely tells the
    # control tokens apart, so the change is small, but far above float noise)
    assert abs(guided["kl_from_reference_bits"] - plain["kl_from_reference_bits"]) > 1e-4
    assert abs(guided["heldout_bits_per_char"] - plain["heldout_bits_per_char"]) > 1e-4

    page = (demo_like / "report.html").read_text()
    assert "Guidance strength" in page and (demo_like / "figures" / "guidance.png").exists()


def test_a_model_without_conditional_training_and_an_empty_folder_are_refused(demo_like, tmp_path):
    from phf.analysis.guidance import GuidanceConfig, pairs_in, run_guidance

    with pytest.raises(PhfError, match="conditional training"):
        run_guidance(GuidanceConfig.of({"model": [demo_like / "mle"], "reference": [demo_like / "mle"],
                                        "out": tmp_path / "g", "strengths": [0, 1], "num_samples": 4,
                                        "kl_samples": 2, "heldout_chars": 500}))
    with pytest.raises(PhfError, match="no conditional and mle runs"):
        pairs_in(tmp_path)
    with pytest.raises(PhfError, match="one per --model"):
        GuidanceConfig.of({"model": [demo_like / "conditional"] * 2, "reference": [demo_like / "mle"] * 3,
                           "out": tmp_path / "g"})
    with pytest.raises(PhfError, match="unknown setting 'samples' of GuidanceConfig"):
        GuidanceConfig.of({"run": demo_like, "samples": 4})


def test_negative_or_missing_strengths_are_refused(demo_like, tmp_path):
    from phf.analysis.guidance import GuidanceConfig

    for strengths in ([-1.0, 1.0], [], [float("inf")], "1,strong"):
        with pytest.raises(PhfError, match="--strengths"):
            GuidanceConfig.of({"model": [demo_like / "conditional"], "reference": [demo_like / "mle"],
                               "out": tmp_path / "g", "strengths": strengths})


def test_the_command_line_asks_for_a_run_or_models_in_one_line(capsys):
    from phf.cli.main import main

    for args in ([], ["--model", "c"], ["--run", "r", "--model", "c"], ["--model", "c", "--reference", "m"]):
        with pytest.raises(SystemExit) as exc:
            main(["-q", "probe", "guidance", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("phf: error: give ") and err.count("\n") == 1
