"""A disk cache of lm-eval's index of its own built-in task folder, so an lm_eval launch does not re-parse ~14,000 YAMLs.

lm-eval 0.4.13 builds its task index on every ``TaskManager()`` (once per ``lm_eval`` run and per
``simple_evaluate``) by parsing every YAML under ``lm_eval/tasks``: 6-10 s on a 2-core machine, the largest
fixed cost of a run (benchmarks/README.md). That folder only changes when lm-eval is upgraded or edited, so
its index is stored once under the cache root and reused while a fingerprint of the folder (every file's
relative path, size and mtime, the lm-eval version, the folder itself) is unchanged; any edit rebuilds it.
Only lm-eval's folder is cached: this plugin's tasks and the user's ``--include_path`` are indexed as
lm-eval always does (they are small and the user's may include files outside their folder).
``NEEDLES_NO_CACHE=1`` rebuilds the index (and stores the new one); any unreadable cache file is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic
from harness_ext.core.paths import cache_dir

log = logging.getLogger(__name__)
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # lm-eval's own list (lm_eval.tasks._index)
_FORMAT = 1  # bump when what is stored changes


def fingerprint(root: Path, version: str) -> str:
    """What the index of ``root`` depends on: every file under it (not only YAMLs: includes such as
    ``_default_template_yaml`` have no suffix), by relative path, size and mtime."""
    digest = hashlib.sha256(f"{_FORMAT}\0{version}\0{root}\0{sys.version_info[:2]}\n".encode())
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in sorted(files):
            path = os.path.join(folder, name)
            st = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_file(root: Path) -> Path:
    # One file per indexed folder (per lm-eval install): a new fingerprint overwrites it instead of piling up.
    return cache_dir("lm_eval_task_index") / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.pickle"


def cached_index(root: Path, version: str, build: Callable[[list[Path]], dict]) -> dict:
    """lm-eval's index of ``root`` (``build([root])``), from the cache when the folder is unchanged.

    The cache only ever costs speed: an unreadable, damaged or unwritable cache means a normal build.
    """
    root = Path(root)
    key = fingerprint(root, version)
    try:
        path = _cache_file(root)
        if os.environ.get("NEEDLES_NO_CACHE") != "1" and path.is_file():
            stored = pickle.loads(path.read_bytes())  # noqa: S301 - our own file under the user's cache dir
            if isinstance(stored, dict) and stored.get("fingerprint") == key:
                return stored["index"]
    except Exception as err:
        path = None
        log.debug("task index cache unreadable (%s); rebuilding", err)
    index = build([root])
    try:
        if path is None:
            path = _cache_file(root)
        write_atomic(path, pickle.dumps({"fingerprint": key, "index": index}, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as err:
        log.debug("task index cache not written (%s)", err)
    return index
