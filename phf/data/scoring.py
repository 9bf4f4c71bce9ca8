"""Documents -> scored corpus: Parquet shards of (document, segment spans, segment scores) plus a manifest.

Scoring is done once per corpus + scorer and reused: the folder is keyed by a hash of the corpus config and the
scorer's name, version and settings. Shards are written atomically, one at a time, and listed in the manifest
with their sha256 as they complete, so a killed run re-scores only the shards it had not finished.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from phf.core.config import CorpusConfig, Quantile, ScoringConfig
from phf.core.errors import PhfError
from phf.core.figures import pyplot, save_figure
from phf.core.io import atomic_path, file_sha256, read_json, stable_hash, write_json
from phf.data.corpus import Corpus, Document, Part
from phf.data.scorers import ScoredText, Scorer, get_scorer, scorer_for

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_LAYOUT = "parts"  # a shard is one Part of the corpus (a data file's shards no longer cross its files)

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("text", pa.large_string()),
    ("seg_start", pa.list_(pa.int32())),
    ("seg_end", pa.list_(pa.int32())),
    ("seg_score", pa.list_(pa.float64())),
    ("seg_error", pa.list_(pa.string())),
    ("score", pa.float64()),
    ("num_errors", pa.int32()),
])


@dataclass
class ScoredDocument:
    id: str
    split: str
    text: str
    starts: list[int]
    ends: list[int]
    scores: list[float]
    errors: list[str | None]
    score: float

    def segments(self) -> list[str]:
        return [self.text[a:b] for a, b in zip(self.starts, self.ends)]


# -- worker side ---------------------------------------------------------------------------------------------
_WORKER_SCORER: Scorer | None = None


def init_scoring_worker(scorer_name: str, segmenter: str | None = None, aggregate: str | None = None,
                        device: str = "") -> None:
    """A scoring process' initializer: build its scorer once."""
    global _WORKER_SCORER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_SCORER = get_scorer(scorer_name, segmenter, aggregate, device)


def score_batch(docs: list[Document]) -> list[ScoredText]:
    assert _WORKER_SCORER is not None
    return _WORKER_SCORER.score_texts([d.text for d in docs])


def score_shard(i: int, docs: list[Document], out: str) -> tuple[str, dict, int]:
    """A worker's whole share of one shard: score its documents, build the table, write and hash the shard file.
    Only the shard's manifest entry goes back to the driver, so the driver's work per shard is reading the
    documents and sending them (the scores, the table, the Parquet encoding and the sha256 stay in the workers)."""
    assert _WORKER_SCORER is not None
    table = _table(docs, _WORKER_SCORER.score_texts([d.text for d in docs]), _WORKER_SCORER)
    name, info = _write_shard_file(i, table, Path(out))
    return name, info, sum(len(d.text) for d in docs)


POOL_MIN_CHARS = 1_000_000  # below this, starting the processes costs more than it saves


