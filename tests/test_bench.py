"""`phf bench`: the benchmarks folder beside the package, and the device benchmarks' code path at a tiny shape on
the CPU (the figures themselves are measured, never asserted)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest


def test_an_installed_phf_without_its_checkout_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    import phf.cli.bench
    from phf.cli.main import main

    monkeypatch.setattr(phf.cli.bench, "CHECKOUT", tmp_path)  # a site-packages folder: phf/, no benchmarks/
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "train", "--quick"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "benchmarks/ folder of a source checkout" in err and "python -m phf bench" in err


def test_device_benchmarks_on_a_machine_without_the_device_are_one_line_errors(capsys):
    import torch

    from phf.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv, says in ((["bench", "train", "--device", "cuda"], "sees no CUDA GPU"),
                       (["bench", "score", "--device", "cpu"], "measures training and sampling")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


@pytest.fixture
def one_thread():
    """One torch thread, as the suite's other training tests: two threads on a busy 2-core machine wait on each
    other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_device_benchmarks_run_phf_and_every_reference_at_a_tiny_shape(tmp_path, one_thread):
    """phf bench train|sample --device cpu --quick, without the compiled contenders (compiling takes minutes on
    a CPU): every contender measured, phf's ratios to the references, one JSON, the table."""
    from phf.cli.bench import load_benchmark

    train, sample = load_benchmark("paper_train"), load_benchmark("paper_sample")
    shape = load_benchmark("paper_shape")
    figures = {"machine": shape.machine("cpu")}
    out = tmp_path / "figures.json"
    t = train.run("cpu", True, "compiled", out, figures)
    assert set(t["contenders"]) == {"phf_eager", "plain_eager", "hf_trainer"}
    for c in t["contenders"].values():
        assert c["tokens_per_s"] > 0 and 0 < c["mfu"] < 1 and c["steps_timed"] >= 1, c
    assert t["contenders"]["phf_eager"]["parameters"] == t["contenders"]["plain_eager"]["parameters"]
    assert set(t["ratios"]) == {"phf_eager/plain_eager", "phf_eager/hf_trainer"}

    assert sample.phf_decoders()[0] == "auto" and {"gpt2", "hf"} <= set(sample.phf_decoders())
    s = sample.run("cpu", True, "compiled,phf_gpt2,phf_hf,phf_static-", out, figures, isolated=False)
    assert list(s["contenders"]) == ["phf_auto", "generate", "phf_static"]
    for c in s["contenders"].values():
        assert set(c["shapes"]) == {"4x8", "8x16"}
        assert c["shapes"]["8x16"]["tokens"] == 8 * 16 and c["shapes"]["8x16"]["tokens_per_s"] > 0
    assert 1 <= s["nucleus_median"] < 100  # peaked, as a trained model's distributions are: not the whole vocabulary
    assert set(s["ratios"]) == {f"phf_{d}/generate at {shape}" for d in ("auto", "static") for shape in ("4x8", "8x16")}

    assert json.loads(out.read_text())["sample"]["ratios"] == s["ratios"]  # written after each contender
    table = shape.format_ratios(figures)
    assert "phf_eager/hf_trainer" in table and "phf_auto 8x16" in table and "tokens/s" in table


def test_a_sampler_stopped_by_its_budget_is_reported_with_the_rate_it_stayed_below(tmp_path):
    from phf.cli.bench import load_benchmark

    sample = load_benchmark("paper_sample")
    records = tmp_path / "phf_auto.jsonl"
    finished = {"shape": "64x256", "tokens": 16384, "calls": 2, "tokens_per_s": 9000.0}
    records.write_text(json.dumps(finished) + "\n" + json.dumps({"shape": "4096x640", "started": time.time() - 80})
                       + "\n")
    out = sample.read_records(records, None, [(64, 256), (4096, 640), (8192, 640)])
    assert out["shapes"]["64x256"]["tokens_per_s"] == 9000.0
    status = out["shapes"]["4096x640"]["status"]
    assert status.startswith("did not finish within the budget (80 s")  # 80 s before the records were read
    below = float(status.split("under ")[1].split(" tokens/s")[0].replace(",", ""))
    assert 4096 * 640 / 82 < below <= 4096 * 640 / 80
    assert out["shapes"]["8192x640"]["status"] == "not started: the budget was spent"
    crashed = sample.read_records(tmp_path / "none.jsonl", "torch.OutOfMemoryError: CUDA out of memory", [(64, 256)])
    assert crashed["error"].startswith("torch.OutOfMemoryError")
    assert "out of memory" in crashed["shapes"]["64x256"]["status"]


def test_the_gpu_check_script_parses_and_explains_itself():
    """benchmarks/gpu_check.sh: valid bash, --help says what it does, an unknown argument is one line (the whole
    script runs in `bash benchmarks/gpu_check.sh --device cpu --quick`, a minute or more: not in the suite)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--wheels DIR" in usage.stdout and "--device cpu --quick" in usage.stdout
    wrong = subprocess.run(["bash", str(script), "--gpus", "2"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "gpu_check: unknown argument --gpus (see --help)"
