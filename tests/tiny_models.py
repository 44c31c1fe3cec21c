"""The tiny random models the light tests run on: their layer sizes, a copy of one with a smaller native window, a
config-only Llama folder, and the `needles finetune` command line that trains one for a step or two."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# 2 layers of 2 heads, head_dim 32 (vLLM's CPU attention kernel needs it), 64 wide: seconds per step on 2 cores.
TINY_LAYERS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 32,
}
# EVAL_META of a finetune run: 4 KV documents of 128 tokens (the default depths)
TINY_EVAL_META = {"lengths": [128], "depths": None, "num_samples": 4}
# LoRA of rank 8 at a learning rate that moves a random model within a step or two
TINY_LORA = ("--batch-size", "2", "--lr", "5e-3", "--lora-r", "8")


def with_native_window(model: Path, out: Path, window: int) -> Path:
    """A copy of the model folder ``model`` at ``out`` whose config.json holds a ``window``-token native window."""
    shutil.copytree(model, out)
    conf = json.loads((out / "config.json").read_text())
    conf["max_position_embeddings"] = window
    (out / "config.json").write_text(json.dumps(conf))
    return out


def llama_config_only(out: Path, window: int) -> Path:
    """A folder holding only a Llama config.json with a ``window``-token native window and the default RoPE: for
    checks that read the config and never load weights."""
    out.mkdir()
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    conf = {"model_type": "llama", "max_position_embeddings": window, "rope_parameters": rope}
    (out / "config.json").write_text(json.dumps(conf))
    return out


def finetune_argv(
    model: Path, out: Path, *extra: str, num_samples: int = 8, length: int = 128, eval_metadata: dict | None = None
) -> list[str]:
    """``needles finetune`` on ``num_samples`` KV documents of ``length`` tokens, scored on ``eval_metadata``
    (default TINY_EVAL_META)."""
    meta = TINY_EVAL_META if eval_metadata is None else eval_metadata
    return [
        *("finetune", "--model", str(model), "-o", str(out), "--num-samples", str(num_samples)),
        *("--lengths", str(length), "--eval-metadata", json.dumps(meta), *extra),
    ]
