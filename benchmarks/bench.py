"""`phf bench`: throughput figures measured on this machine, printed (never asserted in tests).

- score:  PEP8 scoring of real standard-library code, lines/s and MB/s, with 1 and with all worker processes
- train:  training tokens/s of the demo model (the shipped PEP8 config) on a real token stream
- sample: sampling tokens/s of phf, of the sampler before phf.model.decoding and of `transformers` `generate`,
          for the demo model and a ~14M model, plain and guided
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phf.core.config import CorpusConfig, ModelConfig, ObjectiveConfig, TrainConfig
from phf.core.errors import PhfError
from phf.core.runtime import allocator_state, release_free_memory
from phf.core.tokens import ALIGNED, EOS, MISALIGNED
from phf.data.corpus import Corpus
from phf.data.scorers import get_scorer
from phf.data.scoring import init_scoring_worker, measure_scoring, score_batch, throughput_line
from phf.data.sentences import sentence_spans
from phf.data.tokenizer import load_tokenizer
from phf.evaluation.sampling import SamplingRequest, generate_ids
from phf.model.lm import build_model, count_parameters
from benchmarks.bench_pipeline import PEAK_RSS_METHOD, bench_score_large, children_peak_rss_mb, peak_rss_mb, status_mb
from benchmarks.reference_sampler import generate_ids_before
from phf.tasks import all_sources, get_task
from phf.training.objectives import MLE
from phf.training.trainer import WindowDraw, autocast, get_batch, make_optimizer, prepare_data


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            # other processes competing for the cores change every figure: the 1-minute load average says how many
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def reset_peak_rss() -> None:
    """Start a benchmark's own peak resident memory (Linux: writing 5 to clear_refs resets VmHWM). Memory that
    earlier benchmarks freed is first handed back to the system: phf's allocator setting keeps it otherwise."""

    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def per_segment_chars_per_s(scorer, texts: list[str], budget_s: float) -> tuple[float, int]:
    """What the reference code did: the scorer called on one segment at a time (segments as the scorer cuts
    them), for at most `budget_s` seconds; characters scored per second and segments scored."""
    chars = n = 0
    t = time.perf_counter()
    for text in texts:
        for a, b in scorer.segment(text):
            scorer.score_texts([text[a:b]])
            chars += b - a
            n += 1
            if time.perf_counter() - t > budget_s:
                return chars / (time.perf_counter() - t), n
    return chars / max(time.perf_counter() - t, 1e-9), n


def bench_score(quick: bool) -> dict:
    reset_peak_rss()
    cfg = get_task("pep8").run_config("mle")
    docs = list(Corpus(CorpusConfig(**{**cfg.corpus.__dict__, "max_documents": 60 if quick else 300})))
    texts = [d.text for d in docs]
    chars = sum(len(t) for t in texts)
    lines = sum(t.count("\n") for t in texts)
    scorer = get_scorer("pep8")
    out = {"documents": len(texts), "lines": lines, "mb": round(chars / 1e6, 2)}
    t = time.perf_counter()
    scorer.score_texts(texts)
    dt = time.perf_counter() - t
    out.update(lines_per_s_1proc=round(lines / dt), mb_per_s_1proc=round(chars / 1e6 / dt, 3))
    rate, n = per_segment_chars_per_s(scorer, texts, 5 if quick else 20)
    out.update(mb_per_s_per_segment=round(rate / 1e6, 4), per_segment_lines_timed=n,
               speedup_vs_per_segment=round(out["mb_per_s_1proc"] / (rate / 1e6), 2))
    workers = os.cpu_count() or 1
    if workers > 1:

        chunks = [docs[i::workers * 4] for i in range(workers * 4)]
        with mp.get_context("fork").Pool(workers, initializer=init_scoring_worker, initargs=("pep8",)) as pool:
            t = time.perf_counter()
            pool.map(score_batch, chunks)
            dt = time.perf_counter() - t
        out.update({f"lines_per_s_{workers}proc": round(lines / dt), f"mb_per_s_{workers}proc": round(chars / 1e6 / dt, 3)})
        out["worker_peak_rss_mb"] = round(children_peak_rss_mb())
    out.update(peak_rss_mb=round(peak_rss_mb()), peak_rss_method=PEAK_RSS_METHOD)
    # the whole pipeline (`phf score`) on every core, on the large corpus the GPU demo scores
    with tempfile.TemporaryDirectory(prefix="phf-bench-score-") as tmp:
        large = get_task("pep8").run_config("mle", ["corpus.source=stdlib+site-packages",
                                                                   f"corpus.max_documents={300 if quick else 1500}"])
        out["pipeline"] = measure_scoring(large.corpus, large.scoring, Path(tmp), all_sources())
    return out