def score_texts_pooled(scorer: Scorer, texts: list[str], workers: int = 0) -> list[ScoredText]:
    """`scorer.score_texts(texts)`, spread over one forked process per core when the scorer scores each text on
    its own in pure Python on the CPU (`Scorer.pooled`, e.g. pycodestyle) and the texts are long enough to pay
    for the processes: evaluation's thousands of samples. Texts are cut into contiguous chunks and the results
    joined in order, so they are exactly the one-process results. Any other scorer (a model on a GPU, a library
    that batches or threads on its own) is called once, in this process."""
    workers = workers or os.cpu_count() or 1
    if (not scorer.pooled or workers < 2 or len(texts) < 2 or not hasattr(os, "fork")
            or sum(len(t) for t in texts) < POOL_MIN_CHARS):
        return scorer.score_texts(texts)
    per_chunk = -(-len(texts) // (4 * workers))
    chunks = [texts[a:a + per_chunk] for a in range(0, len(texts), per_chunk)]
    global _WORKER_SCORER
    before, _WORKER_SCORER = _WORKER_SCORER, scorer  # the forked workers inherit it
    try:
        with mp.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            parts = pool.map(score_text_chunk, chunks)
    finally:
        _WORKER_SCORER = before
    return [scored for part in parts for scored in part]


def score_text_chunk(texts: list[str]) -> list[ScoredText]:
    assert _WORKER_SCORER is not None
    return _WORKER_SCORER.score_texts(texts)


def _table(docs: list[Document], scored: list[ScoredText], scorer: Scorer) -> pa.Table:
    rows = {name: [] for name in SCHEMA.names}
    for doc, s in zip(docs, scored):
        rows["id"].append(doc.id)
        rows["split"].append(doc.split)
        rows["text"].append(doc.text)
        rows["seg_start"].append(s.starts)
        rows["seg_end"].append(s.ends)
        rows["seg_score"].append(s.scores)
        rows["seg_error"].append(s.errors)
        rows["score"].append(scorer.sample_score(s))
        rows["num_errors"].append(s.num_errors)
    return pa.Table.from_pydict(rows, schema=SCHEMA)


# -- driver --------------------------------------------------------------------------------------------------
def scored_dir_for(data_dir: Path, corpus_cfg: CorpusConfig, scorer: Scorer, inputs: dict | None = None,
                   precomputed: str = "") -> Path:
    """The scored corpus' folder: keyed on the corpus config, the scorer (name, version, settings) and the content
    of the input files (`inputs`: name -> sha256, from `input_identity`), so that editing either rescores. A
    pre-scored corpus (`precomputed`: its fields) is keyed on those fields instead of the scorer's version."""
    key = stable_hash({"corpus": corpus_cfg.__dict__, "scorer": scorer.name, "settings": scorer.settings(),
                       "version": f"precomputed {precomputed}" if precomputed else scorer.version,
                       "aggregate": scorer.aggregate, "format": FORMAT_VERSION,
                       "inputs": stable_hash(inputs, 32) if inputs is not None else None})
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in scorer.name)
    return Path(data_dir) / "scored" / f"{safe}-{key}"


INDEX_DIR = "scored-index"  # beside scored/, whose every entry is a scored corpus
HASHES = "file-hashes.json"  # sha256 of input files, remembered by (size, mtime) so unchanged files are not reread
INDEX = "index.json"  # per corpus config and scorer: the inputs and scorer version last scored, to say why we rescore


def input_identity(corpus: Corpus, data_dir: Path) -> dict | None:
    """name -> sha256 of every file the corpus reads (None for a task's named source). A file's hash is reused
    while its size and modification time are unchanged."""
    files = corpus.input_files()
    if files is None:
        return None
    memo_path = Path(data_dir) / INDEX_DIR / HASHES
    memo = read_json(memo_path) if memo_path.exists() else {}
    identity, changed = {}, False
    for name, path in files:
        try:
            st = path.stat()
        except OSError:
            continue  # unreadable: the reader skips and counts it
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        if memo.get(key, {}).get("stamp") != stamp:
            try:
                memo[key] = {"stamp": stamp, "sha256": file_sha256(path)}
            except OSError:
                continue
            changed = True
        identity[name] = memo[key]["sha256"]
    if changed:
        write_json(memo_path, memo)
    return identity


def explain_rescore(data_dir: Path, config_key: str, out: Path, inputs: dict | None, version: str) -> None:
    """Log why a corpus scored before under the same config and scorer is scored again."""
    index_path = Path(data_dir) / INDEX_DIR / INDEX
    before = (read_json(index_path) if index_path.exists() else {}).get(config_key)
    if not before or before.get("folder") == out.name:
        return
    reasons = []
    if before.get("version") != version:
        reasons.append(f"the scorer changed ({before.get('version')} -> {version})")
    old = before.get("inputs") or {}
    if inputs is not None and old != inputs:
        edited = sorted(n for n in inputs if n in old and old[n] != inputs[n])
        added, removed = sorted(set(inputs) - set(old)), sorted(set(old) - set(inputs))
        for what, names in (("edited", edited), ("added", added), ("removed", removed)):
            if names:
                reasons.append(f"{len(names)} corpus file(s) {what} ({', '.join(names[:3])}"
                               f"{', ...' if len(names) > 3 else ''})")
    if reasons:
        log.warning("rescoring into %s: %s since %s was scored", out.name, "; ".join(reasons), before["folder"])


def remember_scored(data_dir: Path, config_key: str, out: Path, inputs: dict | None, version: str) -> None:
    index_path = Path(data_dir) / INDEX_DIR / INDEX
    index = read_json(index_path) if index_path.exists() else {}
    index[config_key] = {"folder": out.name, "inputs": inputs, "version": version}
    write_json(index_path, index)


