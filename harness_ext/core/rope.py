"""RoPE settings of a model config: read either config form, the window a config is served with, and the
keys to write (one module, so finetuning, the length guard and the eval commands agree on every rule).

Two config forms exist. transformers 5 keeps every RoPE setting in ``rope_parameters`` (``rope_type``,
``rope_theta``, ``factor``, ...; per layer type for some models); 4.x configs have ``rope_scaling`` (key
``rope_type``, older ``type``) and a top-level ``rope_theta``. :func:`read_rope` returns one normalised
dict (transformers 5 names) from either; :func:`config_kwargs` writes the form the installed transformers
uses.

The served window follows vLLM 0.32's rule (``vllm/config/model.py`` ``_get_and_verify_max_len``):
``linear`` and ``dynamic`` multiply ``max_position_embeddings`` by ``factor`` (except for Gemma 3, whose
``max_position_embeddings`` vLLM takes as scaled already); ``yarn``, ``llama3`` and ``longrope`` configs carry
the extended window in ``max_position_embeddings`` already (transformers' convention, with the pretraining window
in ``original_max_position_embeddings``).

Models with sliding-window layers (Gemma 3) keep one RoPE dict per layer type, ``rope_parameters:
{"full_attention": {...}, "sliding_attention": {...}}``; transformers 5 and vLLM index it by each layer's type.
Only the ``full_attention`` entry limits retrieval over the whole window (a sliding layer never sees a relative
distance past its ``sliding_window``), so that is the entry read, and the only one an extension rewrites: the
others are written back as they were (:func:`layered_rope`).
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


FULL_ATTENTION = "full_attention"  # the layer type whose RoPE an extension changes (module docstring)


def layer_key(config: Mapping[str, Any]) -> str | None:
    """The layer type :func:`read_rope` reads when ``rope_parameters`` is per layer type (``full_attention``,
    else the first entry); None for a flat dict or the 4.x form."""
    params = config.get("rope_parameters")
    if not isinstance(params, Mapping):
        return None
    nested = [k for k, v in params.items() if isinstance(v, Mapping)]
    if not nested:
        return None
    return FULL_ATTENTION if FULL_ATTENTION in nested else nested[0]


def layered_rope(config: Mapping[str, Any], rope: Mapping[str, Any]) -> dict:
    """The ``rope_parameters`` to write for ``rope``: per layer type when the config is (``rope`` replaces the
    entry :func:`layer_key` names, every other layer type's dict is kept), else ``rope`` itself."""
    key = layer_key(config)
    if key is None:
        return dict(rope)
    return {**{k: dict(v) for k, v in config["rope_parameters"].items()}, key: dict(rope)}


def read_rope(config: Mapping[str, Any]) -> dict:
    """The config's RoPE as one flat dict with transformers 5 names (``rope_type`` always set, ``rope_theta``
    always set), from ``rope_parameters`` (flat or nested per layer type: the full-attention one) or from
    ``rope_scaling`` + ``rope_theta``."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        key = layer_key(config)
        rope = dict(params[key] if key else params)
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


def factor_scales_window(config: Mapping[str, Any], rope_type: str) -> bool:
    """Whether vLLM serves ``max_position_embeddings x factor`` for this RoPE type on this model: linear and
    dynamic, except on Gemma 3, whose ``max_position_embeddings`` vLLM reads as scaled already."""
    return rope_type in FACTOR_SCALES_WINDOW and "gemma3" not in str(config.get("model_type") or "")


def rope_window(config: Mapping[str, Any]) -> int | None:
    """The context window a config is served with (vLLM's rule, see the module docstring)."""
    positions = declared_positions(config)
    if positions is None:
        return None
    rope = read_rope(config)
    if factor_scales_window(config, rope["rope_type"]):
        return int(positions * float(rope.get("factor") or 1.0))
    return positions


def rotary_dims(config: Mapping[str, Any]) -> int | None:
    """How many dimensions of a head RoPE rotates: ``head_dim`` (or hidden_size / heads) x
    ``partial_rotary_factor``; None when the config says neither."""
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if isinstance(heads, int) and heads and config.get("hidden_size") else None
    )
    if not isinstance(head_dim, int):
        return None
    partial = read_rope(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    dims = int(head_dim * float(partial))
    return dims if dims >= 4 else None  # d / (d - 2) of the NTK rule needs a few dimensions


def ntk_theta(theta: float, dims: int, scale: float) -> float:
    """NTK-aware base frequency for a window ``scale`` times the native one: ``theta * scale ** (d / (d - 2))``
    (bloc97's NTK-aware rule, as the YaRN paper states it), which keeps the slowest dimension's wavelength covering the new
    window while the fastest ones are left nearly as trained."""
    return float(theta) * float(scale) ** (dims / (dims - 2))


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
    rope = read_rope({"rope_parameters": rope})  # 4.x keeps one (global) rope_scaling: the full-attention one
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {  # transformers >= 4.45 (this package's lower bound) reads rope_scaling's rope_type
        "rope_scaling": None if scaling.get("rope_type") == "default" else scaling,
        "rope_theta": rope["rope_theta"],
        "max_position_embeddings": int(max_position_embeddings),
    }


def vllm_overrides(rope: Mapping[str, Any], max_position_embeddings: int) -> dict:
    """vLLM's ``hf_overrides`` for this RoPE: the whole ``rope_parameters`` dict (vLLM sets a dict override as
    given, without filling defaults; per layer type for a model that has them, :func:`layered_rope`) and the
    window, so vLLM's own max_model_len check passes without ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``."""
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
    return vllm_overrides(layered_rope(config, rope), int(window * factor))


# ------------------------------------------------------------------------------------- adapters
RUN_MANIFEST = "manifest.json"  # what `needles finetune` writes beside OUT/adapter (harness_ext.finetune.rundir)


def adapter_manifest(adapter: str | os.PathLike | None) -> Path | None:
    """The finetune manifest of the run an adapter folder comes from (OUT/manifest.json beside OUT/adapter),
    or None when there is none."""
    if not adapter:
        return None
    path = Path(adapter).expanduser().resolve().parent / RUN_MANIFEST
    return path if path.is_file() else None


def trained_overrides(adapter: str | os.PathLike | None) -> dict | None:
    """The RoPE an adapter was trained with: ``context.hf_overrides`` of its run's manifest, or None (no
    manifest, an unreadable one, or a run without a RoPE change)."""
    path = adapter_manifest(adapter)
    if path is None:
        return None
    try:
        context = json.loads(path.read_text(encoding="utf-8")).get("context") or {}
    except (OSError, ValueError, AttributeError):
        return None
    overrides = context.get("hf_overrides") if isinstance(context, Mapping) else None
    return overrides if isinstance(overrides, dict) and overrides else None