def _demo_data(tmp: Path, quick: bool):
    cfg = get_task("pep8").run_config("mle", ["corpus.max_documents=120"] if quick else [])
    return cfg, prepare_data(cfg, tmp, progress=False)


def peak_matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 6) -> float:
    """Measured peak of this machine: large square `torch.matmul`s in `dtype`, best of a few."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def train_flops_per_token(model, context: int) -> float:
    """6 x parameters (forward + backward of every weight) + attention scores and values, per token."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg.n_layer * context * cfg.n_embd


def _phf_loop(model, stream, objective, B: int, T: int, steps: int, warm: int, dtype: str, lr: float,
              compile: bool = False, fused: bool = False) -> float:
    """Tokens/s of phf's training step (the loop of phf/training/trainer.py without logging), after `warm` steps (which
    include the compilation with `compile`, as train.compile does); `fused`: train.fused_loss."""

    model.train()
    opt = make_optimizer(model, TrainConfig(lr=lr))
    fwd = torch.compile(model) if compile else model
    dev = torch.device("cpu")
    for step in range(steps + warm):
        if step == warm:
            t = time.perf_counter()
        x, y, s, _ = get_batch(stream, WindowDraw(T, B, 0), step, 0, dev)
        with autocast(dev, dtype):
            out = objective.forward(fwd, x, fused=fused)
        loss = objective.loss(out, y, s) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * B * T / (time.perf_counter() - t)


def _reference_trainer(model, stream, B: int, T: int, steps: int, warm: int, lr: float) -> float:
    """Tokens/s of the reference stack: a Hugging Face `Trainer` over the same GPT2LMHeadModel, data and batch."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Windows(torch.utils.data.Dataset):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.starts = rng.integers(0, len(stream) - T - 1, size=(steps + warm) * B)

        def __len__(self):
            return len(self.starts)

        def __getitem__(self, i):
            ids = torch.from_numpy(stream.tokens[self.starts[i]:self.starts[i] + T].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warm, warm + steps):
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=B, max_steps=steps + warm,
                                 learning_rate=lr, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", dataloader_num_workers=0, max_grad_norm=1.0,
                                 disable_tqdm=True, weight_decay=0.1)
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its metrics; stdout is for our figures
            Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Clock()]).train()
    return steps * B * T / (marks[warm + steps] - marks[warm])


def loss_memory_at_paper_vocabulary(vocab: int = 50257, context: int = 1024, batch: int = 4) -> dict:
    """Peak memory added by one forward and backward step of a 2-layer, width-128 model at the paper's vocabulary
    and context, with the plain loss and with train.fused_loss (the logits dominate the plain one); each in a
    process of its own, so neither inherits the other's freed memory."""
    out = {"loss_memory_shape": f"vocabulary {vocab:,}, batch {batch} x {context}, bf16"}
    for name in ("plain", "fused"):
        code = (f"from benchmarks.bench import loss_step_peak_mb; print(loss_step_peak_mb({name == 'fused'}, {vocab}, "
                f"{context}, {batch}))")
        out[f"loss_step_peak_mb_{name}"] = round(float(_python_last_line(code, "loss memory")))
    return out


