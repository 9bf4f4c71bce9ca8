"""`phf probe ending`: how likely each model is to end a text at a segment boundary, and whether its sampler lets it.

On held-out documents (the test split of the scored corpus the model was trained on), each read as the model is
deployed (a conditional model reads `<|aligned|>` before every segment, as it writes it when sampling), at every
segment boundary that is also a token boundary:

    p_eos                   the model's probability of <|endoftext|> next
    p_eos_deployed          the same after the deployment's banned tokens are removed and the rest renormalised
    p_eos_sampled           the probability that the sampler draws <|endoftext|> there: the deployed distribution
                            after the nucleus (top_p of the run's sampling settings), with control tokens outside
                            the nucleus as the sampler treats them now
    p_eos_sampled_whole_nucleus   the same with control tokens inside the nucleus (the sampler before)
    p_control               the probability of a (non-banned) control token next
    p_eos_after_control     (conditional models) the probability of <|endoftext|> right after `<|aligned|>`: what
                            ending would take if a control token were emitted before the end-of-text decision

separately at the end of each document (the last boundary, where <|endoftext|> is the right answer; the
document's tail is read) and at the boundaries inside its opening (where it is not).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from phf.analysis.probes import load, run_config, scored_corpus_for
from phf.analysis.registry import Probe, ProbeConfig, register
from phf.core.errors import PhfError
from phf.core.io import write_json
from phf.core.run_folder import results_path
from phf.core.tokens import ALIGNED, CONTROL_TOKENS
from phf.data.segments import get_segmenter
from phf.data.token_stream import annotate_for_deployment
from phf.evaluation.sampling import nucleus_mask
from phf.model.conditioning import control_types, markers_of, type_inputs
from phf.model.decoding import context_length
from phf.tasks import task_for

log = logging.getLogger(__name__)


def nucleus_probs(probs: torch.Tensor, top_p: float, exempt: Sequence[int] = ()) -> torch.Tensor:
    """The distribution nucleus sampling draws from, (B, V) -> (B, V): the tokens of
    phf.evaluation.sampling.nucleus_mask (the smallest set of most likely tokens whose mass reaches `top_p`,
    `exempt` tokens outside the nucleus with their whole probability), renormalised."""
    if top_p >= 1.0:
        return probs / probs.sum(-1, keepdim=True)
    kept = probs * nucleus_mask(probs, top_p, list(exempt))
    return kept / kept.sum(-1, keepdim=True)


def document_windows(text: str, segmenter, deployment, tok, block: int) -> tuple[list[int], list[int], list[int],
                                                                                  list[int]]:
    """The document as the deployed model reads it, after <|endoftext|>: its opening (at most `block` tokens)
    with the positions of its segment boundaries, and its tail (the last `block` tokens) whose last position is
    the document's end. Returns (head ids, head boundary positions, tail ids, [tail end position])."""
    spans = segmenter(text)
    ann = annotate_for_deployment([text[a:b] for a, b in spans], [0.0] * len(spans), deployment)
    enc = tok.encode(ann.text, add_special_tokens=False)
    ids = [tok.eos_id] + list(enc.ids)
    ends = set()
    prefix = len(deployment.line_prefix or "")
    for start, (a, b) in zip(ann.seg_starts, spans):
        ends.add(start + prefix + b - a)
    # token i (1-based in ids) ends a segment when its last character is a segment's last
    boundaries = [i + 1 for i, (_, e) in enumerate(enc.offsets) if e in ends and (i + 1 == len(enc.offsets)
                                                                                  or enc.offsets[i + 1][0] >= e)]
    head = ids[:block]
    head_bounds = [p for p in boundaries if p < len(head) - 1]  # interior: the document goes on after them
    tail = ids[-block:]
    return head, head_bounds, tail, [len(tail) - 1]


