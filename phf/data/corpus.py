"""Corpus -> documents: read text from the interpreter's own source, a folder, jsonl or Parquet, or a named source
that a task brings (the PII task's `debian`, the toxicity task's `toxicity-mix`: phf.tasks).

Every document gets a stable id (its relative path, or the record's `id`/line number) and a split
(train / validation / test) from a hash of that id, so the split never depends on reading order.
Files that cannot be used (binary, not UTF-8, unreadable, too long) are skipped and counted, never fatal.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import site
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from phf.core.config import CorpusConfig
from phf.core.errors import PhfError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    split: str = "train"


@dataclass
class CorpusStats:
    documents: Counter = field(default_factory=Counter)  # per split
    skipped: Counter = field(default_factory=Counter)  # per reason

    def summary(self) -> dict:
        return {"documents": dict(self.documents), "skipped": dict(self.skipped)}


def split_of(doc_id: str, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the document id."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def keep_in_subset(doc_id: str, max_documents: int, total: int) -> bool:
    """A deterministic subset of about `max_documents` of `total` documents, chosen by hash."""
    if not max_documents or max_documents >= total:
        return True
    u = int.from_bytes(hashlib.sha1(b"subset:" + doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64
    return u < max_documents / total


def source_roots(source: str) -> list[Path]:
    """Resolve the names `stdlib` and `stdlib+site-packages` to folders; anything else is a path."""
    paths = sysconfig.get_paths()
    if source == "stdlib":
        return [Path(paths["stdlib"])]
    if source == "stdlib+site-packages":
        roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
        roots += [Path(p) for p in site.getsitepackages() if Path(p) not in roots]
        return roots
    return [Path(source).expanduser()]


class Corpus:
    """The documents of a source, listed once (sorted, deterministic) and read lazily."""

    def __init__(self, cfg: CorpusConfig, sources: Mapping[str, Callable] | None = None):
        """`sources`: the named sources a task brings, name -> lister(argument, stats) -> [(id, text or path)]."""
        self.cfg = cfg
        self.sources = dict(sources or {})
        self.stats = CorpusStats()
        self._entries: list[tuple[str, object]] | None = None  # (doc id, locator)

    # -- listing -------------------------------------------------------------------------------------------
    def _list_folder(self, root: Path, exclude_site_packages: bool, prefix: str) -> list[tuple[str, object]]:
        entries = []
        exts = tuple(self.cfg.extensions)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            rel_dir = os.path.relpath(dirpath, root)
            if exclude_site_packages:
                dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
            dirnames.sort()
            for name in sorted(filenames):
                if exts and not name.endswith(exts):
                    continue
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if any(fnmatch.fnmatch(rel, pat) for pat in self.cfg.exclude):
                    self.stats.skipped["excluded"] += 1
                    continue
                path = Path(dirpath) / name
                if path.is_symlink():
                    self.stats.skipped["symlink"] += 1
                    continue
                entries.append((prefix + rel, path))
        return entries

    def entries(self) -> list[tuple[str, object]]:
        if self._entries is not None:
            return self._entries
        source = self.cfg.source
        entries: list[tuple[str, object]] = []
        if source in ("stdlib", "stdlib+site-packages"):
            roots = source_roots(source)
            entries += self._list_folder(roots[0], exclude_site_packages=True, prefix="stdlib/")
            for root in roots[1:]:
                entries += self._list_folder(root, exclude_site_packages=False, prefix="site-packages/")
        elif source.partition(":")[0] in self.sources:
            name, _, argument = source.partition(":")
            entries = self._excluded(self.sources[name](argument, self.stats))
        else:
            path = Path(source).expanduser()
            if not path.exists():
                names = ["stdlib", "stdlib+site-packages", *self.sources]
                raise PhfError(f"corpus source {source} does not exist; give a folder, a .jsonl or a .parquet file, "
                               f"or one of: {', '.join(names)}")
            if path.is_dir() and not _is_parquet_dir(path):
                entries = self._list_folder(path, exclude_site_packages=False, prefix="")
            elif path.suffix == ".jsonl" or path.suffix == ".json":
                entries = _list_jsonl(path, self.stats)
            elif path.suffix == ".parquet" or _is_parquet_dir(path):
                entries = _list_parquet(path)
            else:
                entries = [(path.name, path)]
        if self.cfg.max_documents:
            total = len(entries)
            entries = [e for e in entries if keep_in_subset(e[0], self.cfg.max_documents, total)]
        self._entries = entries
        return entries

    def input_files(self) -> list[tuple[str, Path]] | None:
        """The files this source reads, as (name, path), without reading them: what the scored corpus' key
        fingerprints. None for a task's named source, which identifies itself by its version."""
        source = self.cfg.source
        if source.partition(":")[0] in self.sources:
            return None
        path = Path(source).expanduser()
        if source in ("stdlib", "stdlib+site-packages") or (path.is_dir() and not _is_parquet_dir(path)):
            return [(i, p) for i, p in self.entries() if isinstance(p, Path)]  # listed once, read later
        if _is_parquet_dir(path):
            return [(p.name, p) for p in sorted(path.glob("*.parquet"))]
        return [(path.name, path)] if path.exists() else []

    def _excluded(self, entries: list[tuple[str, object]]) -> list[tuple[str, object]]:
        """Drop (and count) the entries whose id matches a `corpus.exclude` pattern."""
        kept = [e for e in entries if not any(fnmatch.fnmatch(e[0], pat) for pat in self.cfg.exclude)]
        self.stats.skipped["excluded"] += len(entries) - len(kept)
        if not self.stats.skipped["excluded"]:
            del self.stats.skipped["excluded"]
        return kept

    # -- reading ---------------------------------------------------------------------------------------------
    def read(self, doc_id: str, locator: object) -> Document | None:
        """Read one document; None (and a counted reason) when it cannot be used."""
        if isinstance(locator, Path):
            try:
                raw = locator.read_bytes()
            except OSError as exc:
                self.stats.skipped[f"unreadable ({exc.strerror or type(exc).__name__})"] += 1
                return None
            if b"\x00" in raw:
                self.stats.skipped["binary (NUL bytes)"] += 1
                return None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.stats.skipped["not UTF-8"] += 1
                return None
        else:
            text = locator  # already-loaded text (jsonl / parquet)
        return self._accept(doc_id, text)

    def _accept(self, doc_id: str, text: str) -> Document | None:
        if "\x00" in text:
            self.stats.skipped["binary (NUL bytes)"] += 1
            return None
        if not text.strip():
            self.stats.skipped["empty"] += 1
            return None
        if len(text) > self.cfg.max_document_chars:
            self.stats.skipped["too long"] += 1
            return None
        split = split_of(doc_id, self.cfg.validation_fraction, self.cfg.test_fraction)
        self.stats.documents[split] += 1
        return Document(doc_id, text, split)

    def __iter__(self) -> Iterator[Document]:
        for doc_id, locator in self.entries():
            doc = self.read(doc_id, locator)
            if doc is not None:
                yield doc


