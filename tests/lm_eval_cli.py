"""The real lm_eval CLI as the tiny-model tests call it: the hf backend's arguments, one task run's arguments, the
command line of a run in a subprocess, and the sample logs a run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def hf_args(model: Path, max_length: int = 4096) -> list[str]:
    """The hf backend on CPU in float32 (the tiny random Llama); ``max_length`` is what the length guard reads."""
    return ["--model", "hf", "--model_args", f"pretrained={model},dtype=float32,max_length={max_length}"]


def hf_task_args(task: str, model: Path, metadata: dict, max_length: int = 1024, max_gen_toks: int | None = 8) -> list:
    """One hf run of ``task`` with its ``--metadata``, logging samples; ``max_gen_toks`` None: no --gen_kwargs
    (loglikelihood tasks generate nothing)."""
    gen = [] if max_gen_toks is None else ["--gen_kwargs", f"max_gen_toks={max_gen_toks}"]
    return ["--tasks", task, *hf_args(model, max_length), "--metadata", json.dumps(metadata), *gen, "--log_samples"]


def lm_eval_command(*args: str) -> list[str]:
    """``lm_eval run`` with this interpreter, for a test that reads the process's exit code and stderr itself."""
    return [sys.executable, "-m", "lm_eval", "run", *args]


def logged_samples(run_dir: str | Path, task: str) -> list[dict]:
    """The rows of ``task``'s one sample log in a run's folder (``samples_<task>_<date>.jsonl``)."""
    files = list(Path(run_dir).glob(f"samples_{task}_2*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].open()]
