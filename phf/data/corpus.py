"""Corpus -> documents: read text from the interpreter's own source, a folder, jsonl or Parquet, or a named source
that a task brings (the PII task's `debian`, the toxicity task's `toxicity-mix`: phf.tasks).

Every document gets a stable id (its relative path, or the record's `id`/line number) and a split
(train / validation / test) from a hash of that id, so the split never depends on reading order.
Files that cannot be used (binary, not UTF-8, unreadable, too long) are skipped and counted, never fatal.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import io
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
import zstandard

from phf.core.config import CorpusConfig
from phf.core.errors import PhfError, first_line

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    split: str = "train"
    given: tuple | None = None  # precomputed (segment lengths, segment scores) of a pre-scored corpus


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

    def __init__(self, cfg: CorpusConfig, sources: Mapping[str, Callable] | None = None, precomputed: str = ""):
        """`sources`: the named sources a task brings, name -> lister(argument, stats) -> [(id, text or path)].
        `precomputed`: `SEGMENTS:SCORES`, the fields of a pre-scored corpus (scoring.precomputed)."""
        self.cfg = cfg
        self.precomputed = precomputed
        self.sources = dict(sources or {})
        self.stats = CorpusStats()
        self._entries: list[tuple[str, object]] | None = None  # (doc id, locator)

    # -- listing -------------------------------------------------------------------------------------------
    def _list_folder(self, root: Path, exclude_site_packages: bool, prefix: str) -> list[tuple[str, object]]:
        entries = []
        exts = tuple(e for e in self.cfg.extensions if e)
        bare = "" in self.cfg.extensions  # files without an extension too (README, LICENSE, changelog)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            rel_dir = os.path.relpath(dirpath, root)
            if exclude_site_packages:
                dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
            dirnames.sort()
            for name in sorted(filenames):
                if (exts or bare) and not (exts and name.endswith(exts)) and not (bare and "." not in name[1:]):
                    if not prefix:  # a user's folder: say what was left out (not the interpreter's own files)
                        self.stats.skipped["extension not in corpus.extensions"] += 1
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
        elif source.startswith("hf:"):
            entries = self._list_dataset(load_hub_dataset(source), source)
        else:
            path = Path(source).expanduser()
            if is_saved_dataset(path):
                entries = self._list_dataset(load_saved_dataset(path), str(path))
            elif (files := self.data_files()) is not None:
                entries = []
                for file in files:
                    entries += self._list_data_file(file, alone=len(files) == 1 and file == path)
            elif path.is_dir():
                entries = self._list_folder(path, exclude_site_packages=False, prefix="")
            elif path.exists():
                entries = [(path.name, path)]
            else:
                names = ["stdlib", "stdlib+site-packages", *self.sources]
                raise PhfError(f"corpus source {source} does not exist; give a folder, a data file (.jsonl, "
                               f".jsonl.gz, .jsonl.zst, .json, .parquet), a glob of them, a save_to_disk folder, "
                               f"hf:NAME, or one of: {', '.join(names)}")
        if self.cfg.max_documents:
            total = len(entries)
            entries = [e for e in entries if keep_in_subset(e[0], self.cfg.max_documents, total)]
        self._entries = entries
        return entries

    def data_files(self) -> list[Path] | None:
        """The data files of a data-file source: the file itself, a glob's matches, or a folder holding data files
        only (a folder with anything else, say a code base with a package.json, is a folder of text files); None
        for any other source."""
        source = self.cfg.source
        if any(c in source for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if is_data_file(p))
            if not files:
                raise PhfError(f"corpus source {source} matches no data file (.jsonl, .jsonl.gz, .jsonl.zst, .json, "
                               f".parquet)")
            return files
        path = Path(source).expanduser()
        if path.is_file() and is_data_file(path.name):
            return [path]
        if path.is_dir() and not is_saved_dataset(path):
            inside = [p for p in path.iterdir() if not p.name.startswith((".", "_"))]  # not Spark's _SUCCESS
            if inside and all(p.is_file() and is_data_file(p.name) for p in inside):
                return sorted(inside)
        return None

    def input_files(self) -> list[tuple[str, Path]] | None:
        """The files this source reads, as (name, path), without reading them: what the scored corpus' key
        fingerprints. None for a task's named source, which identifies itself by its version."""
        source = self.cfg.source
        if source.partition(":")[0] in self.sources:
            return None
        if source.startswith("hf:"):
            return None  # the datasets cache identifies its own versions
        path = Path(source).expanduser()
        if is_saved_dataset(path):
            return [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.is_file()]
        if (files := self.data_files()) is not None:
            return [(str(p), p) for p in files]
        if source in ("stdlib", "stdlib+site-packages") or path.is_dir():
            return [(i, p) for i, p in self.entries() if isinstance(p, Path)]  # listed once, read later
        return [(path.name, path)] if path.exists() else []

    def _list_data_file(self, path: Path, alone: bool) -> list[tuple[str, object]]:
        """A data file's records. A damaged file given alone ends the run with one line; among several, it is
        skipped and counted (its records before the damage are kept) and the others are read."""
        try:
            entries = list_data_file(path, self.cfg, self.stats, self.precomputed)
        except PhfError as exc:
            if alone:
                raise
            log.warning("skipped: %s", exc)
            self.stats.skipped["damaged data file"] += 1
            return getattr(exc, "entries", [])
        if alone and not entries and sum(self.stats.skipped.values()):
            raise PhfError(f"{path}: no usable record (each must have a string `{self.cfg.text_column}` field; "
                           f"corpus.text_column names another); skipped: {dict(self.stats.skipped)}")
        return entries

    def _list_dataset(self, data, where: str) -> list[tuple[str, object]]:
        """The rows of a `datasets` Dataset (hash split, or corpus.split_column) or DatasetDict (its own splits)."""
        import datasets

        parts = data.items() if isinstance(data, datasets.DatasetDict) else [(None, data)]
        entries = []
        for name, part in parts:
            split = None
            if name is not None:
                split = SPLIT_NAMES.get(name.lower())
                if split is None:
                    raise PhfError(f"dataset {where} has a split {name!r}; phf reads train, validation (or valid, "
                                   f"val, dev) and test: rename or drop it before saving")
            wanted = self.precomputed.split(":") if self.precomputed else [self.cfg.text_column]
            for column in wanted:
                if column not in part.column_names:
                    raise PhfError(f"dataset {where}{f' ({name})' if name else ''} has no `{column}` column "
                                   f"(columns: {', '.join(part.column_names)}); set "
                                   f"{'scoring.precomputed' if self.precomputed else 'corpus.text_column'}")
            records = _Records(self.cfg, self.stats, where, self.precomputed)
            keep = [c for c in (*wanted, self.cfg.id_column or "id", self.cfg.split_column)
                    if c and c in part.column_names]
            for i, rec in enumerate(part.select_columns(keep)):
                if (e := records.entry(rec, f"{name or 'rows'}:{i}", split)) is not None:
                    entries.append(e)
        return entries

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
        elif isinstance(locator, tuple):  # a record's text, the split it names, its precomputed scores
            return self._accept(doc_id, *locator)
        else:
            text = locator  # already-loaded text (jsonl / parquet)
        return self._accept(doc_id, text)

    def _accept(self, doc_id: str, text: str, split: str | None = None, given: tuple | None = None
                ) -> Document | None:
        if "\x00" in text:
            self.stats.skipped["binary (NUL bytes)"] += 1
            return None
        if not text.strip():
            self.stats.skipped["empty"] += 1
            return None
        if len(text) > self.cfg.max_document_chars:
            self.stats.skipped["too long"] += 1
            return None
        split = split or split_of(doc_id, self.cfg.validation_fraction, self.cfg.test_fraction)
        self.stats.documents[split] += 1
        return Document(doc_id, text, split, given)

    def __iter__(self) -> Iterator[Document]:
        for doc_id, locator in self.entries():
            doc = self.read(doc_id, locator)
            if doc is not None:
                yield doc


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet")
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}


