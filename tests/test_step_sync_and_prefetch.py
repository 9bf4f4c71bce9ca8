"""The training step on a GPU's terms, proved on the CPU: it reads nothing back from the device (the check fails
when a step does), a skipped update changes nothing, the batch thread gives the same batches and always ends,
compile covers the loss, and the run says what it chose for its device."""
import json
import logging
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from phf.core.errors import PhfError
from phf.data.tokenizer import load_tokenizer
from phf.model.lm import build_model
from phf.training.distributed import Dist
from phf.training.host_sync import HostSyncError, no_host_sync
from phf.training.prefetch import Prefetcher
from phf.training.trainer import (
    choose_fused_loss,
    compile_step_loss,
    make_step_loss,
    make_trainable,
    prepare_data,
    run_steps,
    run_training,
    step_batches,
    step_unless_skipped,
    to_device,
    train_step,
)

CPU = torch.device("cpu")


def _setup(cfg, data_dir):
    data = prepare_data(cfg, data_dir, progress=False)
    tok = load_tokenizer(data.tokenizer_file)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.get_vocab_size(), tok.eos_id)
    heads = data.objective.attach(model)
    t = make_trainable(model, data.objective, cfg.train, CPU, heads=heads)
    return data, t, step_batches(data.streams["train"], cfg.model.block_size, cfg.train, Dist())


@pytest.mark.parametrize("objective, fused", [("mle", "false"), ("unlikelihood", "true"), ("awr", "false")])
def test_a_training_step_reads_nothing_back_from_the_device(objective, fused, tiny_cfg_factory, data_dir):
    cfg = tiny_cfg_factory(objective, [f"train.fused_loss={fused}", "train.grad_accum=2"])
    data, t, make = _setup(cfg, data_dir)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with no_host_sync(CPU) as reads:
        for step in range(2):
            loss, grad_norm, updated = train_step(t, data.objective, [to_device(b, CPU) for b in make(step)],
                                                  cfg.train, Dist(), CPU)
    assert reads.reads == []
    assert all(isinstance(v, torch.Tensor) for v in (loss, grad_norm, updated))
    assert bool(updated) and torch.isfinite(loss) and grad_norm > 0  # read here, after the steps
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_the_check_fails_a_step_that_reads_a_value(tiny_cfg_factory, data_dir):
    cfg = tiny_cfg_factory("mle")
    data, t, make = _setup(cfg, data_dir)
    plain = t.step_loss
    batches = [to_device(b, CPU) for b in make(0)]
    for read, name in ((lambda v: v.item(), "Tensor.item()"), (lambda v: bool(v > 0), "bool(tensor)"),
                       (lambda v: float(v), "float(tensor)"), (lambda v: v.tolist(), "Tensor.tolist()")):
        def reading_loss(*args, read=read):
            value = plain(*args)
            read(value)  # what a loss logged in the step would do
            return value

        t.step_loss = reading_loss
        with pytest.raises(HostSyncError, match=name.replace("(", r"\(").replace(")", r"\)")):
            with no_host_sync(CPU):
                train_step(t, data.objective, batches, cfg.train, Dist(), CPU)


def test_run_steps_prepares_batches_ahead_without_a_host_read(tiny_cfg_factory, data_dir):
    cfg = tiny_cfg_factory("conditional")
    data, t, make = _setup(cfg, data_dir)
    out = run_steps(t, make, cfg.train, CPU, steps=range(3), check_sync=True)
    assert out["steps"] == 3 and out["tokens"] == 3 * cfg.train.batch_size * cfg.model.block_size
    assert out["tokens_per_s"] > 0 and out["loss"] > 0
    assert not [th for th in threading.enumerate() if th.name == "phf-batches"]


def _adamw_after(found: list[bool | None]):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    for i, ok in enumerate(found):
        layer(torch.randn(2, 4, generator=torch.Generator().manual_seed(i))).sum().backward()
        if ok is None:
            opt.step()
        else:
            step_unless_skipped(opt, torch.tensor(ok))
        opt.zero_grad(set_to_none=True)
    return layer.weight.detach().clone(), opt.state_dict()["state"]


def test_a_skipped_update_changes_no_weight_and_no_optimizer_state():
    w_plain, s_plain = _adamw_after([None, None])
    w_ok, s_ok = _adamw_after([True, True])
    assert torch.equal(w_plain, w_ok) and all(torch.equal(s_plain[0][k], s_ok[0][k]) for k in s_plain[0])
    w_one, s_one = _adamw_after([True])
    w_skip, s_skip = _adamw_after([True, False])
    assert torch.equal(w_one, w_skip)
    assert all(torch.equal(s_one[0][k], s_skip[0][k]) for k in s_one[0])  # moments and step count too