def score_corpus(corpus_cfg: CorpusConfig, scoring_cfg: ScoringConfig, data_dir: Path,
                 progress: bool = True, sources: Mapping[str, Callable] | None = None,
                 rescore: bool = False) -> "ScoredCorpus":
    """Score a corpus into `data_dir/scored/<scorer>-<hash>/`, reusing finished shards; return the result.

    `sources`: the named corpus sources the tasks bring (phf.tasks.all_sources). `rescore`: score again even if
    a complete scored corpus exists for these inputs."""
    scorer = scorer_for(scoring_cfg)
    corpus = Corpus(corpus_cfg, sources, scoring_cfg.precomputed)
    inputs = input_identity(corpus, data_dir)
    out = scored_dir_for(data_dir, corpus_cfg, scorer, inputs, scoring_cfg.precomputed)
    config_key = f"{scorer.name} {stable_hash({'corpus': corpus_cfg.__dict__, 'settings': scorer.settings()})}"
    manifest_path = out / MANIFEST
    if rescore and out.exists():
        log.info("rescoring %s (asked to)", out)
        shutil.rmtree(out)
    explain_rescore(data_dir, config_key, out, inputs, scorer.version)
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    if manifest is not None and manifest.get("complete"):
        scored = ScoredCorpus(out)
        scored.verify()
        log.info("reusing scored corpus %s", out)
        return scored
    out.mkdir(parents=True, exist_ok=True)
    parts = corpus.parts(scoring_cfg.shard_documents)  # data files are counted here, nothing is kept
    manifest = _resumable_manifest(manifest, out, _manifest_settings(scorer, corpus_cfg, len(parts)))
    todo = [i for i in range(len(parts)) if _shard_name(i) not in manifest["shards"]]
    book = _Manifest(manifest, manifest_path)
    clock = _Clock()
    try:
        chars = _score_shards(corpus, parts, todo, scorer, scoring_cfg, out, book, progress)
    finally:
        book.write()  # every finished shard is on record, whatever ended the run
        corpus.close()
    if not any(info["rows"] for info in manifest["shards"].values()):
        raise PhfError(f"corpus {corpus_cfg.source} has no usable document; skipped: {dict(corpus.stats.skipped)}")
    # shards already done before this run contributed to the listing stats only through `corpus.read`;
    # the corpus stats of a resumed run are recomputed from the shards themselves
    manifest["complete"] = True
    manifest["corpus_stats"] = {"skipped": dict(corpus.stats.skipped)}
    manifest["seconds"] = round(time.perf_counter() - book.started, 2)
    manifest["chars_scored_this_run"] = chars
    manifest["throughput"] = clock.throughput(chars, _scored_where(scoring_cfg, len(todo)))
    write_json(manifest_path, manifest)
    log.info("scored %s", throughput_line(manifest["throughput"]))
    remember_scored(data_dir, config_key, out, inputs, scorer.version)
    return ScoredCorpus(out)


def _manifest_settings(scorer: Scorer, corpus_cfg: CorpusConfig, num_shards: int) -> dict:
    """What a manifest's finished shards were scored with: a shard is reused only under the same settings."""
    return {"scorer": scorer.name, "version": scorer.version, "settings": scorer.settings(),
            "segmenter": scorer.segmenter, "aggregate": scorer.aggregate,
            "corpus": corpus_cfg.__dict__, "format": FORMAT_VERSION, "num_shards": num_shards,
            "layout": SHARD_LAYOUT}


def _resumable_manifest(manifest: dict | None, out: Path, settings: dict) -> dict:
    """The manifest to resume from: the previous run's (None: none) if it was scored with `settings`, keeping only
    the shards whose files are intact (size and sha256 as recorded); else a fresh one."""
    if manifest is None or {k: manifest.get(k) for k in settings} != settings:
        manifest = dict(settings, shards={}, complete=False, corpus_stats=None)
    done = {}
    for name, info in manifest["shards"].items():
        path = out / name
        if path.exists() and path.stat().st_size == info["bytes"] and file_sha256(path) == info["sha256"]:
            done[name] = info
    manifest["shards"] = done
    if done:
        log.info("resuming scoring: %d of %d shards already done", len(done), settings["num_shards"])
    return manifest