@torch.no_grad()
def next_token_probs(model, rows: list[list[int]]) -> list[torch.Tensor]:
    """Next-token probabilities at every position of each row (right padded), (T_i, V) per row."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    x = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    markers = markers_of(model)
    typed = type_inputs(control_types(x, markers).to(device) if markers else None)
    logits = model(x.to(device), attention_mask=mask.to(device), **typed).logits.float()
    probs = torch.softmax(logits, -1).cpu()
    return [probs[i, :len(r)] for i, r in enumerate(rows)]


def ending_figures(probs: torch.Tensor, eos: int, banned: list[int], exempt: list[int], top_p: float,
                   temperature: float) -> dict[str, np.ndarray]:
    """Per boundary (rows of `probs`, the model's next-token distribution there): the figures of the module
    docstring except p_eos_after_control."""
    deployed = probs.clone()
    if banned:
        deployed[:, banned] = 0.0
    deployed = deployed / deployed.sum(-1, keepdim=True)
    tempered = deployed.clamp_min(1e-30).pow(1.0 / temperature) * (deployed > 0)
    tempered = tempered / tempered.sum(-1, keepdim=True)
    return {"p_eos": probs[:, eos].numpy(), "p_eos_deployed": deployed[:, eos].numpy(),
            "p_control": deployed[:, exempt].sum(-1).numpy() if exempt else np.zeros(len(probs)),
            "p_eos_sampled": nucleus_probs(tempered, top_p, exempt)[:, eos].numpy(),
            "p_eos_sampled_whole_nucleus": nucleus_probs(tempered, top_p)[:, eos].numpy()}


@dataclass(frozen=True)
class EndingConfig(ProbeConfig):
    """`phf probe ending`: the models and how many held-out documents to read."""
    model: tuple[str, ...] = field(metadata={"required": True, "append": True})
    """Model or run folder (repeat to compare)."""
    out: str = field(metadata={"required": True})
    """Folder for results.json."""
    num_docs: int = 64
    """Held-out test documents."""
    data_dir: str | None = None
    """Data folder of the scored corpus (default: from the run's run.json)."""
    batch_size: int = 8
    """Documents per forward pass."""

    def validate(self) -> None:
        if not self.model:
            raise PhfError("give at least one --model (a model folder or a run folder holding checkpoint/)")
        for name in ("num_docs", "batch_size"):
            if getattr(self, name) < 1:
                raise PhfError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def ending_probe(settings: EndingConfig, progress: bool = True) -> dict:
    """The ending figures of each model on the same held-out documents; writes `out/results.json`."""
    results: dict = {"probe": "ending", "num_docs": settings.num_docs, "models": {}}
    for path in settings.model:
        m = load(path)
        cfg = run_config(m.folder)
        scored = scored_corpus_for(m.folder, cfg, settings.data_dir)
        docs = [d.text for d in scored.documents("test") if d.text.strip()][:settings.num_docs]
        if not docs:
            raise PhfError(f"the scored corpus of {m.folder} has no test documents; score it with a test_fraction")
        inside, at_end, after_inside, after_end = boundary_figures(m, cfg, docs, settings.batch_size, progress)
        row = {"folder": str(m.folder), "objective": m.meta.get("objective", {}).get("name"),
               "deployment": {"sampling_prefix": m.deployment.sampling_prefix,
                              "banned_tokens": m.deployment.banned_tokens, "line_prefix": m.deployment.line_prefix},
               "top_p": cfg.sample.top_p, "temperature": cfg.sample.temperature,
               "document_end": {"boundaries": len(at_end.get("p_eos", [])),
                                **{k: float(np.mean(v)) for k, v in at_end.items()}},
               "inside": {"boundaries": len(inside.get("p_eos", [])),
                          **{k: float(np.mean(v)) if v else float("nan") for k, v in inside.items()}}}
        if m.deployment.conditional:
            row["document_end"]["p_eos_after_control"] = float(np.mean(after_end))
            row["inside"]["p_eos_after_control"] = float(np.mean(after_inside)) if after_inside else float("nan")
        name = row["objective"] or m.folder.parent.name
        results["models"][name if name not in results["models"] else str(m.folder)] = row
    write_json(results_path(settings.out), results)
    return results


def boundary_figures(m, cfg, docs: list[str], batch_size: int, progress: bool) -> tuple[dict, dict, list, list]:
    """The figures of `ending_figures` at each boundary inside the documents' openings and at their ends, and
    (conditional models) p(<|endoftext|>) right after the control token there."""
    tok = m.backend
    eos, segmenter = tok.eos_id, get_segmenter(task_for(cfg).segmenter)
    banned = [tok.token_to_id(t) for t in m.deployment.banned_tokens]
    exempt = [tok.token_to_id(t) for t in CONTROL_TOKENS
              if t not in m.deployment.banned_tokens] if m.deployment.conditional else []
    aligned = tok.token_to_id(ALIGNED)
    block = context_length(m.model)
    m.model.eval()
    inside: dict[str, list] = {}
    at_end: dict[str, list] = {}
    after_inside, after_end = [], []
    for b in tqdm(range(0, len(docs), batch_size), desc=f"ending ({m.folder.parent.name})", leave=False,
                  disable=not progress):
        windows = [document_windows(t, segmenter, m.deployment, tok, block - 1) for t in docs[b:b + batch_size]]
        # the tail gets the control token appended: its last position is the document's end, the one after it
        # is "right after <|aligned|>"
        tails = [w[2] + [aligned] if m.deployment.conditional else w[2] for w in windows]
        head_p = next_token_probs(m.model, [w[0] for w in windows])
        tail_p = next_token_probs(m.model, tails)
        for w, hp, tp in zip(windows, head_p, tail_p):
            for key, v in ending_figures(hp[w[1]], eos, banned, exempt, cfg.sample.top_p,
                                         cfg.sample.temperature).items():
                inside.setdefault(key, []).extend(v.tolist())
            for key, v in ending_figures(tp[w[3]], eos, banned, exempt, cfg.sample.top_p,
                                         cfg.sample.temperature).items():
                at_end.setdefault(key, []).extend(v.tolist())
            if m.deployment.conditional:
                # after the control token of the next segment: the token after a boundary in the head is the
                # control token, so the position of that token predicts what follows it
                after_inside.extend(hp[[p + 1 for p in w[1]], eos].tolist())
                after_end.append(float(tp[-1, eos]))
    return inside, at_end, after_inside, after_end


def format_ending(results: dict) -> str:
    keys = ("p_eos", "p_eos_deployed", "p_eos_sampled", "p_eos_sampled_whole_nucleus", "p_control",
            "p_eos_after_control")
    head = ["model", "where", "boundaries", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["models"].items():
        for where in ("document_end", "inside"):
            f = r[where]
            cells = [f"{f[k]:.4f}" if k in f else "-" for k in keys]
            lines.append("| " + " | ".join([name, where.replace("_", " "), str(f["boundaries"]), *cells]) + " |")
    return "\n".join(lines)


register(Probe(
    name="ending", config=EndingConfig, run=ending_probe,
    help="probability of <|endoftext|> at segment boundaries of held-out documents",
    show=lambda results, cfg: f"{format_ending(results)}\nresults: {results_path(cfg.out)}"))