def is_data_file(name: str | Path) -> bool:
    return str(name).endswith(DATA_SUFFIXES)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


class _Records:
    """Turns records (dicts) of a data source into corpus entries: the text, id and split columns."""

    def __init__(self, cfg: CorpusConfig, stats: CorpusStats, where: str, precomputed: str = ""):
        self.cfg, self.stats, self.where = cfg, stats, where
        self.segments, _, self.scores = precomputed.partition(":")

    def entry(self, rec, fallback_id: str, split: str | None = None) -> tuple[str, object] | None:
        given = None
        if self.segments:  # a pre-scored record: its text is its segments joined
            if not isinstance(rec, dict):
                self.stats.skipped["record is not an object"] += 1
                return None
            given = self.given(rec)
            if given is None:
                return None
            rec = dict(rec, **{self.cfg.text_column: "".join(rec[self.segments])})
        col = self.cfg.text_column
        if not isinstance(rec, dict) or col not in rec:
            self.stats.skipped[f"record without a {col} field"] += 1
            return None
        if not isinstance(rec[col], str):
            self.stats.skipped[f"{col} is not a string"] += 1
            return None
        id_col = self.cfg.id_column or "id"
        doc_id = str(rec[id_col]) if rec.get(id_col) is not None else fallback_id
        if self.cfg.split_column:
            named = SPLIT_NAMES.get(str(rec.get(self.cfg.split_column)).lower())
            if named is None:
                self.stats.skipped[f"{self.cfg.split_column} not train, validation or test"] += 1
                return None
            split = named
        if given is not None:
            return (doc_id, (rec[col], split, given))
        return (doc_id, (rec[col], split) if split else rec[col])

    def given(self, rec: dict) -> tuple | None:
        """(segment lengths, scores) of a pre-scored record, or None (counted) when they are unusable."""
        segments, scores = rec.get(self.segments), rec.get(self.scores)
        if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
            self.stats.skipped[f"{self.segments} is not a list of strings"] += 1
            return None
        if not isinstance(scores, list) or len(scores) != len(segments):
            self.stats.skipped[f"{self.scores} is not a list as long as {self.segments}"] += 1
            return None
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError):
            self.stats.skipped[f"{self.scores} holds a value that is not a number"] += 1
            return None
        return ([len(s) for s in segments], values)