def _python_last_line(code: str, what: str, args: tuple = (), env: dict | None = None) -> str:
    """Run `code` in a fresh Python process (a benchmark that must not share this one's memory or allocator) and
    return the last line it printed."""
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {what} benchmark's process failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def loss_step_peak_mb(fused: bool, vocab: int, context: int, batch: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=context), vocab, 0).train()
    objective = MLE(ObjectiveConfig(name="mle"))
    x = torch.randint(0, vocab, (batch, context))
    before = status_mb("VmRSS") or 0.0
    reset_peak_rss()
    with autocast(torch.device("cpu"), "bf16"):
        output = objective.forward(model, x, fused=fused)
    objective.loss(output, x, torch.zeros(x.shape)).backward()
    return peak_rss_mb() - before


def _train_steps(quick: bool) -> tuple[int, int]:
    return (6, 2) if quick else (30, 5)


def reference_process(data_dir: str, quick: bool, threads: int) -> None:
    """Entry of the reference stack's own process: prints its tokens/s as JSON (see `_reference_in_own_process`)."""

    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):
        cfg, data = _demo_data(Path(data_dir), quick)  # already prepared by the parent: read back, not rebuilt
        tok = load_tokenizer(data.tokenizer_file)
        torch.manual_seed(0)
        model = build_model(cfg.model, tok.get_vocab_size(), tok.token_to_id(EOS))
        steps, warm = _train_steps(quick)
        tps = _reference_trainer(model, data.streams["train"], cfg.train.batch_size, cfg.model.block_size, steps,
                                 warm, cfg.train.lr)
    print(json.dumps({"tokens_per_s": tps}))


def _reference_in_own_process(data_dir: Path, quick: bool) -> float:
    """The reference stack as it runs: a Python process of its own, glibc's allocator left at its defaults."""
    env = dict(os.environ, PHF_ALLOCATOR="default")
    code = "import sys; from benchmarks.bench import reference_process; reference_process(sys.argv[1], sys.argv[2] == '1', " \
           "int(sys.argv[3]))"
    line = _python_last_line(code, "reference", (data_dir, "1" if quick else "0", torch.get_num_threads()), env)
    return float(json.loads(line)["tokens_per_s"])


