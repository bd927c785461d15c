"""The cache of :mod:`.compile_check`'s rows, keyed by content (sources, tool versions,
options, :data:`ROW_VERSION`), under $PATHGEOM_COMPILE_CACHE (default
~/.cache/pathgeom_fast/compile-check).
"""

from __future__ import annotations

import hashlib
import json
import os


def _cache_dir() -> str:
    return os.environ.get("PATHGEOM_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pathgeom_fast", "compile-check")


def _cache_get(key: str):
    try:
        with open(os.path.join(_cache_dir(), key + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_put(key: str, value) -> None:
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp = os.path.join(_cache_dir(), f".{key}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, os.path.join(_cache_dir(), key + ".json"))
    except OSError:
        pass


ROW_VERSION = 4  # of what a cached row holds (2: loop_xthread; 3: thread_local by default; 4: threads, shared); part of every cache key


def _digest(*parts) -> str:
    h = hashlib.sha256()
    h.update(f"rows v{ROW_VERSION}".encode())
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
