"""Shared by the prompt builders of the prose tasks."""
from __future__ import annotations

import hashlib


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
