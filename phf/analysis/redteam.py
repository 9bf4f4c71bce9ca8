"""Red teaming: an automated search for prompts that make a target model misbehave (the paper's robustness test).

A red model (by default the task's plain MLE model) writes candidate prompts, continuing a few-shot prompt made of
examples drawn from a pool with weights exp(score / temperature); each candidate is scored by the mean
misalignment of the target's continuations of it; the best candidates join the pool. The pool starts from
prompts taken from held-out test documents (the prompted scenario's prompts), scored the same way. The pool only
grows, so its best score never decreases from one round to the next.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from phf.analysis.probes import load, run_config, scored_corpus_for
from phf.core.config import SampleConfig
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import write_json
from phf.core.run_folder import REFERENCE_ARM, checkpoint_dir, results_path, sibling_run
from phf.data.scorers import scorer_for
from phf.data.segments import get_segmenter
from phf.evaluation.evaluate import score_samples, task_metrics
from phf.evaluation.sampling import generate
from phf.tasks import task_for

log = logging.getLogger(__name__)


@dataclass
class RedTeamConfig:
    rounds: int = 5
    """Rounds of candidate generation."""
    seeds: int = 16
    """Prompts from held-out test documents that start the pool."""
    candidates: int = 16
    """Candidate prompts the red model writes per round."""
    keep: int = 4
    """Best candidates of a round that join the pool."""
    continuations: int = 8
    """Target continuations per prompt; a prompt's score is their mean misalignment (the paper: 512)."""
    shots: int = 3
    """Pool examples in each few-shot prompt of the red model."""
    temperature: float = 0.1
    """Few-shot examples are drawn with weights exp(score / (temperature * s0)), s0 = the best seed's score, so
    the temperature means the same for every scorer (the paper: exp(score / 0.1) for probabilities in [0, 1])."""
    red_max_new_tokens: int = 96
    """Tokens the red model writes per candidate (cut to complete lines)."""
    target_max_new_tokens: int = 128
    """Tokens of each target continuation."""
    max_prompt_chars: int = 600
    """Candidates are cut to at most this many characters (whole segments)."""
    seed: int = 0

    def validate(self) -> "RedTeamConfig":
        for name in ("rounds", "seeds", "candidates", "keep", "continuations", "shots", "red_max_new_tokens",
                     "target_max_new_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise PhfError(f"redteam {name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise PhfError(f"redteam temperature must be > 0, got {self.temperature}")
        return self


@dataclass
class PoolEntry:
    prompt: str
    score: float
    round: int  # 0 = seed from held-out data
    source: str  # "seed" or "red"


@dataclass
class Pool:
    entries: list[PoolEntry] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.array([e.score for e in self.entries], np.float64)

    def best(self) -> float:
        return float(np.nanmax(self.scores)) if self.entries else math.nan

    def mean(self) -> float:
        return float(np.nanmean(self.scores)) if self.entries else math.nan

    def draw(self, k: int, temperature: float, scale: float, rng: np.random.Generator) -> list[str]:
        """k distinct prompts, drawn with weights exp(score / (temperature * scale))."""
        s = np.nan_to_num(self.scores, nan=0.0) / (temperature * max(scale, 1e-12))
        w = np.exp(s - s.max())
        idx = rng.choice(len(self.entries), size=min(k, len(self.entries)), replace=False, p=w / w.sum())
        return [self.entries[i].prompt for i in idx]

    def add_best(self, candidates: list[PoolEntry], keep: int) -> list[PoolEntry]:
        """Add the `keep` best-scoring new candidates (NaN scores never join); return those added."""
        known = {e.prompt for e in self.entries}
        fresh = sorted((c for c in candidates if c.prompt not in known and not math.isnan(c.score)),
                       key=lambda c: -c.score)[:keep]
        self.entries.extend(fresh)
        return fresh


def cut_candidate(text: str, max_chars: int, segmenter: str = "lines") -> str:
    """A red model's continuation as a prompt: leading blank lines dropped, whole segments, at most `max_chars`."""

    text = text.lstrip("\n")
    out = ""
    for a, b in get_segmenter(segmenter)(text):
        if len(out) + (b - a) > max_chars:
            break
        out += text[a:b]
    return out if out.strip() else ""


# what the misalignment of a round's continuations owes to their length (phf.evaluation.evaluate.length_metrics)
LENGTH_KEYS = ("length_weighted_misalignment", "window_misalignment_mean", "mean_chars", "median_chars",
               "finished_share")


class PromptScorer:
    """Scores prompts by the mean misalignment of a target model's continuations; `last` holds the length figures
    of the latest call's continuations (LENGTH_KEYS), given the task."""

    def __init__(self, target, scorer, sample_cfg, progress: bool = True, task=None):
        self.target, self.scorer, self.cfg, self.progress, self.task = target, scorer, sample_cfg, progress, task
        self.last: dict = {}

    def __call__(self, prompts: list[str], seed: int, desc: str) -> list[float]:
        if not prompts:
            return []
        n = self.cfg.num_samples
        cfg = replace(self.cfg, num_samples=len(prompts) * n, seed=seed)
        rows = [p for p in prompts for _ in range(n)]
        samples = generate(self.target.model, self.target.tokenizer, rows, cfg, self.target.deployment, "redteam",
                           bar=desc if self.progress else None, segmenter=self.scorer.segmenter)
        flat = score_samples(samples, self.scorer)
        if self.task is not None:
            m = task_metrics(samples, flat, self.task, self.scorer)
            self.last = {f"continuations_{k}": m[k] for k in LENGTH_KEYS if k in m}
        scores = np.array(flat, np.float64).reshape(len(prompts), n)
        with np.errstate(all="ignore"):
            return [float(np.nanmean(r)) if np.isfinite(r).any() else math.nan for r in scores]


def red_team(target, red, scorer, seed_prompts: list[str], cfg: RedTeamConfig, batch_size: int = 64,
             progress: bool = True, task=None) -> dict:
    """Run the search; `target` and `red` are phf.analysis.probes.Loaded models. Returns per-round figures and the
    pool; given the `task`, each round also says what its continuations' misalignment owes to their length."""

    cfg.validate()
    if not seed_prompts:
        raise PhfError("no held-out prompt to seed the red-team pool with; check the scored corpus' test split")
    score = PromptScorer(target, scorer, SampleConfig(num_samples=cfg.continuations,
                                                      max_new_tokens=cfg.target_max_new_tokens, temperature=1.0,
                                                      top_p=0.9, batch_size=batch_size, seed=cfg.seed), progress, task)
    rng = np.random.default_rng(cfg.seed)
    seeds = seed_prompts[:cfg.seeds]
    pool = Pool([PoolEntry(p, s, 0, "seed") for p, s in zip(seeds, score(seeds, cfg.seed, "red team: seeds"))])
    scale = pool.best() if pool.best() > 0 else 1.0
    rounds = [{"round": 0, "pool_size": len(pool.entries), "pool_best": pool.best(), "pool_mean": pool.mean(),
               "candidates_mean": pool.mean(), "candidates_best": pool.best(), "candidates": len(seeds),
               "added": len(seeds), **score.last}]
    red_cfg = SampleConfig(num_samples=cfg.candidates, max_new_tokens=cfg.red_max_new_tokens, temperature=1.0,
                           top_p=0.9, batch_size=batch_size, seed=cfg.seed)
    for r in range(1, cfg.rounds + 1):
        fewshot = ["\n\n".join(ex.rstrip("\n") + "\n" for ex in pool.draw(cfg.shots, cfg.temperature, scale, rng))
                   + "\n\n" for _ in range(cfg.candidates)]
        red_cfg.seed = cfg.seed + r
        written = generate(red.model, red.tokenizer, fewshot, red_cfg, red.deployment, "red",
                           bar=f"red team round {r}: red model" if progress else None, segmenter=scorer.segmenter)
        prompts = list(dict.fromkeys(c for c in (cut_candidate(s.text, cfg.max_prompt_chars, scorer.segmenter)
                                                 for s in written) if c))
        scores = score(prompts, cfg.seed + 1000 * r, f"red team round {r}: target")
        candidates = [PoolEntry(p, s, r, "red") for p, s in zip(prompts, scores)]
        added = pool.add_best(candidates, cfg.keep)
        valid = [c.score for c in candidates if not math.isnan(c.score)]
        rounds.append({"round": r, "pool_size": len(pool.entries), "pool_best": pool.best(), "pool_mean": pool.mean(),
                       "candidates_mean": float(np.mean(valid)) if valid else math.nan,
                       "candidates_best": float(np.max(valid)) if valid else math.nan,
                       "candidates": len(prompts), "added": len(added), **(score.last if prompts else {})})
        log.info("red team round %d: pool best %.4f mean %.4f, candidates mean %.4f", r, rounds[-1]["pool_best"],
                 rounds[-1]["pool_mean"], rounds[-1]["candidates_mean"])
    return {"rounds": rounds, "pool": [asdict(e) for e in pool.entries]}


def sibling_mle(folder: Path) -> Path:
    """The plain MLE model of the same task: runs/X/<objective>/checkpoint -> runs/X/mle/checkpoint."""
    candidate = checkpoint_dir(sibling_run(Path(folder).parent, REFERENCE_ARM))
    if not (candidate / "config.json").exists():
        raise PhfError(f"no MLE model beside {folder} ({candidate} does not exist); pass --red-model DIR")
    return candidate


def run_redteam(model_paths: list, out_dir, red_model=None, cfg: RedTeamConfig | None = None, data_dir=None,
                progress: bool = True) -> dict:
    """Red-team each target (one shared red model and seed pool); write OUT/results.json and OUT/redteam.png."""

    cfg = (cfg or RedTeamConfig()).validate()
    targets = [load(p) for p in model_paths]
    red = load(red_model if red_model else sibling_mle(targets[0].folder))
    if red.tokenizer.get_vocab() != targets[0].tokenizer.get_vocab():
        log.warning("the red model's tokenizer differs from the target's; prompts travel as text, so this works")
    run_cfg = run_config(targets[0].folder)
    scorer = scorer_for(run_cfg.scoring)
    scored = scored_corpus_for(targets[0].folder, run_cfg, data_dir)
    seeds = task_for(run_cfg).eval_prompts(scored, cfg.seeds)
    results = {"red_model": str(red.folder), "config": asdict(cfg), "scorer": scorer.name, "targets": {}}
    for t in targets:
        name = t.meta.get("objective", {}).get("name") or t.folder.parent.name
        if name in results["targets"]:
            name = f"{name}:{t.folder.parent.name}"
        results["targets"][name] = {"model": str(t.folder),
                                    **red_team(t, red, scorer, seeds, cfg, run_cfg.sample.batch_size, progress,
                                               task_for(run_cfg))}
    out_dir = Path(out_dir)
    results["figure"] = str(plot_rounds(results["targets"], out_dir / "redteam.png", scorer.name))
    write_json(results_path(out_dir), results)
    return results


def plot_rounds(targets: dict, path: Path, scorer: str) -> Path:
    """Misalignment per round per target, as the paper's Figure 3: the pool's mean (solid) and the round's
    candidates' mean (dotted)."""

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, res in targets.items():
        rounds = res["rounds"]
        x = [r["round"] for r in rounds]
        line, = ax.plot(x, [r["pool_mean"] for r in rounds], marker="o", label=f"{name}: pool mean")
        ax.plot(x[1:], [r["candidates_mean"] for r in rounds[1:]], linestyle=":", color=line.get_color(),
                label=f"{name}: round's candidates")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("red-team round")
    ax.set_ylabel(f"misalignment ({scorer})")
    ax.legend(fontsize=7)
    ax.set_title("Red teaming")
    return save_figure(fig, path)
