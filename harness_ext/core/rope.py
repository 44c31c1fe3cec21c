"""RoPE settings of a model config: read either config form, the window a config is served with, and the
keys to write (one module, so finetuning, the length guard and the eval commands agree on every rule).

Two config forms exist. transformers 5 keeps every RoPE setting in ``rope_parameters`` (``rope_type``,
``rope_theta``, ``factor``, ...; per layer type for some models); 4.x configs have ``rope_scaling`` (key
``rope_type``, older ``type``) and a top-level ``rope_theta``. :func:`read_rope` returns one normalised
dict (transformers 5 names) from either; :func:`config_kwargs` writes the form the installed transformers
uses.

The served window follows vLLM 0.32's rule (``vllm/config/model.py`` ``_get_and_verify_max_len``):
``linear`` and ``dynamic`` multiply ``max_position_embeddings`` by ``factor``; ``yarn``, ``llama3`` and
``longrope`` configs carry the extended window in ``max_position_embeddings`` already (transformers'
convention, with the pretraining window in ``original_max_position_embeddings``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# vLLM multiplies max_position_embeddings by factor for these types; the others' window is max_position_embeddings
FACTOR_SCALES_WINDOW = ("linear", "dynamic")
# The keys transformers 5.19 accepts in rope_parameters per rope_type, besides rope_type and rope_theta
# (modeling_rope_utils.RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters; yarn's boolean `truncate`
# is left out: lm_eval --model_args cannot carry a JSON boolean inside hf_overrides).
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    ),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def read_rope(config: Mapping[str, Any]) -> dict:
    """The config's RoPE as one flat dict with transformers 5 names (``rope_type`` always set, ``rope_theta``
    always set), from ``rope_parameters`` (flat or nested per layer type: the full-attention one) or from
    ``rope_scaling`` + ``rope_theta``."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        nested = [v for v in params.values() if isinstance(v, Mapping)]
        if nested:  # per layer type: full attention is the one that limits retrieval over the whole window
            params = params.get("full_attention") if isinstance(params.get("full_attention"), Mapping) else nested[0]
        rope = dict(params)
    else:
        rope = dict(config.get("rope_scaling") or {})
    legacy_type = rope.pop("type", None)  # 4.x spelling
    rope["rope_type"] = rope.get("rope_type") or legacy_type or "default"
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = float(config.get("rope_theta") or DEFAULT_THETA)
    return rope


def declared_positions(config: Mapping[str, Any]) -> int | None:
    """``max_position_embeddings`` (or the architecture's name for it), None when the config declares none."""
    for key in WINDOW_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def rope_window(config: Mapping[str, Any]) -> int | None:
    """The context window a config is served with (vLLM's rule, see the module docstring)."""
    positions = declared_positions(config)
    if positions is None:
        return None
    rope = read_rope(config)
    if rope["rope_type"] in FACTOR_SCALES_WINDOW:
        return int(positions * float(rope.get("factor") or 1.0))
    return positions


def with_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """The config as vLLM sees it with ``hf_overrides``: every key replaced whole (dict values included)."""
    out = dict(config)
    for key, value in (overrides or {}).items():
        out[key] = value
        if key == "rope_parameters":  # a new rope_parameters supersedes the 4.x fields
            out.pop("rope_scaling", None)
    return out


def config_form() -> str:
    """``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (4.x): the form the installed one writes."""
    from importlib.metadata import version

    return "rope_parameters" if int(version("transformers").split(".")[0]) >= 5 else "rope_scaling"


def config_kwargs(rope: Mapping[str, Any], max_position_embeddings: int, form: str | None = None) -> dict:
    """Config attributes that give a model this RoPE and window, in the installed transformers' form
    (also what ``AutoConfig.from_pretrained(path, **kwargs)`` takes)."""
    form = form or config_form()
    if form == "rope_parameters":
        return {"rope_parameters": dict(rope), "max_position_embeddings": int(max_position_embeddings)}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {  # transformers >= 4.45 (this package's lower bound) reads rope_scaling's rope_type
        "rope_scaling": None if scaling.get("rope_type") == "default" else scaling,
        "rope_theta": rope["rope_theta"],
        "max_position_embeddings": int(max_position_embeddings),
    }


def vllm_overrides(rope: Mapping[str, Any], max_position_embeddings: int) -> dict:
    """vLLM's ``hf_overrides`` for this RoPE: the whole ``rope_parameters`` dict (vLLM sets a dict override as
    given, without filling defaults) and the window, so vLLM's own max_model_len check passes without
    ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``."""
    return {"rope_parameters": dict(rope), "max_position_embeddings": int(max_position_embeddings)}


def read_config_json(model: str | os.PathLike) -> dict | None:
    """A model's config.json as a dict (a local folder, or a hub id already in the local cache), without
    importing transformers; None when it cannot be found."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model), "config.json")
        except Exception:  # not a hub id either: the caller goes on without RoPE information
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tokenizer_max_length(model: str | os.PathLike) -> int | None:
    """``model_max_length`` of a local folder's tokenizer_config.json (vLLM caps its window by it)."""
    path = Path(model).expanduser() / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, (int, float)) and value < 1e12 else None


def suggested_overrides(config: Mapping[str, Any], length: int) -> dict:
    """The hf_overrides a user would try first to serve ``config`` at ``length`` tokens: YaRN with
    ``factor = ceil(length / window)`` over the model's own base frequency (what ``needles finetune
    --context-length LENGTH --rope-type yarn`` trains with)."""
    import math

    window = rope_window(config) or length
    factor = float(max(1, math.ceil(length / window)))
    rope = {
        "rope_type": "yarn",
        "rope_theta": read_rope(config)["rope_theta"],
        "factor": factor,
        "original_max_position_embeddings": window,
    }
    return vllm_overrides(rope, int(window * factor))