def bench_train(quick: bool, data_dir: Path) -> dict:
    """phf's training loop vs the reference stack on the demo model; MFU of a ~10M model against measured peaks.

    The reference runs as it would: in a process of its own with the default allocator. phf runs here, with the
    allocator settings `phf` applies at start-up (phf/core/runtime.py). So that the allocator's share of the difference
    is visible, the reference also runs here, with phf's allocator (`reference_same_allocator_tokens_per_s`)."""

    reset_peak_rss()
    cfg, data = _demo_data(data_dir, quick)
    tok = load_tokenizer(data.tokenizer_file)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    stream = data.streams["train"]
    B, T = cfg.train.batch_size, cfg.model.block_size
    steps, warm = _train_steps(quick)

    def phf(compile: bool = False, fused: bool = False) -> float:
        torch.manual_seed(0)
        return _phf_loop(build_model(cfg.model, vocab, eos), stream, data.objective, B, T, steps, warm,
                         cfg.train.dtype, cfg.train.lr, compile, fused)

    # phf is measured before and after the reference and averaged, so a load that changes meanwhile (other
    # processes on the machine) weighs on both sides alike
    phf_before = phf()
    ref_tps = _reference_in_own_process(data_dir, quick)
    phf_tps = (phf_before + phf()) / 2
    torch.manual_seed(0)
    demo_model = build_model(cfg.model, vocab, eos)
    out = {"threads": torch.get_num_threads(), "parameters": count_parameters(demo_model), "batch": B, "context": T,
           "dtype": cfg.train.dtype, "allocator": allocator_state(), "phf_tokens_per_s": round(phf_tps, 1),
           "reference_tokens_per_s": round(ref_tps, 1), "speedup_vs_reference": round(phf_tps / ref_tps, 3)}
    if allocator_state() != "default":
        same = _reference_trainer(demo_model, stream, B, T, steps, warm, cfg.train.lr)
        out.update(reference_same_allocator_tokens_per_s=round(same, 1),
                   speedup_vs_reference_same_allocator=round(phf_tps / same, 3))
    if not quick:  # train.fused_loss=true, and train.compile=true (its compilation not counted)
        out["phf_fused_loss_tokens_per_s"] = round(phf(fused=True), 1)
        out.update(loss_memory_at_paper_vocabulary())
        out["phf_compiled_tokens_per_s"] = round(phf(compile=True), 1)
        out["speedup_compiled_vs_reference"] = round(out["phf_compiled_tokens_per_s"] / ref_tps, 3)
    out["peak_bf16_gflops"] = round(peak_matmul_gflops(torch.bfloat16), 1)
    out["peak_fp32_gflops"] = round(peak_matmul_gflops(torch.float32), 1)
    big_cfg = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256)
    torch.manual_seed(0)
    big = build_model(big_cfg, vocab, eos)
    big_steps, big_warm = (3, 1) if quick else (10, 2)
    big_tps = _phf_loop(big, stream, data.objective, 8, 256, big_steps, big_warm, "bf16", 1e-3)
    achieved = big_tps * train_flops_per_token(big, 256) / 1e9
    out.update(mfu_model_parameters=count_parameters(big), mfu_model_tokens_per_s=round(big_tps, 1),
               mfu_model_gflops=round(achieved, 1), mfu_bf16=round(achieved / out["peak_bf16_gflops"], 3))
    # the same with one thread against the one-thread peak: how much of the MFU the second thread costs
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            peak1 = peak_matmul_gflops(torch.bfloat16)
            torch.manual_seed(0)
            tps1 = _phf_loop(build_model(big_cfg, vocab, eos), stream, data.objective, 8, 256, big_steps, big_warm,
                             "bf16", 1e-3)
        finally:
            torch.set_num_threads(threads)
        out.update(peak_bf16_gflops_1thread=round(peak1, 1), mfu_model_tokens_per_s_1thread=round(tps1, 1),
                   mfu_bf16_1thread=round(tps1 * train_flops_per_token(big, 256) / 1e9 / peak1, 3))
    out.update(peak_rss_mb=round(peak_rss_mb()), peak_rss_method=PEAK_RSS_METHOD)
    return out


def bench_sample(quick: bool, data_dir: Path) -> dict:
    """Sampling tokens/s of phf's decoder, of the sampler before it, and of `transformers` `generate`, with the same
    model, settings and batch, plain and guided; for the demo model (briefly trained, so that its next-token
    distributions are peaked as a trained model's are, not flat) and for a ~14M model."""
    cfg, data = _demo_data(data_dir, quick)
    reset_peak_rss()  # sampling only: data preparation is the training benchmark's
    tok = load_tokenizer(data.tokenizer_file)
    eos, aligned, misaligned = (tok.token_to_id(t) for t in (EOS, ALIGNED, MISALIGNED))
    torch.manual_seed(0)
    demo = build_model(cfg.model, tok.get_vocab_size(), eos)
    trained_steps = 20 if quick else 150
    _phf_loop(demo, data.streams["train"], data.objective, 8, cfg.model.block_size, trained_steps, 0, "fp32", 3e-3)
    torch.manual_seed(0)
    big = build_model(ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256), tok.get_vocab_size(), eos)
    new = 64 if quick else 200
    out = {"temperature": cfg.sample.temperature, "top_p": cfg.sample.top_p, "demo_train_steps": trained_steps,
           "models": {}}
    for name, model, batches, tokens in (("demo", demo, (64, 256), new), ("14m", big, (64,), 64 if quick else 100)):
        model.eval()
        figures = {"parameters": count_parameters(model), "new_tokens": tokens}
        for batch in batches:
            for guided in (False, True):
                for path in ("phf", "before", "generate"):
                    key = f"{path}_b{batch}{'_guided' if guided else ''}"
                    figures[key] = _sample_tokens_per_s(path, model, batch, tokens, guided, cfg.sample, eos,
                                                        aligned, misaligned)
        out["models"][name] = figures
    out.update(peak_rss_mb=round(peak_rss_mb()), peak_rss_method=PEAK_RSS_METHOD)
    return out