def test_a_non_finite_run_stops_with_one_line_before_any_checkpoint(tiny_cfg_factory, data_dir, tmp_path):
    # an absurd learning rate: the first update overflows the weights, every later step's loss is not finite
    cfg = tiny_cfg_factory("mle", ["train.lr=1e30", "train.max_steps=20", "train.log_every=10",
                                   "train.checkpoint_every=8"])
    with pytest.raises(PhfError, match=r"^5 consecutive steps with a non-finite loss at step 5; lower train.lr"):
        run_training(cfg, tmp_path / "run", data_dir, progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_batches_prepared_ahead_train_the_same_weights_and_the_run_says_its_choices(tiny_cfg_factory, data_dir,
                                                                                    tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="phf.training.trainer")
    runs = {}
    for prefetch in ("true", "false"):
        cfg = tiny_cfg_factory("conditional", ["train.max_steps=3", f"train.prefetch={prefetch}",
                                               "train.grad_accum=2"])
        runs[prefetch] = run_training(cfg, tmp_path / prefetch, data_dir, progress=False)
    wa = load_file(str(runs["true"].checkpoint / "model.safetensors"))
    wb = load_file(str(runs["false"].checkpoint / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    choices = json.loads((tmp_path / "true" / "run.json").read_text())["device_choices"]
    assert choices == {"device": "cpu", "dtype": choices["dtype"], "tf32": False, "fused_adamw": True,
                       "compile": False, "fused_loss": False, "attention": "sdpa", "prefetch": "thread"}
    assert json.loads((tmp_path / "false" / "run.json").read_text())["device_choices"]["prefetch"] == "in line"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on cpu:")]
    assert lines[0].endswith("eager, plain loss, sdpa attention, batches prepared ahead")
    assert not [th for th in threading.enumerate() if th.name == "phf-batches"]


def test_the_batch_thread_ends_on_an_error_an_interrupt_and_an_early_stop():
    def make(step):
        if step == 3:
            raise ValueError("no batch 3")
        return [step]

    with pytest.raises(ValueError, match="no batch 3"):
        with Prefetcher(make, range(10)) as source:
            for step in range(10):
                assert source.get(step) == [step]
    assert not source.alive
    with pytest.raises(KeyboardInterrupt):
        with Prefetcher(lambda s: [s], range(10**6)) as source:
            source.get(0)
            time.sleep(0.3)  # the thread fills its queue and blocks
            raise KeyboardInterrupt
    assert not source.alive
    source = Prefetcher(lambda s: [s], range(10**6), depth=1)
    assert source.get(0) == [0]
    source.close()  # the loop stopped early (train.max_seconds, early stopping)
    assert not source.alive


def test_the_fused_loss_is_chosen_where_the_logits_would_not_fit(tiny_cfg_factory):
    tcfg = tiny_cfg_factory("mle").train
    assert tcfg.fused_loss == "auto" and tcfg.compile == "auto" and tcfg.prefetch == "auto"
    assert not choose_fused_loss(tcfg, CPU, vocab=8192, block=256, sharded=False)  # the demo's shape
    tcfg.batch_size = 10**9  # (tokens x vocabulary) logits beyond any machine's memory
    assert choose_fused_loss(tcfg, CPU, vocab=8192, block=256, sharded=False)
    assert not choose_fused_loss(tcfg, CPU, vocab=8192, block=256, sharded=True)
    tcfg.fused_loss = True
    assert choose_fused_loss(tcfg, CPU, vocab=8192, block=256, sharded=False)


@pytest.mark.parametrize("fused", [False, True])
def test_compile_covers_the_forward_and_the_loss_in_one_graph(fused, tiny_cfg_factory, data_dir):
    cfg = tiny_cfg_factory("mle")
    data, t, make = _setup(cfg, data_dir)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
                       if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    step_loss = make_step_loss(t.model, data.objective, fused, "fp32", CPU)
    x, y, s, types = make(0)[0]
    loss = compile_step_loss(step_loss, t.model, backend=recording_backend)(x, y, s, types)
    loss_op = "autograd_function_apply" if fused else "cross_entropy"
    assert len(graphs) == 1 and "scaled_dot_product_attention" in graphs[0] and loss_op in graphs[0], graphs
    assert torch.allclose(loss, step_loss(x, y, s, types))
    compiled = make_trainable(t.model, data.objective, tiny_cfg_factory("mle", ["train.compile=true"]).train, CPU)
    assert compiled.compiled and getattr(compiled.step_loss, "_torchdynamo_orig_callable", None) is not None
    torch._dynamo.reset()


def test_a_compiled_step_trains_like_the_eager_one(tiny_cfg_factory, data_dir):
    """torch.compile (inductor) over forward and fused loss, in the run's precision: the same losses, up to
    float rounding, and no recompilation or graph break on the way (the log would say; the speed would show)."""
    losses = {}
    for compiled in ("false", "true"):
        cfg = tiny_cfg_factory("mle", ["train.fused_loss=true", f"train.compile={compiled}"])
        data, t, make = _setup(cfg, data_dir)
        assert t.compiled == (compiled == "true")
        losses[compiled] = [run_steps(t, make, cfg.train, CPU, steps=range(step, step + 1))["loss"]
                            for step in range(2)]
    torch._dynamo.reset()
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
