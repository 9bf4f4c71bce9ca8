"""Shared by the prompt builders of the prose tasks."""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path


def spread(candidates: list[list[str]], limit: int) -> list[str]:
    """Up to `limit` distinct prompts, one per document in turn (documents and prompts in a fixed hashed order),
    so that no single long document supplies most of them."""
    def key(p: str) -> str:
        return hashlib.sha1(p.encode("utf-8", "surrogatepass")).hexdigest()

    per_doc = sorted((sorted(set(c), key=key) for c in candidates if c), key=lambda c: key(c[0]))
    out, seen, depth = [], set(), 0
    while len(out) < limit and any(depth < len(c) for c in per_doc):
        for c in per_doc:
            if depth < len(c) and c[depth] not in seen and len(out) < limit:
                seen.add(c[depth])
                out.append(c[depth])
        depth += 1
    return out


@functools.lru_cache(maxsize=4)
def installed_texts(kind: str, limit: int = 400, max_chars: int = 200_000) -> tuple[str, ...]:
    """Text of another origin than any shipped corpus, found offline in the Python environment phf runs in: `code`,
    the Python files of the installed third-party packages (not the standard library, not phf); `metadata`, their
    METADATA files (author and maintainer lines with addresses, descriptions); `descriptions`, only the prose
    descriptions of those files. A fixed choice of `limit` files, by a hash of their path inside the environment,
    so the same environment gives the same prompts."""
    root = Path(sysconfig.get_paths()["purelib"])
    if kind == "code":
        paths = sorted((p for p in root.rglob("*.py") if not p.relative_to(root).parts[0].startswith(("phf", "_"))),
                       key=lambda p: _hashed(p, root))
    elif kind in ("metadata", "descriptions"):
        paths = sorted(root.glob("*.dist-info/METADATA"), key=lambda p: _hashed(p, root))
    else:
        raise ValueError(f"unknown kind of installed text {kind!r}")
    texts = []
    for p in paths:
        try:
            if p.stat().st_size > max_chars:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if kind == "descriptions":  # the body after the header fields
            text = text.partition("\n\n")[2]
        if text.strip():
            texts.append(text)
        if len(texts) >= limit:
            break
    return tuple(texts)


def _hashed(path: Path, root: Path) -> str:
    return hashlib.sha1(str(path.relative_to(root)).encode()).hexdigest()
