"""The conditioning check: a conditional, tagging or masking run refuses to start, in one line, when its token stream lacks
the control tokens or masks it needs, or holds them at a rate far from the scored corpus' misaligned share."""
import json

import pytest

from phf.core.errors import PhfError
from phf.core.tokens import ALIGNED, HIDDEN, MISALIGNED
from phf.data.token_stream import check_conditioning, corpus_shares, is_far
from phf.data.tokenizer import load_tokenizer
from phf.tasks import score_run_corpus
from phf.training.trainer import prepare_data


@pytest.mark.parametrize("name", ["conditional", "tagging", "masking", "masking-hidden"])
def test_the_shipped_settings_pass_the_check(tiny_cfg_factory, data_dir, name):
    data = prepare_data(tiny_cfg_factory(name), data_dir, progress=False)
    shares = corpus_shares(data.scored, 0.0)
    assert 0.02 < shares.segment_share < 0.95  # the test corpus has misaligned lines (3%) to condition on
    if name == "masking-hidden":
        assert data.streams["train"].meta[f"tokens_{HIDDEN}"] > 0
        assert load_tokenizer(data.tokenizer_file).token_to_id(HIDDEN) is not None


@pytest.mark.parametrize("name", ["conditional", "tagging", "masking", "masking-hidden"])
def test_a_threshold_above_every_score_refuses_to_train(tiny_cfg_factory, data_dir, name):
    cfg = tiny_cfg_factory(name, ["objective.threshold=1000"])
    with pytest.raises(PhfError, match="objective.threshold=1000 is at or above every segment score") as err:
        prepare_data(cfg, data_dir, progress=False)
    assert "\n" not in str(err.value) and "objective.check_conditioning=false" in str(err.value)
    # on purpose: the check can be turned off
    prepare_data(tiny_cfg_factory(name, ["objective.threshold=1000", "objective.check_conditioning=false"]),
                 data_dir, progress=False)


def test_a_tokenizer_that_splits_the_control_tokens_refuses_to_train(tiny_cfg_factory, data_dir, tmp_path):
    # a tokenizer with the control tokens in its vocabulary but not as special tokens: its pre-tokenizer cuts
    # "<|aligned|>" into pieces, so the stream holds none although every lookup of the token succeeds
    good = load_tokenizer(prepare_data(tiny_cfg_factory("mle"), data_dir, progress=False).tokenizer_file)
    spec = json.loads(good.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in (ALIGNED, MISALIGNED)]
    spec["model"]["vocab"]["unused-token"] = len(spec["model"]["vocab"])  # not the run's own BPE any more
    path = tmp_path / "split" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(spec))
    cfg = tiny_cfg_factory("conditional", [f"tokenizer.path={path}"])
    with pytest.raises(PhfError, match="holds no control token .* splits <\\|aligned\\|> into pieces"):
        prepare_data(cfg, data_dir, progress=False)


def test_a_drop_fraction_of_one_refuses_to_train(tiny_cfg_factory, data_dir):
    with pytest.raises(PhfError, match="drop_token_fraction=1 gives no segment a control token"):
        prepare_data(tiny_cfg_factory("conditional", ["objective.drop_token_fraction=1"]), data_dir, progress=False)


def test_a_stream_written_from_other_scores_refuses_to_train(tiny_cfg_factory, data_dir):
    data = prepare_data(tiny_cfg_factory("conditional"), data_dir, progress=False)
    # the corpus scored again by a scorer that flags every line: the stream's labels no longer match its scores
    rescored = score_run_corpus(tiny_cfg_factory("conditional", ["scoring.scorer=tests.helpers:always_misaligned"]),
                                data_dir, progress=False)
    assert corpus_shares(rescored, 0.0).segment_share == 1.0
    for name in ("conditional", "tagging", "masking"):
        d = data if name == "conditional" else prepare_data(tiny_cfg_factory(name), data_dir, progress=False)
        with pytest.raises(PhfError, match="written from other scores .* delete"):
            check_conditioning(d.objective, d.streams["train"], rescored, 0.0)


def test_far_means_outside_half_to_twice_and_beyond_the_noise_of_a_tiny_corpus():
    assert not is_far(0.30, 0.31, 10_000)
    assert is_far(0.10, 0.31, 10_000) and is_far(0.70, 0.31, 10_000)
    assert not is_far(0.20, 0.31, 10_000)  # within half to twice
    assert not is_far(0.0, 0.01, 10_000)  # a gap below 2 points: a rare label, not a broken stream
    assert not is_far(0.05, 0.20, 20)  # 20 segments: two standard errors are 18 points
    assert is_far(0.0, 0.20, 10_000)
    assert not is_far(0.0, 0.0, 100)
