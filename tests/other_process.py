"""A task family's rows built again in a fresh interpreter, with its own cache and hash seed: rows that depend on
nothing but metadata, data files and tokenizer come out byte-identical there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_BUILD = (
    "import importlib, json, sys\n"
    "build = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])\n"
    "ds = build(sys.argv[3], json.loads(sys.argv[4]))\n"
    "print(json.dumps({'rows': ds['test'].to_list(), 'sha': ds.needles_info['needles_data_sha256']}))\n"
)


def dataset_in_another_process(builder: str, task: str, metadata: dict, cache: Path, hash_seed: str) -> dict:
    """``{"rows", "sha"}`` of ``builder(task, metadata)`` (``builder``: "package.module:function") in a new Python
    process whose dataset cache is ``cache`` and whose PYTHONHASHSEED is ``hash_seed``."""
    module, function = builder.split(":")
    env = dict(os.environ, NEEDLES_CACHE_DIR=str(cache), PYTHONHASHSEED=hash_seed)
    argv = [sys.executable, "-c", _BUILD, module, function, task, json.dumps(metadata)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
