"""On-disk cache of generated datasets, keyed by everything that determines their bytes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.atomic_io import write_jsonl_atomic
from harness_ext.core.paths import cache_dir


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: str | Path) -> str:
    """git's object id of the file's bytes (``git hash-object``): SHA-1 of ``b"blob <size>\\0"`` + the bytes."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cached_rows(namespace: str, payload: dict, build: Callable[[], list[dict]]) -> tuple[list[dict], Path, bool]:
    """Rows for ``payload`` from the cache, building and storing them on a miss.

    Returns (rows, cache file, hit). ``NEEDLES_NO_CACHE=1`` forces a rebuild (still stored).
    """
    path = cache_dir("datasets", namespace) / f"{cache_key(payload)}.jsonl"
    if path.is_file() and os.environ.get("NEEDLES_NO_CACHE") != "1":
        try:
            return read_jsonl(path), path, True
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    rows = build()
    write_jsonl_atomic(path, rows)
    return rows, path, False


def dataset_sha256(rows: list[dict], field: str = "doc_sha256") -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(row[field].encode())
    return h.hexdigest()
