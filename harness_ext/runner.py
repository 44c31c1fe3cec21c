"""Run the real ``lm_eval`` CLI in a subprocess and find what it wrote (demo, tests, CI)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from harness_ext.errors import NeedlesError

# Engine options that matter for vLLM on a CPU-only machine (see README, "vLLM on CPU").
VLLM_CPU_ARGS = "dtype=float32,gpu_memory_utilization=0.3,enforce_eager=True,max_model_len={max_model_len}"


def vllm_model_args(pretrained: str | Path, max_model_len: int = 4096, extra: str = "") -> str:
    args = f"pretrained={pretrained}," + VLLM_CPU_ARGS.format(max_model_len=max_model_len)
    return f"{args},{extra}" if extra else args


def lm_eval_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


def run_lm_eval(args: list[str], output_path: Path, log_file: Path | None = None, timeout: int = 1800) -> Path:
    """Run ``lm_eval run ARGS --output_path OUTPUT`` and return the newest results JSON."""
    cmd = [sys.executable, "-m", "lm_eval", "run", *args, "--output_path", str(output_path)]
    out = open(log_file, "w") if log_file else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.run(
            cmd, env=lm_eval_env(), stdout=out or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        tail = (Path(log_file).read_text() if log_file else proc.stdout or "")[-4000:]
        raise NeedlesError(f"lm_eval exited with {proc.returncode}:\n{tail}", fix="read the log above")
    return latest_results(output_path)


def latest_results(output_path: Path) -> Path:
    found = sorted(glob.glob(str(Path(output_path) / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise NeedlesError(f"no results_*.json under {output_path}", fix="check that lm_eval ran")
    return Path(found[-1])


def load_results(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