class _Manifest:
    """The manifest of a scored corpus being written: each finished shard is recorded with its sha256. It is
    rewritten after every shard while it is short, and at most every 2 s once it is long (rewriting a manifest
    of 10,000 shards after each would cost more than the scoring); `write` puts the rest on record."""

    def __init__(self, manifest: dict, path: Path):
        self.manifest, self.path = manifest, path
        self.started = self.written = time.perf_counter()

    def add(self, name: str, info: dict) -> None:
        self.manifest["shards"][name] = info
        if len(self.manifest["shards"]) < 256 or time.perf_counter() - self.written > 2.0:
            self.write()

    def write(self) -> None:
        self.manifest["shards"] = dict(sorted(self.manifest["shards"].items()))  # in shard order, however they finished
        write_json(self.path, self.manifest)
        self.written = time.perf_counter()


class _Clock:
    """Wall time and CPU time of this process (the driver) and of its finished children (the scoring workers)."""

    def __init__(self):
        self.wall, self.driver, self.children = time.perf_counter(), time.process_time(), _children_cpu()

    def throughput(self, chars: int, where: tuple[str, int]) -> dict:
        """MB/s in all and per scoring core (MB over the scoring CPU seconds: the pool's workers', or this
        process' when it scored alone; None on Ray's machines), and how many such workers the driver alone could
        feed: MB over the driver's own CPU seconds (reading, planning, IPC, recording) divided by one worker's
        MB/s. Below the number of workers, the driver is the bottleneck. `where`: `_scored_where`."""
        wall = time.perf_counter() - self.wall
        driver = time.process_time() - self.driver
        children = _children_cpu() - self.children
        mb = chars / 1e6
        kind, workers = where
        scoring_cpu = {"pool": children, "driver": driver}.get(kind, 0.0)
        per_core = mb / scoring_cpu if scoring_cpu > 0 else None
        driver_rate = mb / driver if driver > 0 else None
        feeds = driver_rate / per_core if kind == "pool" and per_core and driver_rate else None
        return {"mb": round(mb, 2), "seconds": round(wall, 2), "workers": workers, "scored_in": kind,
                "mb_per_s": round(mb / wall, 3) if wall > 0 else None,
                "mb_per_s_per_core": round(per_core, 3) if per_core else None,
                "driver_cpu_seconds": round(driver, 2), "worker_cpu_seconds": round(children, 2),
                "driver_mb_per_cpu_s": round(driver_rate, 2) if driver_rate else None,
                "workers_driver_feeds": round(feeds, 1) if feeds else None}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def throughput_line(t: dict) -> str:
    """`12.3 MB in 45.6 s = 0.27 MB/s with 2 workers (0.14 MB/s per core); the driver ...`"""
    workers = t["workers"] or "Ray's"  # scoring.workers=0 with Ray: one per CPU of the cluster
    line = (f"{t['mb']} MB in {t['seconds']} s = {t['mb_per_s']} MB/s with {workers} worker"
            f"{'s' if workers != 1 else ''}"
            + (f" ({t['mb_per_s_per_core']} MB/s per core)" if t.get("mb_per_s_per_core") else ""))
    if t.get("workers_driver_feeds"):
        line += (f"; the driver used {t['driver_cpu_seconds']} CPU s ({t['driver_mb_per_cpu_s']} MB per CPU "
                 f"second: enough for {t['workers_driver_feeds']:g} workers)")
    return line


def measure_scoring(corpus_cfg: CorpusConfig, scoring_cfg: ScoringConfig, data_dir: Path,
                    sources: Mapping[str, Callable] | None = None) -> dict:
    """Score a corpus afresh (into `data_dir`) and return the pipeline's throughput (`_Clock.throughput`):
    what `phf bench score` reports for a large corpus on every core."""
    scored = score_corpus(corpus_cfg, scoring_cfg, Path(data_dir), progress=False, sources=sources, rescore=True)
    return dict(scored.manifest["throughput"], documents=sum(i["rows"] for i in scored.manifest["shards"].values()),
                shards=len(scored.manifest["shards"]), source=corpus_cfg.source)


def _scored_where(scoring_cfg: ScoringConfig, shards: int) -> tuple[str, int]:
    """(`pool` | `driver` | `ray`, processes) of a scoring run of `shards` shards, as `_score_shards` chooses."""
    if scoring_cfg.precomputed:
        return "driver", 1
    if scoring_cfg.backend == "ray":
        return "ray", scoring_cfg.workers
    workers = _workers(scoring_cfg, shards)
    return ("pool", workers) if workers > 1 else ("driver", 1)


def _workers(scoring_cfg: ScoringConfig, shards: int) -> int:
    """Scoring processes: scoring.workers, else one per core (one for a GPU scorer); 1 when there is one shard."""
    workers = scoring_cfg.workers or (1 if scoring_cfg.on_gpu() else os.cpu_count() or 1)
    return workers if shards > 1 else 1


