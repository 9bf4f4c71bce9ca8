"""`phf bench sample --device cuda`: phf's sampler beside transformers' `generate` on the paper's 124M model, at a
small shape (64 samples x 256 new tokens) and the paper's evaluation (4,096 samples x 640 new tokens), temperature
0.7, top-p 0.9, every row exactly N new tokens (phf: no end token; generate: min_new_tokens = max_new_tokens):

    phf_<decoder>               phf.evaluation.sampling.generate_ids with decoder auto and each decoder
                                phf.model.decoding offers (its DECODERS where it lists them, else FALLBACK_DECODERS)
    generate                    model.generate, its dynamic cache
    generate_static_compiled    model.generate with cache_implementation="static", compiled (transformers'
                                compile_config where it has one, else torch.compile of the forward)

The model: GPT-2 small at vocabulary 32,770 with random weights, saved once; its final layer norm's gain is raised
(LN_F_GAIN) so that its next-token distributions are peaked as a trained model's are, not flat (the figures record
the nucleus' median size). bf16 weights on a GPU, fp32 on a CPU; every sampler gets the same model.

Each sampler runs in a process of its own with a time budget (a slow one is stopped and reported as "did not
finish", with the rate it stayed below): per shape a small warm-up draw, a first call (which pays any compilation
or graph capture at that shape) and, when the first left time for it, a second; tokens_per_s is the last call's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.paper_shape import Shape, peak_memory_gb, ratios, save_partial, selected, shape, start_memory, sync

FALLBACK_DECODERS = ("gpt2", "hf")  # what make_decoder takes besides auto, where phf.model.decoding lists none
REFERENCES = ["generate", "generate_static_compiled"]
LN_F_GAIN = 8.0  # GPT-2 small, random weights: the nucleus at 0.7 / 0.9 holds 1-40 tokens, not ~22,000
NOTE = ("random weights with a peaked final norm; exactly N new tokens per row; tokens/s of the last call at "
        "each shape (the first pays compilation)")


def phf_decoders() -> list[str]:
    """auto, then every decoder name phf offers: phf.model.decoding.DECODERS (a registry, its keys) where it has
    one, else FALLBACK_DECODERS."""
    from phf.model import decoding

    names = list(getattr(decoding, "DECODERS", None) or FALLBACK_DECODERS)
    return ["auto", *(n for n in names if n != "auto")]


def contenders(skip: str = "") -> list[str]:
    """phf's default first, then the strongest reference, then the rest."""
    phf = [f"phf_{d}" for d in phf_decoders()]
    return selected([phf[0], "generate_static_compiled", "generate", *phf[1:]], skip)


def run(device: str, quick: bool, skip: str = "", out: Path | None = None, figures: dict | None = None,
        isolated: bool = True) -> dict:
    """Every sampler at the shape's sizes. `isolated`: each in a process of its own, stopped at its budget
    (in this process when False: no budget, for a quick check of the code path)."""
    s = shape(quick)
    names = contenders(skip)
    section = {"shape": describe(s), "note": NOTE, "contenders": {}}
    figures = figures if figures is not None else {}
    figures["sample"] = section
    with tempfile.TemporaryDirectory(prefix="phf-bench-") as tmp:
        folder = Path(tmp) / "model"
        model = peaked_model(s)
        section["nucleus_median"] = nucleus_median(model, s)
        model.save_pretrained(folder)
        del model
        for i, name in enumerate(names):
            if isolated:  # phf's default and the compiled reference first, with the longer budgets
                budget = s.sample_budgets[min(i, len(s.sample_budgets) - 1)]
                result = in_own_process(name, folder, device, s.sample_shapes, budget, Path(tmp))
            else:
                result = {"shapes": {}}
                for record in measure_sampler(name, folder, device, s.sample_shapes, float("inf")):
                    result["shapes"][record.pop("shape")] = record
            section["contenders"][name] = result
            section["ratios"] = sample_ratios(section["contenders"], names)
            save_partial(out, figures)
    return section


def describe(s: Shape) -> dict:
    m = s.cfg.model
    return {"name": s.name, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "vocab": s.vocab,
            "sizes": [f"{r}x{n}" for r, n in s.sample_shapes], "temperature": s.cfg.sample.temperature,
            "top_p": s.cfg.sample.top_p, "budget_s": list(s.sample_budgets),
            "summary": f"{s.name}: {m.n_layer} layers x {m.n_embd}, vocabulary {s.vocab:,}, "
                       f"{' and '.join(f'{r:,} x {n:,}' for r, n in s.sample_shapes)} new tokens"}


def sample_ratios(contenders: dict, names: list[str]) -> dict:
    """phf's tokens/s over each reference's, per size."""
    sizes = {size for c in contenders.values() for size in c.get("shapes", {})}
    out = {}
    for size in sorted(sizes, key=lambda z: int(z.split("x")[0])):
        at = {name: c.get("shapes", {}).get(size, {}) for name, c in contenders.items()}
        out.update({f"{k} at {size}": v for k, v in ratios(at, [n for n in names if n.startswith("phf_")],
                                                           [n for n in names if n in REFERENCES]).items()})
    return out


# -- the model ----------------------------------------------------------------------------------------------------
def peaked_model(s: Shape):
    from phf.model.lm import build_model

    torch.manual_seed(0)
    model = build_model(s.cfg.model, s.vocab, 0).eval()  # token 0: <|endoftext|> (paper_shape.synthetic_tokenizer)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(LN_F_GAIN)
    return model


@torch.no_grad()
def nucleus_median(model, s: Shape) -> float:
    """Median number of tokens in the top-p nucleus after 16 random prompts of 16 tokens."""
    x = torch.randint(0, s.vocab, (16, 16), generator=torch.Generator().manual_seed(0))
    p = torch.softmax(model(x).logits[:, -1].float() / s.cfg.sample.temperature, dim=-1)
    top = p.sort(dim=-1, descending=True).values
    return float(((top.cumsum(-1) - top) < s.cfg.sample.top_p).sum(-1).float().median())


