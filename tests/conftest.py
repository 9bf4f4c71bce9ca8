"""Shared fixtures: a small, real Python corpus made from files shipped with the tests, and tiny models."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from phf.tasks import get_task  # noqa: E402

DATA = Path(__file__).parent / "data"


def tiny_overrides(source: str) -> list[str]:
    return [f"corpus.source={source}", "corpus.exclude=", "corpus.validation_fraction=0.2",
            "corpus.test_fraction=0.2", "scoring.workers=1", "scoring.shard_documents=4",
            "tokenizer.vocab_size=400", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=64", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2",
            "train.warmup_fraction=0", "train.eval_tokens=256", "train.threads=1", "train.log_every=1",
            "sample.num_samples=8", "sample.num_prompts=4", "sample.max_new_tokens=24", "sample.batch_size=8",
            "eval.heldout_chars=2000"]


@pytest.fixture(scope="session")
def pycorpus(tmp_path_factory) -> Path:
    """A folder of real Python files (shipped in tests/data), with a few deliberate PEP8 violations among them."""
    dst = tmp_path_factory.mktemp("pycorpus")
    shutil.copytree(DATA / "pycorpus", dst, dirs_exist_ok=True)
    return dst


@pytest.fixture(scope="session")
def tiny_cfg_factory(pycorpus):
    def make(objective: str = "mle", extra: list[str] | None = None):
        return get_task("pep8").run_config(objective, tiny_overrides(str(pycorpus)) + (extra or []))

    return make


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")