def _is_parquet_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.parquet"))


def _list_jsonl(path: Path, stats: CorpusStats) -> list[tuple[str, object]]:
    entries = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                stats.skipped["malformed jsonl line"] += 1
                continue
            if not isinstance(rec, dict) or "text" not in rec:
                stats.skipped["jsonl line without a text field"] += 1
                continue
            if not isinstance(rec["text"], str):
                stats.skipped["jsonl text is not a string"] += 1
                continue
            doc_id = str(rec.get("id", f"{path.name}:{lineno}"))
            entries.append((doc_id, rec["text"]))
    if not entries and sum(stats.skipped.values()):
        raise PhfError(f"{path}: no usable line (each line must be a JSON object with a string `text` field); "
                       f"skipped: {dict(stats.skipped)}")
    return entries


def _list_parquet(path: Path) -> list[tuple[str, object]]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    entries = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise PhfError(f"{file} is not a readable Parquet file ({exc}); check the file or convert it to jsonl") from None
        if "text" not in table.column_names:
            raise PhfError(f"{file} has no `text` column (columns: {', '.join(table.column_names)}); "
                           f"rename the column holding the documents to `text`")

        if not pa.types.is_string(table.schema.field("text").type) and not pa.types.is_large_string(
                table.schema.field("text").type):
            raise PhfError(f"{file}: column `text` must hold strings, not {table.schema.field('text').type}")
        texts = table.column("text").to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        for i, text in enumerate(texts):
            if text is None:
                continue
            entries.append((str(ids[i]) if ids else f"{file.name}:{i}", text))
    return entries
