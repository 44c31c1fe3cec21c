"""The RoPE and window a model is probed with in ``needles heads`` (retrieval heads past the native window).

An extended model is probed with the RoPE it is served with, from (first found): ``--hf-overrides`` (the JSON
that ``lm_eval --model vllm`` takes, e.g. the training-free variant's), the manifest of the ``needles finetune``
run an ``--adapter`` comes from (its ``context.hf_overrides``: the RoPE the adapter was trained with), or the
model's own config.json (a merged folder carries its RoPE). Probe lengths past that window are refused before
the model loads, with the override that would serve them, instead of probing positions the model never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError

# tokens a chat template adds around a probe (SmolLM2's system turn is ~30)
CHAT_SLACK = 64


def parse_overrides(text: str | None) -> dict | None:
    """``--hf-overrides`` as a dict with ``rope_parameters`` (and optionally ``max_position_embeddings``)."""
    if not text:
        return None
    fix = (
        'pass the JSON that lm_eval\'s hf_overrides takes, e.g. --hf-overrides \'{"rope_parameters": {"rope_type": '
        '"yarn", "factor": 2.0, "original_max_position_embeddings": 8192, "rope_theta": 100000.0}, '
        '"max_position_embeddings": 16384}\''
    )
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise NeedlesError(f"--hf-overrides is not valid JSON ({exc})", fix=fix) from None
    if not isinstance(value, dict) or not isinstance(value.get("rope_parameters"), dict):
        raise NeedlesError("--hf-overrides needs a rope_parameters object", fix=fix)
    unknown = sorted(set(value) - {"rope_parameters", "max_position_embeddings"})
    if unknown:
        raise NeedlesError(f"--hf-overrides has key(s) {unknown} that needles heads does not apply", fix=fix)
    return value


def adapter_overrides(adapter: str | Path | None) -> dict | None:
    """The RoPE an adapter was trained with: ``context.hf_overrides`` of its run's manifest (OUT/manifest.json
    beside OUT/adapter), or None (no manifest, or no extension)."""
    if not adapter:
        return None
    manifest = Path(adapter).expanduser().resolve().parent / "manifest.json"
    try:
        context = json.loads(manifest.read_text(encoding="utf-8")).get("context") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return context.get("hf_overrides") or None


def probed_rope(model: str | Path, adapter: str | Path | None, hf_overrides: str | None) -> tuple[dict | None, dict]:
    """(the overrides to load the model with or None, {"window", "native_window", "source", "rope_parameters"})."""
    config = ropelib.read_config_json(model) or {}
    overrides, source = parse_overrides(hf_overrides), "--hf-overrides"
    if overrides is None:
        overrides, source = adapter_overrides(adapter), "the adapter's finetune manifest"
    if overrides is None:
        source = "the model's config.json"
    served = ropelib.with_overrides(config, overrides)
    info = {
        "window": ropelib.rope_window(served),
        "native_window": ropelib.rope_window(config),
        "source": source,
        "rope_parameters": ropelib.read_rope(served) if served else None,
    }
    return overrides, info


def config_kwargs(overrides: dict | None, model: str | Path) -> dict:
    """AutoConfig keyword arguments that apply ``overrides`` in the installed transformers' config form."""
    if not overrides:
        return {}
    config = ropelib.read_config_json(model) or {}
    positions = overrides.get("max_position_embeddings") or ropelib.declared_positions(config)
    return ropelib.config_kwargs(overrides["rope_parameters"], int(positions))


def check_probe_lengths(lengths: dict[str, list[int]], extra_tokens: int, info: dict, model: str | Path) -> None:
    """Refuse probe lengths whose prompt, chat template and decoded tokens do not fit the probed window."""
    window = info.get("window")
    if not window:
        return  # the config declares no window: nothing to check against
    for flag, values in lengths.items():
        too_long = [n for n in values if n + extra_tokens + CHAT_SLACK > window]
        if not too_long:
            continue
        config = ropelib.read_config_json(model) or {}
        fix = f"keep {flag} at or below {window - extra_tokens - CHAT_SLACK}"
        if info.get("source") == "the model's config.json":
            wanted = max(too_long) + extra_tokens + CHAT_SLACK
            suggested = json.dumps(ropelib.suggested_overrides(config, wanted), separators=(",", ":"))
            fix += f", or probe the model extended: --hf-overrides '{suggested}' (training-free YaRN)"
        raise NeedlesError(
            f"{flag} {too_long} do not fit the window the model is probed with ({window} tokens, from "
            f"{info['source']}; {extra_tokens} decoded and {CHAT_SLACK} chat-template tokens added)",
            fix=fix,
        )
