"""The scoring pipeline at scale, and the memory readers of every benchmark. Nothing here imports torch: the
large-corpus figures are the pipeline's memory (reader, shards, workers), not a deep-learning library's."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import zstandard

from phf.core.config import CorpusConfig
from phf.core.errors import PhfError
from phf.data.corpus import Corpus

SCORER = "benchmarks.bench_pipeline:line_has_tab"

PEAK_RSS_METHOD = ("VmHWM of /proc/self/status, reset (clear_refs) before each benchmark" if
                   os.path.exists("/proc/self/clear_refs") else "ru_maxrss of getrusage (peak of the whole process)")


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since the last reset_peak_rss (where Linux allows one)."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """The largest peak resident memory of any child process (the scoring pool's workers) so far."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def line_has_tab(lines: list[str]) -> list[float]:
    """The cheap `module:callable` scorer of the large-corpus benchmark: 1.0 for a line indented with a tab."""
    return [float("\t" in line) for line in lines]


def write_large_corpus(path: Path, target_bytes: int) -> dict:
    """A jsonl.zst corpus of about `target_bytes` of jsonl (before compression): the interpreter's own Python
    files, cycled, each record with its own id. Real code, so lines and documents have realistic lengths."""
    texts = [d.text for d in Corpus(CorpusConfig(source="stdlib", extensions=[".py"], exclude=["test/*"],
                                                 max_document_chars=200_000))]
    written = records = 0
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < target_bytes:
            line = json.dumps({"id": f"doc-{records}", "text": texts[records % len(texts)]}).encode() + b"\n"
            out.write(line)
            written += len(line)
            records += 1
    return {"jsonl_mb": round(written / 1e6), "zst_mb": round(path.stat().st_size / 1e6), "documents": records}


def _score_in_own_process(corpus: Path, data_dir: Path, workers: int) -> dict:
    """`score_corpus` on `corpus` in a fresh interpreter, which reports its own peak resident memory (VmHWM starts
    anew at exec; a child's ru_maxrss would carry its parent's from before the exec) and its workers' largest."""
    code = ("import json, sys, time; from pathlib import Path; "
            "from phf.core.config import CorpusConfig, ScoringConfig; from phf.data.scoring import score_corpus; "
            "from benchmarks.bench_pipeline import peak_rss_mb, children_peak_rss_mb; t = time.perf_counter(); "
            "s = score_corpus(CorpusConfig(source=sys.argv[1]), ScoringConfig(scorer=sys.argv[4], "
            "workers=int(sys.argv[3])), Path(sys.argv[2]), progress=False); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'shards': len(s.shard_files()), "
            "'peak_rss_mb': round(peak_rss_mb()), 'worker_peak_rss_mb': round(children_peak_rss_mb())}))")
    done = subprocess.run([sys.executable, "-c", code, str(corpus), str(data_dir), str(workers), SCORER],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PhfError(f"scoring the large corpus failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_score_large(sizes_gb: tuple[float, ...], tmp: Path) -> dict:
    """The scoring pipeline, not the scorer: jsonl.zst corpora of each size (jsonl bytes before compression)
    read, segmented into lines, scored by a trivial callable on every core and written as shards; wall time and
    peak resident memory of the driver and of the largest scoring worker, each size in a fresh process."""
    workers = os.cpu_count() or 1
    out = {"scorer": f"{SCORER} (lines)", "workers": workers, "sizes": {}}
    for gb in sizes_gb:
        corpus = tmp / f"corpus-{gb}gb.jsonl.zst"
        made = write_large_corpus(corpus, int(gb * 1e9))
        figures = dict(made, **_score_in_own_process(corpus, tmp / f"data-{gb}gb", workers))
        figures["mb_per_s"] = round(made["jsonl_mb"] / figures["seconds"], 1)
        figures["seconds"] = round(figures["seconds"], 1)
        out["sizes"][f"{gb:g}"] = figures
        corpus.unlink()
        shutil.rmtree(tmp / f"data-{gb}gb", ignore_errors=True)
    return out
