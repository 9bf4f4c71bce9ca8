"""The PII task's corpus: the Debian changelogs and copyright files installed on the machine.

    debian         /usr/share/doc/*/changelog*.gz and /usr/share/doc/*/copyright, one document per file,
                   de-duplicated by content (the first in sorted order is kept)
    debian:FOLDER  a folder laid out the same way

Real text no one here wrote, full of names and e-mail addresses, assembled the same way on every machine with the
same packages. Damaged, binary and non-UTF-8 files are skipped and counted.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

from phf.core.errors import PhfError
from phf.data.corpus import CorpusStats

DEBIAN_DOC_ROOT = "/usr/share/doc"
DEBIAN_EXCERPT_CHARS = 2000  # toxicity-mix: the newest changelog entries of each package, up to this many chars


def decode_bytes(raw: bytes, name: str, stats: CorpusStats) -> str | None:
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
        text = decode_bytes(raw, str(path), stats)
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


def debian_source(argument: str, stats: CorpusStats) -> list[tuple[str, object]]:
    """`corpus.source: debian` (or `debian:FOLDER`)."""
    root = Path(argument or DEBIAN_DOC_ROOT).expanduser()
    entries = list_debian(root, stats)
    if not entries:
        raise PhfError(f"corpus source debian: no changelog*.gz or copyright file under {root}/*/ "
                       f"(a Debian or Ubuntu system has them in /usr/share/doc); give your own corpus "
                       f"with corpus.source=PATH instead")
    return entries