def _sample_tokens_per_s(path: str, model, batch: int, tokens: int, guided: bool, sample, eos: int, aligned: int,
                         misaligned: int) -> float:
    """Tokens/s of one sampler drawing `batch` samples of exactly `tokens` new tokens each (no early end) from
    <|endoftext|> (guided: <|endoftext|><|aligned|>, <|misaligned|> banned, guidance 1.0). path: phf (the current
    sampler), before (the sampler before phf.model.decoding), generate (`transformers` `generate`)."""
    prompt = [eos, aligned] if guided else [eos]
    g = torch.Generator().manual_seed(0)
    kwargs = dict(guidance=1.0, negative={aligned: misaligned}) if guided else {}
    banned = [misaligned] if guided else []

    def draw(rows: int, n: int) -> int:
        if path == "generate":
            ids = torch.tensor([prompt] * rows)
            extra = dict(guidance_scale=2.0, negative_prompt_ids=torch.tensor([[eos, misaligned]] * rows),
                         bad_words_ids=[[misaligned]]) if guided else {}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                                 min_new_tokens=n, temperature=sample.temperature, top_p=sample.top_p, top_k=0,
                                 pad_token_id=eos, eos_token_id=eos, **extra)
            return out[:, ids.shape[1]:].numel()
        if path == "before":
            rows_out = generate_ids_before(model, [prompt] * rows, n, -1, banned, sample.temperature, sample.top_p, g,
                                           **kwargs)
        else:
            request = SamplingRequest(n, -1, sample.temperature, sample.top_p, banned, **kwargs)
            rows_out = generate_ids(model, [prompt] * rows, request, g)
        return sum(len(r) for r in rows_out)  # eos -1: no row ends early

    draw(min(batch, 8), 8)  # warm-up
    t = time.perf_counter()
    n = draw(batch, tokens)
    return round(n / (time.perf_counter() - t), 1)


