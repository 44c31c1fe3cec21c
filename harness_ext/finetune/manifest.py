"""What a finetuning run records: the manifest (data, leakage check, hyperparameters, training, versions).

Shared by the local recipe and the OpenAI backend, so both manifests report library versions the
same way. ``data`` names the training-data family (``kv`` or ``synth_mdqa``; for synth_mdqa also the
cell, split, dataset SHA-256 and data files) beside the spec and the documents' SHA-256.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from typing import Any

from harness_ext.finetune.data import docs_sha256
from harness_ext.finetune.families import manifest_fields

VERSIONED_PACKAGES = ("lm-eval-needles", "torch", "transformers", "peft", "accelerate", "lm_eval", "vllm")


def versions() -> dict:
    """Python and the installed versions of the packages a run depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def hyperparameters(cfg: Any) -> dict:
    """The options a run records as its hyperparameters (everything but its data, which the manifest records with
    its hash, and its output folder)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in {"data", "output_dir"}} | {
        "learning_rate": cfg.lr()
    }


def eval_max_model_len(seq_len: int, leak_docs_max: int, model_max: int | None) -> int:
    """vLLM's max_model_len for scoring: the longest training or evaluation prompt plus room for the
    chat template and the answer, rounded up to 512 and capped at the model's context."""
    need = max(seq_len, leak_docs_max) + 128
    length = int(math.ceil(need / 512) * 512)
    return min(length, model_max) if model_max else length


def build_manifest(
    cfg: Any,
    base: str,
    spec: Any,
    docs: list[dict],
    summary: dict,
    leak: Any,
    seq_len: int,
    parameters: tuple[int, int],
    total_steps: int,
    history: list[dict],
    stopped: bool,
) -> dict:
    """The manifest of a local run (``outputs`` and the eval commands are added once they are saved)."""
    n_trainable, n_total = parameters
    tail = [h["loss"] for h in history[-10:]]
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    tokens = sum(h["tokens"] for h in history)
    final_loss = round(sum(tail) / len(tail), 5) if tail else None
    return {
        "kind": "needles-finetune",
        "base_model": {"name": cfg.model, "path": base},
        "method": cfg.method,
        "data": {
            **manifest_fields(spec),
            "spec": spec.to_json(),
            "documents": len(docs),
            "data_sha256": docs_sha256(docs),
            "tokens": summary,
            "sequence_length": seq_len,
            "system_prompt": cfg.system_prompt,
        },
        "leakage_check": dataclasses.asdict(leak) | {"train_seed": spec.seed, "eval_metadata": cfg.eval_metadata},
        "hyperparameters": hyperparameters(cfg),
        "parameters": {"trainable": n_trainable, "total": n_total},
        "training": {
            "steps": history[-1]["step"] if history else 0,
            "total_steps": total_steps,
            "stopped_early": stopped,
            "final_loss": final_loss,
            "first_loss": history[0]["loss"] if history else None,
            "train_seconds_last_session": elapsed,
            "tokens_per_second_last_session": round(tokens / elapsed, 1) if elapsed else None,
        },
        "final_loss": final_loss,
        "versions": versions(),
    }
