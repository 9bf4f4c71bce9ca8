"""Atomic, verifiable file writes.

Every file phf produces is written to a temporary name in the same folder and renamed into place, so a run
killed at any moment leaves either the old file or the new one, never a half-written file that looks complete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from phf.core.errors import PhfError


def _explain_os_error(exc: OSError, path: Path) -> PhfError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return PhfError(f"no space left while writing {path} ({exc.strerror}); free some disk space or choose "
                        f"another --out folder and run the command again: completed files were kept")
    return PhfError(f"could not write {path}: {exc.strerror or exc}")


_UMASK = os.umask(0o022)  # read the process umask (setting it back at once)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success, fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make shared results unreadable to others
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _explain_os_error(exc, path) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PhfError(f"{path} is damaged ({exc}); delete it and run the stage that writes it again") from exc


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it; a line cut by a crash is skipped by `read_jsonl`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a last line cut short by a crash
    return records


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place, replacing an older one (the old one is removed only after)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def recover_dir(final_dir: Path) -> None:
    """Finish an interrupted `replace_dir`: if the folder is missing but its previous version was moved aside,
    put the previous version back (the new one never became visible, so it is incomplete or absent)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if not final_dir.exists() and old.exists():
        os.replace(old, final_dir)


def stable_hash(obj: Any, n: int = 12) -> str:
    """A short, deterministic hash of a JSON-serialisable object (config hashes, cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