def bench_score_prose(quick: bool) -> dict:
    """Chars/s of the prose scorers on real Debian changelogs and copyright files, segmentation included, with one
    process: PII with scrubadub's regex detectors, PII with spaCy NER as well (if installed), toxicity."""
    reset_peak_rss()
    budget = 300_000 if quick else 2_000_000
    texts, chars = [], 0
    try:
        for doc in Corpus(CorpusConfig(source="debian", max_documents=400), all_sources()):
            texts.append(doc.text[:50_000])
            chars += len(texts[-1])
            if chars >= budget:
                break
    except PhfError as exc:
        return {"skipped": str(exc)}
    out = {"documents": len(texts), "mb": round(chars / 1e6, 2)}
    t = time.perf_counter()
    for text in texts:
        sentence_spans(text)
    out["sentences_chars_per_s"] = round(chars / (time.perf_counter() - t))
    for name in ("pii", "pii-ner", "toxicity"):
        try:
            scorer = get_scorer(name)
        except PhfError:
            out[f"{name}_chars_per_s"] = None  # the pii-ner extra is not installed
            continue
        sample = texts if name != "pii-ner" else texts[:max(1, len(texts) // 5)]  # NER is ~20x slower
        n = sum(len(x) for x in sample)
        t = time.perf_counter()
        scorer.score_texts(sample)
        out[f"{name}_chars_per_s"] = round(n / (time.perf_counter() - t))
        rate, _ = per_segment_chars_per_s(scorer, texts, 3 if quick else 10)
        out[f"{name}_chars_per_s_per_segment"] = round(rate)
    out.update(peak_rss_mb=round(peak_rss_mb()), peak_rss_method=PEAK_RSS_METHOD)
    return out


def run(what: str = "all", quick: bool = False, large: bool = False) -> dict:
    """`large`: also the scoring pipeline on generated 0.5 and 2 GB jsonl.zst corpora (20 and 80 MB with
    `quick`); minutes, and about the corpus' size in free disk space."""
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="phf-bench-") as tmp:
        if what in ("all", "score"):
            figures["score"] = bench_score(quick)
            figures["score_prose"] = bench_score_prose(quick)
            if large:
                figures["score_large"] = bench_score_large((0.02, 0.08) if quick else (0.5, 2.0), Path(tmp))
        if what in ("all", "train"):
            figures["train"] = bench_train(quick, Path(tmp))
        if what in ("all", "sample"):
            figures["sample"] = bench_sample(quick, Path(tmp))
    return figures


def format_figures(f: dict) -> str:
    m = f["machine"]
    lines = [f"machine: {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), {m['platform']}"
             + (f", 1-minute load average {m['load_average_1min']} when the benchmark started"
                if m.get("load_average_1min") is not None else "")]
    if "score" in f:
        s = f["score"]
        procs = sorted(int(k.rsplit("_", 1)[1][:-4]) for k in s if k.startswith("lines_per_s_"))
        lines.append(f"score  (pep8, {s['documents']} files, {s['lines']:,} lines, {s['mb']} MB): " + ", ".join(
            f"{s[f'lines_per_s_{n}proc']:,} lines/s ({s[f'mb_per_s_{n}proc']:.2f} MB/s) with {n} process"
            f"{'es' if n > 1 else ''}" for n in procs))
        lines.append(f"       one segment (line) at a time, as the reference code scored: {s['mb_per_s_per_segment']:.3f} "
                     f"MB/s, so batching per file is {s['speedup_vs_per_segment']:.1f}x faster; peak RSS "
                     f"{s['peak_rss_mb']} MB" + (f" (largest worker {s['worker_peak_rss_mb']} MB)"
                                                 if "worker_peak_rss_mb" in s else ""))
        if "pipeline" in s:
            lines.append(f"       `phf score` on {s['pipeline']['documents']:,} documents of {s['pipeline']['source']}: "
                         f"{throughput_line(s['pipeline'])}")
    if "score_prose" in f:
        s = f["score_prose"]
        if "skipped" in s:
            lines.append(f"score  (prose): skipped, {s['skipped']}")
        else:
            def rate(key: str) -> str:
                if s.get(key) is None:
                    return "not installed"
                return f"{s[key] / 1e3:,.0f}K chars/s" if s[key] >= 10_000 else f"{s[key]:,} chars/s"

            lines.append(f"score  (prose, {s['documents']} Debian changelogs and copyright files, {s['mb']} MB, "
                         f"1 process): pii {rate('pii_chars_per_s')}, pii-ner {rate('pii-ner_chars_per_s')}, "
                         f"toxicity {rate('toxicity_chars_per_s')}; sentence segmentation alone "
                         f"{rate('sentences_chars_per_s')}")
            lines.append("       one sentence at a time: " + ", ".join(
                f"{name} {rate(f'{name}_chars_per_s_per_segment')}" for name in ("pii", "pii-ner", "toxicity"))
                + f"; peak RSS {s['peak_rss_mb']} MB")
    if "score_large" in f:
        s = f["score_large"]
        lines.append(f"score  (the pipeline on generated jsonl.zst corpora of stdlib code, {s['scorer']}, "
                     f"{s['workers']} workers):")
        for gb, m in s["sizes"].items():
            lines.append(f"       {m['jsonl_mb']:,} MB of jsonl ({m['zst_mb']:,} MB compressed, {m['documents']:,} "
                         f"documents, {m['shards']:,} shards): {m['seconds']:,} s = {m['mb_per_s']} MB/s; peak RSS "
                         f"{m['peak_rss_mb']} MB (largest worker {m['worker_peak_rss_mb']} MB)")
    if "train" in f:
        t = f["train"]
        lines.append(f"train  ({t['parameters'] / 1e6:.2f}M params, batch {t['batch']} x {t['context']}, {t['dtype']}, "
                     f"{t['threads']} thread{'s' if t['threads'] != 1 else ''}): phf {t['phf_tokens_per_s']:,.0f} tokens/s, HF Trainer "
                     f"{t['reference_tokens_per_s']:,.0f} tokens/s in its own process ({t['speedup_vs_reference']:.2f}x)"
                     + (f"; phf with train.compile {t['phf_compiled_tokens_per_s']:,.0f} tokens/s "
                        f"({t['speedup_compiled_vs_reference']:.2f}x)" if "phf_compiled_tokens_per_s" in t else ""))
        if "reference_same_allocator_tokens_per_s" in t:
            lines.append(f"       allocator: {t['allocator']}; HF Trainer with the same allocator "
                         f"{t['reference_same_allocator_tokens_per_s']:,.0f} tokens/s "
                         f"({t['speedup_vs_reference_same_allocator']:.2f}x)"
                         + (f"; phf with train.fused_loss {t['phf_fused_loss_tokens_per_s']:,.0f} tokens/s"
                            if "phf_fused_loss_tokens_per_s" in t else ""))
        if "loss_step_peak_mb_plain" in t:
            lines.append(f"       memory of one training step at the paper's vocabulary ({t['loss_memory_shape']}): plain "
                         f"loss {t['loss_step_peak_mb_plain']:,} MB, train.fused_loss {t['loss_step_peak_mb_fused']:,} MB")
        lines.append(f"       peak matmul: bf16 {t['peak_bf16_gflops']:,.0f} GFLOP/s, fp32 {t['peak_fp32_gflops']:,.0f} "
                     f"GFLOP/s; {t['mfu_model_parameters'] / 1e6:.1f}M model: {t['mfu_model_tokens_per_s']:,.0f} "
                     f"tokens/s = {t['mfu_model_gflops']:,.0f} GFLOP/s = {100 * t['mfu_bf16']:.0f}% of bf16 peak; "
                     f"peak RSS {t['peak_rss_mb']} MB")
        if "mfu_bf16_1thread" in t:
            lines.append(f"       with 1 thread: bf16 peak {t['peak_bf16_gflops_1thread']:,.0f} GFLOP/s, "
                         f"{t['mfu_model_tokens_per_s_1thread']:,.0f} tokens/s = {100 * t['mfu_bf16_1thread']:.0f}% "
                         f"of the 1-thread bf16 peak")
    if "sample" in f:
        s = f["sample"]
        lines.append(f"sample (temperature {s['temperature']}, top-p {s['top_p']}; tokens/s of phf / the sampler "
                     f"before phf.model.decoding / transformers generate; guided: guidance 1.0, a negative row per "
                     f"sample; demo model trained {s['demo_train_steps']} steps first):")
        for name, m in s["models"].items():
            for key in sorted(k for k in m if k.startswith("phf_b")):
                setting = key[len("phf_"):]
                phf, before, gen = m[key], m[f"before_{setting}"], m[f"generate_{setting}"]
                lines.append(f"       {name} ({m['parameters'] / 1e6:.1f}M), batch {setting[1:].replace('_', ' ')}, "
                             f"{m['new_tokens']} new tokens: {phf:,.0f} / {before:,.0f} / {gen:,.0f} "
                             f"({phf / before:.1f}x before, {phf / gen:.1f}x generate)")
        demo = s["models"].get("demo", {})
        if "phf_b256" in demo and "before_b64" in demo:
            lines.append(f"       demo, each at its default batch (phf: all 256 samples at once; before: 64): "
                         f"{demo['phf_b256'] / demo['before_b64']:.1f}x")
        lines.append(f"       peak RSS {s['peak_rss_mb']} MB")
    lines.append(f"peak RSS: {PEAK_RSS_METHOD}")
    return "\n".join(lines)
