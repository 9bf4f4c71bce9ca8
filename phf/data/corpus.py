"""Corpus -> documents: read text from the interpreter's own source, a folder, jsonl or Parquet, or a named source
that a task brings (the PII task's `debian`, the toxicity task's `toxicity-mix`: phf.tasks).

Every document gets a stable id (its relative path, or the record's `id`/line number) and a split
(train / validation / test) from a hash of that id, so the split never depends on reading order.
Files that cannot be used (binary, not UTF-8, unreadable, too long) are skipped and counted, never fatal.
"""
from __future__ import annotations

import dataclasses
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
    return keep_share(doc_id, max_documents / total)


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


@dataclass(frozen=True)
class Part:
    """One shard's worth of a corpus, described without its text: small enough to hand to another process, which
    then reads only this part of the input. A slice of the listing (folders, a task's named sources), a run of
    lines of a jsonl file (at a byte offset of its decompressed stream), rows of one Parquet row group, items of a
    JSON array, or rows of one split of a dataset."""

    kind: str  # "listed" | "lines" | "array" | "parquet" | "dataset"
    start: int  # listing index, byte offset, array index, row in the row group or split
    count: int  # entries, lines, items or rows
    path: str = ""  # the data file
    first: int = 0  # number of the first line / item / row in its file: the id of a record that has none
    group: int = 0  # the Parquet row group
    split: str = ""  # the dataset's split ("" for a Dataset without splits)
    keep: float = 1.0  # the share of records corpus.max_documents keeps (a hash test per record id)