def load(folder: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder).to(device=device, dtype=dtype).eval()


# -- the samplers -------------------------------------------------------------------------------------------------
def sampler(name: str, model, device: torch.device):
    """(draw, warm) of the contender `name`: draw(rows, new tokens) -> the number of new tokens drawn; warm(rows,
    new tokens) readies the sampler for that size without timing it."""
    if name.startswith("phf_"):
        from phf.core.runtime import inference_autocast
        from phf.evaluation.sampling import SamplingRequest, generate_ids

        decoder = name[len("phf_"):]
        g = torch.Generator(device=device).manual_seed(0)

        def draw(rows: int, n: int) -> int:
            with inference_autocast(device):  # as phf's own sampling runs generate_ids
                out = generate_ids(model, [[0]] * rows, SamplingRequest(n, -1, 0.7, 0.9), g, decoder=decoder)
            return sum(len(r) for r in out)  # end token -1: no row ends early
        return draw, lambda rows, n: draw(min(rows, 8), min(n, 8))  # a call at the size would be a timed one
    static = name == "generate_static_compiled"
    if static:
        compile_generate(model, device)

    def draw(rows: int, n: int, stop_after: int | None = None) -> int:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopAfter(StoppingCriteria):  # a warm-up at the size: the static cache's shape, a few steps
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), input_ids.shape[1] > stop_after, device=input_ids.device)

        ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                             min_new_tokens=n, temperature=0.7, top_p=0.9, top_k=0, pad_token_id=0, eos_token_id=0,
                             stopping_criteria=StoppingCriteriaList([StopAfter()] if stop_after else []),
                             **({"cache_implementation": "static"} if static else {}))
        return out[:, 1:].numel()
    return draw, lambda rows, n: draw(rows, n, stop_after=4)


def compile_generate(model, device: torch.device) -> None:
    """generate's compiled static-cache path: transformers' own (compile_config, reduce-overhead: CUDA graphs)
    where it has one, else torch.compile of the forward as its documentation showed before."""
    try:
        from transformers import CompileConfig
    except ImportError:
        model.forward = torch.compile(model.forward, mode="reduce-overhead" if device.type == "cuda" else "default")
        return
    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers compiles generate on a GPU only unless told
    model.generation_config.compile_config = config


def measure_sampler(name: str, folder: Path, device: str, sizes: list[tuple[int, int]], budget: float):
    """Yield one record per size: {"shape", "started"} when it starts, then its figures."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = load(folder, dev)
    draw, warm = sampler(name, model, dev)
    for rows, n in sizes:
        yield {"shape": f"{rows}x{n}", "started": time.time()}
        start_memory(dev)
        warm(rows, n)  # CUDA and library start-up; generate's compilation at this size
        calls = []
        while len(calls) < 2:
            sync(dev)
            t = time.perf_counter()
            tokens = draw(rows, n)
            sync(dev)
            calls.append(time.perf_counter() - t)
            if time.perf_counter() - t0 + calls[-1] > budget:  # no time left for another call
                break
        yield {"shape": f"{rows}x{n}", "tokens": tokens, "calls": len(calls),
               "seconds_first_call": round(calls[0], 3), "tokens_per_s_first_call": round(tokens / calls[0], 1),
               "tokens_per_s": round(tokens / calls[-1], 1), "peak_memory_gb": peak_memory_gb(dev)}


def in_own_process(name: str, folder: Path, device: str, sizes: list[tuple[int, int]], budget: float,
                   tmp: Path) -> dict:
    """measure_sampler in a fresh interpreter, stopped after `budget` seconds; a size it did not finish is
    reported with the rate it stayed below."""
    records = tmp / f"{name}.jsonl"
    spec = {"name": name, "folder": str(folder), "device": device, "sizes": sizes, "budget": budget,
            "records": str(records)}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.paper_sample", json.dumps(spec)], timeout=budget,
                              capture_output=True, text=True)
        error = None
        if done.returncode:
            error = (done.stderr.strip().splitlines() or [f"exited with status {done.returncode}"])[-1][:300]
    except subprocess.TimeoutExpired:
        error = None
    out = read_records(records, error, sizes)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def read_records(records: Path, error: str | None, sizes: list[tuple[int, int]]) -> dict:
    """A sampler process' figures per size; a size it started and did not finish gets `error`, or the budget's
    end with the rate it stayed below; one it did not start, the reason."""
    out: dict = {"shapes": {}}
    lines = [json.loads(x) for x in records.read_text().splitlines()] if records.exists() else []
    for record in lines:
        size = record.pop("shape")
        if "tokens_per_s" in record:
            out["shapes"][size] = record
        else:
            rows, n = map(int, size.split("x"))
            spent = max(time.time() - record["started"], 1e-9)
            out["shapes"][size] = {"status": error or f"did not finish within the budget ({spent:.0f} s at this size, "
                                   f"under {rows * n / spent:,.0f} tokens/s)"}
    if error and not out["shapes"]:
        out["error"] = error
    for rows, n in sizes:
        out["shapes"].setdefault(f"{rows}x{n}", {"status": error or "not started: the budget was spent"})
    return out


def worker(spec: dict) -> None:
    """The sampler's own process: its records appended to a file as they come, so a stopped run keeps them."""
    with open(spec["records"], "a") as f:
        for record in measure_sampler(spec["name"], Path(spec["folder"]), spec["device"],
                                      [tuple(z) for z in spec["sizes"]], spec["budget"]):
            f.write(json.dumps(record) + "\n")
            f.flush()


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