def _open_text(path: Path):
    """A data file as lines of bytes: plain, gzip or zstandard, by its suffix."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _damage(path: Path, exc: Exception) -> str:
    kind = "zstandard" if path.name.endswith(".zst") else "gzip" if path.name.endswith(".gz") else "file"
    return f"{path} is not a readable {kind} file or is truncated ({first_line(exc)})"


def list_data_file(path: Path, cfg: CorpusConfig, stats: CorpusStats, precomputed: str = ""
                   ) -> list[tuple[str, object]]:
    """The records of one data file as corpus entries. A damaged file raises PhfError after the records read
    before the damage were listed into `stats` (the caller decides whether that ends the run)."""
    records = _Records(cfg, stats, str(path), precomputed)
    if path.name.endswith(".parquet"):
        return _list_parquet(path, records)
    if path.name.endswith(".json"):
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PhfError(f"{path} is not a JSON array of records ({exc}); give one JSON object per line as "
                           f".jsonl instead") from None
        if not isinstance(data, list):
            raise PhfError(f"{path} holds a JSON {type(data).__name__}, not an array of records")
        return [e for i, rec in enumerate(data) if (e := records.entry(rec, f"{path.name}:{i}")) is not None]
    entries = []
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    stats.skipped["malformed jsonl line"] += 1
                    continue
                if (e := records.entry(rec, f"{path.name}:{lineno}")) is not None:
                    entries.append(e)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise _DamagedFile(_damage(path, exc), entries) from None
    return entries


class _DamagedFile(PhfError):
    """A data file that broke off: its message, and the entries read before the damage."""

    def __init__(self, message: str, entries: list):
        super().__init__(message)
        self.entries = entries


def _list_parquet(path: Path, records: _Records) -> list[tuple[str, object]]:
    cfg = records.cfg
    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise PhfError(f"{path} is not a readable Parquet file ({first_line(exc)}); check the file or "
                       f"convert it to jsonl") from None
    names = file.schema_arrow.names
    wanted = [records.segments, records.scores] if records.segments else [cfg.text_column]
    for column in wanted:
        if column not in names:
            raise PhfError(f"{path} has no `{column}` column (columns: {', '.join(names)}); set "
                           f"{'scoring.precomputed' if records.segments else 'corpus.text_column'} to the "
                           f"column(s) holding the documents")
    kind = file.schema_arrow.field(wanted[0]).type
    if not records.segments and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PhfError(f"{path}: column `{cfg.text_column}` must hold strings, not {kind}")
    columns = [c for c in (*wanted, cfg.id_column or "id", cfg.split_column) if c and c in names]
    entries, row = [], 0
    for group in range(file.num_row_groups):  # one row group in memory at a time
        for rec in file.read_row_group(group, columns=columns).to_pylist():
            if rec[wanted[0]] is not None and (e := records.entry(rec, f"{path.name}:{row}")) is not None:
                entries.append(e)
            row += 1
    return entries


# -- Hugging Face datasets ------------------------------------------------------------------------------------------
def load_saved_dataset(path: Path):
    import datasets  # a second or more to import: only for dataset sources

    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise PhfError(f"dataset folder {path} cannot be loaded ({first_line(exc)}); write it again with "
                       f"`save_to_disk`") from None


def load_hub_dataset(source: str):
    """`hf:NAME[:CONFIG]` through `datasets.load_dataset`: from the local cache unless downloads are allowed."""
    import datasets

    name, _, config = source[3:].partition(":")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as exc:
        raise PhfError(f"cannot load dataset {source} ({first_line(exc)}); it is read from the local datasets cache unless "
                       f"downloads are allowed (HF_HUB_OFFLINE=0)") from None