class Corpus:
    """The documents of a source, planned as parts (`parts`) and read one part at a time (`read_part`), so that
    memory holds one part, not the corpus. Folders and a task's named sources are listed once (paths, or the
    records they bring); data files and datasets are only counted when planned and parsed when read."""

    def __init__(self, cfg: CorpusConfig, sources: Mapping[str, Callable] | None = None, precomputed: str = ""):
        """`sources`: the named sources a task brings, name -> lister(argument, stats) -> [(id, text or path)].
        `precomputed`: `SEGMENTS:SCORES`, the fields of a pre-scored corpus (scoring.precomputed)."""
        self.cfg = cfg
        self.precomputed = precomputed
        self.sources = dict(sources or {})
        self.stats = CorpusStats()
        self._listing: list[tuple[str, object]] | None = None  # (doc id, path or record) of listed sources
        self._parts: dict[int, list[Part]] = {}  # per part size
        self._open: dict = {}  # what reading the last part left open: a line stream, a row group, an array
        self._dataset: list | None = None  # a dataset source's splits (memory-mapped)

    def kind(self) -> str:
        """`listed` (folders, a single text file, a task's named source), `files` (data files) or `dataset`."""
        source = self.cfg.source
        if source in ("stdlib", "stdlib+site-packages") or source.partition(":")[0] in self.sources:
            return "listed"
        if source.startswith("hf:") or is_saved_dataset(Path(source).expanduser()):
            return "dataset"
        if self.data_files() is not None:
            return "files"
        if Path(source).expanduser().exists():
            return "listed"
        names = ["stdlib", "stdlib+site-packages", *self.sources]
        raise PhfError(f"corpus source {source} does not exist; give a folder, a data file (.jsonl, .jsonl.gz, "
                       f".jsonl.zst, .json, .parquet), a glob of them, a save_to_disk folder, hf:NAME, or one of: "
                       f"{', '.join(names)}")

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

    def listing(self) -> list[tuple[str, object]]:
        """The (id, path or record) entries of a listed source, sorted and deterministic; listed once."""
        if self._listing is not None:
            return self._listing
        source = self.cfg.source
        if source in ("stdlib", "stdlib+site-packages"):
            roots = source_roots(source)
            entries = self._list_folder(roots[0], exclude_site_packages=True, prefix="stdlib/")
            for root in roots[1:]:
                entries += self._list_folder(root, exclude_site_packages=False, prefix="site-packages/")
        elif source.partition(":")[0] in self.sources:
            name, _, argument = source.partition(":")
            entries = self._excluded(self.sources[name](argument, self.stats))
        elif (path := Path(source).expanduser()).is_dir():
            entries = self._list_folder(path, exclude_site_packages=False, prefix="")
        else:
            entries = [(path.name, path)]
        if self.cfg.max_documents:
            total = len(entries)
            entries = [e for e in entries if keep_in_subset(e[0], self.cfg.max_documents, total)]
        self._listing = entries
        return entries

    def _excluded(self, entries: list[tuple[str, object]]) -> list[tuple[str, object]]:
        """Drop (and count) the entries whose id matches a `corpus.exclude` pattern."""
        kept = [e for e in entries if not any(fnmatch.fnmatch(e[0], pat) for pat in self.cfg.exclude)]
        self.stats.skipped["excluded"] += len(entries) - len(kept)
        if not self.stats.skipped["excluded"]:
            del self.stats.skipped["excluded"]
        return kept

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
            return [(i, p) for i, p in self.listing() if isinstance(p, Path)]  # listed once, read later
        return [(path.name, path)] if path.exists() else []

    # -- planning ------------------------------------------------------------------------------------------
    def parts(self, size: int) -> list[Part]:
        """The corpus cut into parts of `size` entries, lines, items or rows, in reading order. Data files are
        counted here (one pass that keeps nothing but offsets), so the plan is known before anything is scored."""
        if size in self._parts:
            return self._parts[size]
        kind = self.kind()
        if kind == "listed":
            n = len(self.listing())
            parts = [Part("listed", a, min(size, n - a)) for a in range(0, n, size)]
        elif kind == "dataset":
            parts = []
            for split_name, rows in self._dataset_splits():
                n = len(rows)
                parts += [Part("dataset", a, min(size, n - a), first=a, split=split_name) for a in range(0, n, size)]
        else:
            files = self.data_files()
            alone = len(files) == 1 and files[0] == Path(self.cfg.source).expanduser()  # not one of a glob's
            parts = []
            for file in files:
                parts += self._file_parts(file, size, alone)
        if kind != "listed" and self.cfg.max_documents:  # a hash test per record id, at the share it keeps
            total = sum(p.count for p in parts)
            keep = min(1.0, self.cfg.max_documents / max(total, 1))
            parts = [dataclasses.replace(p, keep=keep) for p in parts]
        self._parts[size] = parts
        return parts

    def _file_parts(self, path: Path, size: int, alone: bool) -> list[Part]:
        """A data file's parts. A damaged file given alone ends the run with one line; among several, it is
        skipped and counted (its records before the damage are kept) and the others are read."""
        try:
            return file_parts(path, size, self.cfg, self.precomputed)
        except PhfError as exc:
            if alone:
                raise
            log.warning("skipped: %s", exc)
            self.stats.skipped["damaged data file"] += 1
            return getattr(exc, "parts", [])

    # -- reading ---------------------------------------------------------------------------------------------
    def read_part(self, part: Part) -> list[Document]:
        """The usable documents of one part (the others are counted in `stats`)."""
        if part.kind == "listed":
            entries = self.listing()[part.start:part.start + part.count]
        else:
            records = _Records(self.cfg, self.stats, self.precomputed)
            split = SPLIT_NAMES[part.split.lower()] if part.split else None  # a DatasetDict's own split
            entries = [e for rec, fallback in self._records(part)
                       if (e := records.entry(rec, fallback, split)) is not None
                       and (part.keep >= 1.0 or keep_share(e[0], part.keep))]
        return [d for d in (self.read(doc_id, loc) for doc_id, loc in entries) if d is not None]

    def _records(self, part: Part) -> list[tuple[object, str]]:
        """(record, id for a record without one) of a part of a data file or dataset."""
        if part.kind == "dataset":
            rows = dict(self._dataset_splits())[part.split]
            columns = rows[part.start:part.start + part.count]  # a dict of columns, read from the memory map
            names = list(columns)
            return [(dict(zip(names, values)), f"{part.split or 'rows'}:{part.first + j}")
                    for j, values in enumerate(zip(*columns.values()))]
        path = Path(part.path)
        if part.kind == "parquet":
            rows = self._cached(("parquet", part.path, part.group), lambda: read_row_group(path, part.group, self.cfg,
                                                                                          self.precomputed))
            rows = rows[part.start:part.start + part.count]
            return [(rec, f"{path.name}:{part.first + j}") for j, rec in enumerate(rows) if rec is not None]
        if part.kind == "array":
            data = self._cached(("array", part.path), lambda: read_json_array(path))
            return [(data[i], f"{path.name}:{i}") for i in range(part.start, part.start + part.count)]
        records = []
        for lineno, raw in enumerate(self._lines(part), part.first):
            if not raw.strip():
                continue
            try:
                records.append((json.loads(raw.decode("utf-8")), f"{path.name}:{lineno}"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.stats.skipped["malformed jsonl line"] += 1
        return records

    def _cached(self, key: tuple, load: Callable):
        """One row group or JSON array at a time: consecutive parts of it are read from memory."""
        if self._open.get("key") != key:
            self.close()
            self._open = {"key": key, "value": load()}
        return self._open["value"]

    def _lines(self, part: Part) -> list[bytes]:
        """The lines of a jsonl part. Consecutive parts of a file continue one open stream (a compressed stream
        cannot seek back, and reopening it for every part would decompress the file over and over)."""
        key = ("lines", part.path, part.start)
        if self._open.get("key") != key:
            self.close()
            stream = _open_text(Path(part.path))
            try:
                _skip(stream, part.start)
            except (OSError, EOFError, zstandard.ZstdError) as exc:
                stream.close()
                raise PhfError(_damage(Path(part.path), exc)) from None
            self._open = {"key": key, "value": stream}
        stream = self._open["value"]
        lines, offset = [], part.start
        try:
            for _ in range(part.count):
                raw = stream.readline()
                if not raw:
                    break
                offset += len(raw)
                lines.append(raw)
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            self.close()
            raise PhfError(f"{_damage(Path(part.path), exc)}; it changed since it was counted") from None
        self._open["key"] = ("lines", part.path, offset)
        return lines

    def close(self) -> None:
        """Close what reading left open (a line stream, a cached row group or array)."""
        if hasattr(self._open.get("value"), "close"):
            self._open["value"].close()
        self._open = {}

    def _dataset_splits(self) -> list[tuple[str, object]]:
        """(split name, rows with only the columns phf reads) of a dataset source; loaded (memory-mapped) once."""
        if self._dataset is None:
            source = self.cfg.source
            data = (load_hub_dataset(source) if source.startswith("hf:")
                    else load_saved_dataset(Path(source).expanduser()))
            self._dataset = dataset_splits(data, source, self.cfg, self.precomputed)
        return self._dataset

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
            text = locator  # a record's text
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
        for part in self.parts(1024):
            yield from self.read_part(part)
        self.close()


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

    def __init__(self, cfg: CorpusConfig, stats: CorpusStats, precomputed: str = ""):
        self.cfg, self.stats = cfg, stats
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


def _skip(stream, offset: int) -> None:
    """Move a freshly opened stream to `offset`: a seek for a plain file, reading forward for a compressed one."""
    if isinstance(stream, io.BufferedReader) and isinstance(stream.raw, io.FileIO):
        stream.seek(offset)
        return
    while offset > 0:
        block = stream.read(min(offset, 1 << 20))
        if not block:
            raise EOFError("the file is shorter than when it was counted")
        offset -= len(block)


def keep_share(doc_id: str, share: float) -> bool:
    """Whether a document is in the deterministic subset that keeps about `share` of all, chosen by hash."""
    return int.from_bytes(hashlib.sha1(b"subset:" + doc_id.encode("utf-8", "surrogatepass")).digest()[:8],
                          "big") / 2**64 < share


class _DamagedFile(PhfError):
    """A data file that broke off: its message, and the parts before the damage (read as usual)."""

    def __init__(self, message: str, parts: list):
        super().__init__(message)
        self.parts = parts


def file_parts(path: Path, size: int, cfg: CorpusConfig, precomputed: str = "") -> list[Part]:
    """One data file cut into parts of `size` lines, items or rows, without keeping any text: jsonl files are
    read once to find where each part starts, a Parquet file's row groups come from its footer."""
    if path.name.endswith(".parquet"):
        file = parquet_file(path, cfg, precomputed)
        parts, row = [], 0
        for group in range(file.num_row_groups):  # parts never cross a row group: one group in memory at a time
            n = file.metadata.row_group(group).num_rows
            parts += [Part("parquet", a, min(size, n - a), str(path), row + a, group) for a in range(0, n, size)]
            row += n
        return parts
    if path.name.endswith(".json"):
        n = len(read_json_array(path))
        return [Part("array", a, min(size, n - a), str(path), a) for a in range(0, n, size)]
    parts, offset, count, start, first = [], 0, 0, 0, 1
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, 1):
                if count == 0:
                    start, first = offset, lineno
                offset += len(raw)
                count += 1
                if count == size:
                    parts.append(Part("lines", start, count, str(path), first))
                    count = 0
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        if count:
            parts.append(Part("lines", start, count, str(path), first))
        raise _DamagedFile(_damage(path, exc), parts) from None
    if count:
        parts.append(Part("lines", start, count, str(path), first))
    return parts


def read_json_array(path: Path) -> list:
    """A `.json` file's array of records. The array is read whole: give large corpora as jsonl, which streams."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PhfError(f"{path} is not a JSON array of records ({exc}); give one JSON object per line as "
                       f".jsonl instead") from None
    if not isinstance(data, list):
        raise PhfError(f"{path} holds a JSON {type(data).__name__}, not an array of records")
    return data


def _wanted(cfg: CorpusConfig, precomputed: str) -> list[str]:
    """The columns a record must have: the text, or a pre-scored corpus' segments and scores."""
    return precomputed.split(":") if precomputed else [cfg.text_column]


def _columns(cfg: CorpusConfig, precomputed: str, names: list[str]) -> list[str]:
    """The columns phf reads from a table with columns `names`."""
    return [c for c in (*_wanted(cfg, precomputed), cfg.id_column or "id", cfg.split_column) if c and c in names]


def parquet_file(path: Path, cfg: CorpusConfig, precomputed: str = "") -> pq.ParquetFile:
    """An open Parquet file whose schema holds the columns phf reads (one clear line when it does not)."""
    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise PhfError(f"{path} is not a readable Parquet file ({first_line(exc)}); check the file or "
                       f"convert it to jsonl") from None
    names = file.schema_arrow.names
    for column in _wanted(cfg, precomputed):
        if column not in names:
            raise PhfError(f"{path} has no `{column}` column (columns: {', '.join(names)}); set "
                           f"{'scoring.precomputed' if precomputed else 'corpus.text_column'} to the "
                           f"column(s) holding the documents")
    kind = file.schema_arrow.field(cfg.text_column).type if not precomputed else None
    if kind is not None and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PhfError(f"{path}: column `{cfg.text_column}` must hold strings, not {kind}")
    return file


def read_row_group(path: Path, group: int, cfg: CorpusConfig, precomputed: str = "") -> list[dict | None]:
    """The records of one row group (None for a row whose text is null)."""
    file = parquet_file(path, cfg, precomputed)
    key = _wanted(cfg, precomputed)[0]
    rows = file.read_row_group(group, columns=_columns(cfg, precomputed, file.schema_arrow.names)).to_pylist()
    return [rec if rec[key] is not None else None for rec in rows]


# -- Hugging Face datasets ------------------------------------------------------------------------------------------
def dataset_splits(data, where: str, cfg: CorpusConfig, precomputed: str = "") -> list[tuple[str, object]]:
    """(split name, rows with only the columns phf reads) of a `datasets` Dataset ("" for its one part: the hash
    split, or corpus.split_column) or DatasetDict (its own splits, which must be train / validation / test)."""
    import datasets

    parts = data.items() if isinstance(data, datasets.DatasetDict) else [("", data)]
    out = []
    for name, part in parts:
        if name and name.lower() not in SPLIT_NAMES:
            raise PhfError(f"dataset {where} has a split {name!r}; phf reads train, validation (or valid, "
                           f"val, dev) and test: rename or drop it before saving")
        for column in _wanted(cfg, precomputed):
            if column not in part.column_names:
                raise PhfError(f"dataset {where}{f' ({name})' if name else ''} has no `{column}` column "
                               f"(columns: {', '.join(part.column_names)}); set "
                               f"{'scoring.precomputed' if precomputed else 'corpus.text_column'}")
        out.append((name, part.select_columns(_columns(cfg, precomputed, part.column_names))))
    return out


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