def _score_shards(corpus: Corpus, parts: list[Part], todo: list[int], scorer: Scorer, scoring_cfg: ScoringConfig,
                  out: Path, book: _Manifest, progress: bool) -> int:
    """Score the parts `todo` into shard files; the characters scored. Documents are read here, in order, one
    part at a time; at most 2 x workers parts are in flight, so memory holds a few shards, never the corpus."""
    # a GPU scorer: one process drives the GPU unless scoring.workers asks for more (each holds its own model)
    workers = _workers(scoring_cfg, len(todo))
    chars = 0
    bar = tqdm(total=len(todo), desc=f"scoring ({scorer.name})", unit="shard", disable=not progress)
    # documents are read in this process (in order); the pool scores and writes whole shards
    shard_inputs = ((i, corpus.read_part(parts[i])) for i in todo)
    if scoring_cfg.precomputed:
        for i, docs in shard_inputs:
            chars += _write_shard(i, docs, [given_scores(d) for d in docs], scorer, out, book)
            bar.update()
    elif scoring_cfg.backend == "ray" and todo:
        for i, table, n, skipped in score_shards_with_ray(corpus.cfg, scoring_cfg, [(i, parts[i]) for i in todo],
                                                          corpus.sources):
            corpus.stats.skipped.update(skipped)
            chars += n
            _write_table(i, table, out, book)
            bar.update()
    elif workers > 1 and len(todo) > 1:
        chars = _score_in_pool(shard_inputs, scoring_cfg, workers, out, book, bar)
    else:
        for i, docs in shard_inputs:
            chars += _write_shard(i, docs, scorer.score_texts([d.text for d in docs]), scorer, out, book)
            bar.update()
    bar.close()
    return chars


def _score_in_pool(shard_inputs: Iterator[tuple[int, list[Document]]], scoring_cfg: ScoringConfig, workers: int,
                   out: Path, book: _Manifest, bar) -> int:
    """Score the shards `shard_inputs` (index, documents) in a pool of `workers` processes, which write the shard
    files; the characters scored."""
    # a GPU scorer's workers are spawned: CUDA initialised before a fork is unusable in the child
    ctx = mp.get_context("fork") if hasattr(os, "fork") and not scoring_cfg.on_gpu() else mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=init_scoring_worker,
                    initargs=(scoring_cfg.scorer, scoring_cfg.segmenter, scoring_cfg.aggregate, scoring_cfg.device))
    # shards are recorded as they finish, in any order: one slow shard (a few huge files) does not hold up
    # handing out the next ones, so no worker waits while at most 2 x workers shards are in flight
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight, chars = 0, 0
    try:
        for i, docs in shard_inputs:
            pool.apply_async(score_shard, (i, docs, str(out)), callback=finished.put, error_callback=finished.put)
            in_flight += 1
            while in_flight >= 2 * workers or (in_flight and not finished.empty()):
                chars += _record(finished.get(), book)
                in_flight -= 1
                bar.update()
        while in_flight:
            chars += _record(finished.get(), book)
            in_flight -= 1
            bar.update()
    finally:
        pool.terminate()
    return chars


def given_scores(doc: Document) -> ScoredText:
    """The precomputed scores of a pre-scored document as the scorer would have returned them: one span per
    segment; a score that is NaN, infinite or negative is recorded as an error, never as aligned."""
    lengths, scores = doc.given
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if lengths else []
    ends = [a + n for a, n in zip(starts, lengths)]
    errors = [None if math.isfinite(s) and s >= 0 else f"precomputed score {s} is not a number >= 0" for s in scores]
    return ScoredText(starts, ends, [s if e is None else math.nan for s, e in zip(scores, errors)], errors)


def _record(done: tuple[str, dict, int] | BaseException, book: _Manifest) -> int:
    """Put a shard a worker wrote on record; its characters. A worker's exception is raised here."""
    if isinstance(done, BaseException):
        raise done
    name, info, chars = done
    book.add(name, info)
    return chars


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _write_shard(i, docs, scored, scorer, out: Path, book: _Manifest) -> int:
    _write_table(i, _table(docs, scored, scorer), out, book)
    return sum(len(d.text) for d in docs)


def _write_table(i: int, table: pa.Table, out: Path, book: _Manifest) -> None:
    book.add(*_write_shard_file(i, table, out))


def _write_shard_file(i: int, table: pa.Table, out: Path) -> tuple[str, dict]:
    """Write shard `i` atomically; its name and manifest entry (rows, bytes, sha256)."""
    name = _shard_name(i)
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return name, {"rows": table.num_rows, "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)}


# -- the ray backend -----------------------------------------------------------------------------------------
class RayShardScorer:
    """A Ray Data actor: builds the scorer once, then reads and scores whole shards. One input row = one shard
    index and its part of the corpus (a file's byte offset, a row group, a slice of the listing), so each actor
    reads only its own parts of the input; one output row = that shard's table as Arrow IPC bytes, its characters
    and the documents it skipped, so the driver writes exactly the file the local backend writes."""

    def __init__(self, corpus_cfg: dict, scorer: str, segmenter: str, aggregate: str, device: str = "",
                 sources: dict | None = None):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.corpus = Corpus(CorpusConfig(**corpus_cfg), sources)
        # a GPU Ray gave this actor is its cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
        self.scorer = get_scorer(scorer, segmenter, aggregate, "cuda" if device.startswith("cuda") else device)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "table": [], "chars": [], "skipped": []}
        for i, part in zip(batch["shard"], batch["part"]):
            before = Counter(self.corpus.stats.skipped)
            docs = self.corpus.read_part(Part(**json.loads(part)))
            table = _table(docs, self.scorer.score_texts([d.text for d in docs]), self.scorer)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out["shard"].append(int(i))
            out["table"].append(sink.getvalue().to_pybytes())
            out["chars"].append(sum(len(d.text) for d in docs))
            out["skipped"].append(json.dumps(dict(self.corpus.stats.skipped - before)))
        return out


def score_shards_with_ray(corpus_cfg: CorpusConfig, scoring_cfg: ScoringConfig, shards: list[tuple[int, Part]],
                          sources: Mapping[str, Callable] | None = None) -> Iterator[tuple[int, pa.Table, int, dict]]:
    """Score `shards` (index, part) with Ray Data on the running Ray instance (or a local one started here and
    stopped after): an actor pool of `scoring.workers` actors (0 = one per CPU of the cluster), one shard per call,
    results in shard order. Yields (shard index, table, characters, skipped documents by reason)."""

    try:
        import ray
        import ray.data
    except ImportError:
        raise PhfError("scoring.backend=ray needs Ray: pip install 'phf[ray]' (or use scoring.backend=local)") from None
    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS (or a cluster started with `ray start`) is found by ray.init itself
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # shards come back (and the manifest lists them) in order
    ctx.enable_progress_bars = False  # phf's own bar counts shards
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution plan and timings, at INFO, per run
    try:
        workers = scoring_cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = [{"shard": i, "part": json.dumps(dataclasses.asdict(part))} for i, part in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(RayShardScorer, batch_size=1, num_cpus=1, num_gpus=1 if scoring_cfg.on_gpu() else 0,
                            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
                            fn_constructor_kwargs={"corpus_cfg": dict(corpus_cfg.__dict__),
                                                   "scorer": scoring_cfg.scorer, "segmenter": scoring_cfg.segmenter,
                                                   "aggregate": scoring_cfg.aggregate, "device": scoring_cfg.device,
                                                   "sources": dict(sources or {})})
        for row in ds.iter_rows():
            table = pa.ipc.open_stream(row["table"]).read_all()
            yield int(row["shard"]), table, int(row["chars"]), json.loads(row["skipped"])
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


class ScoredCorpus:
    """A finished scored corpus folder: read its documents by split, summarise its scores."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = read_json(self.path / MANIFEST)
        except FileNotFoundError:
            raise PhfError(f"{self.path} is not a scored corpus (no {MANIFEST}); create it with `phf score`") from None
        if not self.manifest.get("complete"):
            raise PhfError(f"scored corpus {self.path} is incomplete; run `phf score` again to finish it")

    @property
    def scorer_name(self) -> str:
        return self.manifest["scorer"]

    def shard_files(self) -> list[Path]:
        return [self.path / name for name in sorted(self.manifest["shards"])]

    def verify(self) -> None:
        for name, info in self.manifest["shards"].items():
            path = self.path / name
            if not path.exists():
                raise PhfError(f"scored shard {path} is missing; delete {self.path / MANIFEST} and run `phf score` "
                               f"again to re-score only what is missing")
            if path.stat().st_size != info["bytes"]:
                raise PhfError(f"scored shard {path} is damaged (size differs from the manifest); delete it and run "
                               f"`phf score` again to re-score it")

    def table(self, columns: list[str] | None = None) -> pa.Table:
        files = self.shard_files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])

    def documents(self, split: str | None = None) -> Iterator[ScoredDocument]:
        for f in self.shard_files():
            t = pq.read_table(f)
            if split is not None:
                t = t.filter(pa.compute.equal(t.column("split"), split))
            d = t.to_pydict()
            for j in range(t.num_rows):
                yield ScoredDocument(d["id"][j], d["split"][j], d["text"][j], d["seg_start"][j], d["seg_end"][j],
                                     [math.nan if s is None else s for s in d["seg_score"][j]],
                                     d["seg_error"][j], math.nan if d["score"][j] is None else d["score"][j])

    def document_scores(self, split: str = "train") -> np.ndarray:
        t = self.table(["split", "score"])
        t = t.filter(pa.compute.equal(t.column("split"), split))
        return np.array([math.nan if s is None else s for s in t.column("score").to_pylist()], dtype=np.float64)

    def summary(self, misaligned_above: float = 0.0) -> dict:
        """Documents, characters, segments, and the share of segments scoring above `misaligned_above` (0 for
        counts such as violations or detections; a probability scorer needs its own, e.g. 0.5 for toxicity)."""
        t = self.table(["split", "text", "seg_score", "num_errors", "score"])
        splits = t.column("split").to_pylist()
        seg_scores = t.column("seg_score").to_pylist()
        out = {"path": str(self.path), "scorer": self.manifest["scorer"], "version": self.manifest["version"],
               "documents": {s: splits.count(s) for s in ("train", "validation", "test")},
               "chars": int(sum(len(x) for x in t.column("text").to_pylist())),
               "segments": int(sum(len(s) for s in seg_scores)),
               "segments_misaligned": int(sum(1 for ss in seg_scores for v in ss
                                              if v is not None and v > misaligned_above)),
               "segment_errors": int(sum(t.column("num_errors").to_pylist())),
               "skipped": (self.manifest.get("corpus_stats") or {}).get("skipped", {})}
        out["misaligned_segment_share"] = out["segments_misaligned"] / max(out["segments"], 1)
        out["misaligned_above"] = misaligned_above
        train = self.document_scores("train")
        train = train[~np.isnan(train)]
        if len(train):
            out["train_document_score"] = {"mean": float(train.mean()), "median": float(np.median(train)),
                                           "p90": float(np.quantile(train, 0.9))}
        return out


# -- the score distribution ----------------------------------------------------------------------------------
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
DISTRIBUTION_FIGURE = "score-distribution.png"


def quantile_threshold(scored: ScoredCorpus, q: float, split: str = "train") -> float:
    """Quantile `q` of a split's document scores (NaN, unscorable, left out): a threshold given as a quantile, as
    objective.threshold_quantile and scoring.misaligned_above_quantile resolve it."""
    if not 0 <= q <= 1:
        raise PhfError(f"a threshold quantile must be in [0, 1], got {q}")
    scores = scored.document_scores(split)
    scores = scores[~np.isnan(scores)]
    if not len(scores):
        raise PhfError(f"{scored.path} has no scored {split} document to set a threshold quantile from")
    return float(np.quantile(scores, q))


def split_scores(scored: ScoredCorpus, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's document scores and its segments' scores, those that could not be scored (None, NaN) left out."""
    t = scored.table(["split", "seg_score", "score"])
    t = t.filter(pa.compute.equal(t.column("split"), split))
    docs = np.array([math.nan if v is None else v for v in t.column("score").to_pylist()], dtype=np.float64)
    segs = np.array([math.nan if v is None else v for ss in t.column("seg_score").to_pylist() for v in ss],
                    dtype=np.float64)
    return docs[~np.isnan(docs)], segs[~np.isnan(segs)]


def score_distribution(scored: ScoredCorpus, thresholds: Mapping[str, float | Quantile],
                       split: str = "train") -> dict:
    """The split's document and segment scores: their quantiles (QUANTILES), and per named threshold (a value, or a
    Quantile of the document scores) its value, the share of documents and of segments scoring above it, and the
    quantile it sits at among the document scores (the share at or below it)."""
    docs, segs = split_scores(scored, split)
    if not len(docs):
        raise PhfError(f"{scored.path} has no scored {split} document: no score distribution")
    out = {"split": split, "documents": int(len(docs)), "segments": int(len(segs)),
           "quantiles": [float(q) for q in QUANTILES],
           "document_quantiles": [float(v) for v in np.quantile(docs, QUANTILES)],
           "segment_quantiles": [float(v) for v in np.quantile(segs, QUANTILES)] if len(segs) else [],
           "document_zero_share": float(np.mean(docs == 0)), "segment_zero_share": float(np.mean(segs == 0)) if
           len(segs) else math.nan, "thresholds": {}}
    for name, rule in thresholds.items():
        value = float(np.quantile(docs, rule.q)) if isinstance(rule, Quantile) else float(rule)
        out["thresholds"][name] = {
            "value": value, "given_as": f"quantile {rule.q:g}" if isinstance(rule, Quantile) else "value",
            "documents_above": float(np.mean(docs > value)),
            "segments_above": float(np.mean(segs > value)) if len(segs) else math.nan,
            "document_quantile": float(np.mean(docs <= value))}
    return out


def record_distribution(scored: ScoredCorpus, thresholds: Mapping[str, float | Quantile], log_scale: bool = False,
                        split: str = "train") -> dict:
    """`score_distribution` written into the scored corpus' manifest (`distribution`) and drawn as a histogram
    (score-distribution.png in its folder); both are rewritten only when they change, so a reused corpus stays
    untouched."""
    dist = score_distribution(scored, thresholds, split)
    figure = scored.path / DISTRIBUTION_FIGURE
    if scored.manifest.get("distribution") != json.loads(json.dumps(dist)) or not figure.exists():
        plot_distribution(scored, dist, figure, log_scale)
        scored.manifest["distribution"] = dist
        write_json(scored.path / MANIFEST, scored.manifest)
    return dict(dist, figure=str(figure))


def plot_distribution(scored: ScoredCorpus, dist: dict, path: Path, log_scale: bool) -> Path:
    """Histograms of the document and segment scores (a log axis leaves out the zeros, whose share it names), with
    a line at each threshold."""
    values = dict(zip(("documents", "segments"), split_scores(scored, dist["split"])))
    fig, axes = pyplot().subplots(1, 2, figsize=(10.0, 3.8))
    for ax, (what, xs) in zip(axes, values.items()):
        shown = xs[xs > 0] if log_scale else xs
        if len(shown):
            bins = np.geomspace(shown.min(), shown.max() * 1.0001, 40) if log_scale and shown.max() > shown.min() \
                else 40
            ax.hist(shown, bins=bins, color="#4c72b0")
        if log_scale:
            ax.set_xscale("log")
        zeros = f", {np.mean(xs == 0):.1%} at 0 not drawn" if log_scale and len(xs) else ""
        ax.set_title(f"{dist['split']} {what}: {len(xs):,}{zeros}", fontsize=9)
        ax.set_xlabel(f"score ({scored.scorer_name})")
        for i, (name, th) in enumerate(dist["thresholds"].items()):
            if th["value"] > 0 or not log_scale:
                ax.axvline(th["value"], color=f"C{i + 1}", linestyle="--", linewidth=1,
                           label=f"{name} {th['value']:.3g} ({th[what + '_above']:.1%} above)")
        if dist["thresholds"]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("count")
    return save_figure(fig, path)


def format_distribution(dist: dict) -> str:
    """The distribution as a few lines of text: quantiles, then each threshold's value, shares above, quantile."""
    head = "".join(f"{q:>10g}" for q in dist["quantiles"])
    lines = [f"score distribution of the {dist['split']} split ({dist['documents']:,} documents, "
             f"{dist['segments']:,} segments):", f"  {'quantile':<22}{head}"]
    for what in ("document", "segment"):
        values = dist[f"{what}_quantiles"]
        if values:
            lines.append(f"  {what + 's':<22}" + "".join(f"{v:>10.4g}" for v in values))
    if dist["thresholds"]:
        lines.append(f"  {'threshold':<34}{'value':>10}{'docs above':>12}{'segs above':>12}{'doc quantile':>14}")
    for name, th in dist["thresholds"].items():
        lines.append(f"  {name:<34}{th['value']:>10.4g}{th['documents_above']:>12.1%}{th['segments_above']:>12.1%}"
                     f"{th['document_quantile']:>14.3f}")
    if dist.get("figure"):
        lines.append(f"  histogram: {dist['figure']}")
    return "\n".join(lines)
