"""The RoPE and window a model is probed with in ``needles heads`` (retrieval heads past the native window).

An extended model is probed with the RoPE it is served with, from (first found): ``--hf-overrides`` (the JSON
that ``lm_eval --model vllm`` takes, e.g. the training-free variant's), the manifest of the ``needles finetune``
run an ``--adapter`` comes from (its ``context.hf_overrides``: the RoPE the adapter was trained with), or the
model's own config.json (a merged folder carries its RoPE). Probe lengths past that window are refused before
the model loads, with the override that would serve them, instead of probing positions the model never saw.

An adapter is never probed on a RoPE other than the one it was trained with, where that can be known: an
``--hf-overrides`` whose RoPE differs from the adapter's manifest is refused, and so is a ``--model`` whose RoPE
or window differs from the base model the adapter names (``base_model_name_or_path`` in adapter_config.json,
when its config can be read). An adapter without a manifest is probed with the model's RoPE, recorded as such;
past the model's window it is refused with the fix to pass the RoPE it was trained with, not a guessed one.
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


MODEL_CONFIG = "the model's config.json"
NO_MANIFEST = "the model's config.json (the adapter has no needles finetune manifest beside it)"


def _check_adapter_base(config: dict, model: str | Path, adapter: str | Path) -> None:
    """Refuse a model whose RoPE or window differs from the base the adapter names (where that is readable)."""
    try:
        named = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        base = named.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return
    base_config = ropelib.read_config_json(base) if isinstance(base, str) and base else None
    if not base_config or not config:
        return
    theirs = (ropelib.read_rope(base_config), ropelib.rope_window(base_config))
    ours = (ropelib.read_rope(config), ropelib.rope_window(config))
    if theirs != ours:
        raise NeedlesError(
            f"the adapter {adapter} was trained on {base} (RoPE {theirs[0]}, window {theirs[1]}), but --model "
            f"{model} has RoPE {ours[0]}, window {ours[1]}",
            fix=f"probe it on the model it was trained on: --model {base}",
        )


def probed_rope(model: str | Path, adapter: str | Path | None, hf_overrides: str | None) -> tuple[dict | None, dict]:
    """(the overrides to load the model with or None, {"window", "native_window", "source", "rope_parameters"})."""
    config = ropelib.read_config_json(model) or {}
    given = parse_overrides(hf_overrides)
    trained = ropelib.trained_overrides(adapter)
    if adapter:
        _check_adapter_base(config, model, adapter)
    if given is not None and trained is not None:
        ours, theirs = ropelib.with_overrides(config, given), ropelib.with_overrides(config, trained)
        if ropelib.read_rope(ours) != ropelib.read_rope(theirs):
            raise NeedlesError(
                f"--hf-overrides gives RoPE {ropelib.read_rope(ours)}, but the adapter {adapter} was trained with "
                f"{ropelib.read_rope(theirs)} ({ropelib.adapter_manifest(adapter)})",
                fix="drop --hf-overrides (the adapter's manifest is used), or pass its context.hf_overrides",
            )
    if given is not None:
        overrides, source = given, "--hf-overrides"
    elif trained is not None:
        overrides, source = trained, "the adapter's finetune manifest"
    else:
        no_manifest = adapter and ropelib.adapter_manifest(adapter) is None
        overrides, source = None, NO_MANIFEST if no_manifest else MODEL_CONFIG
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


def check_probe_lengths(
    lengths: dict[str, list[int]], extra_tokens: int, info: dict, model: str | Path, takes_overrides: bool = True
) -> None:
    """Refuse probe lengths whose prompt, chat template and decoded tokens do not fit the probed window;
    ``takes_overrides``: whether the command has ``--hf-overrides`` to suggest (``needles heads patch`` has not)."""
    window = info.get("window")
    if not window:
        return  # the config declares no window: nothing to check against
    for flag, values in lengths.items():
        too_long = [n for n in values if n + extra_tokens + CHAT_SLACK > window]
        if not too_long:
            continue
        config = ropelib.read_config_json(model) or {}
        fix = f"keep {flag} at or below {window - extra_tokens - CHAT_SLACK}"
        if info.get("source") == NO_MANIFEST and not takes_overrides:
            fix += (
                ", or put the adapter's needles finetune manifest beside the adapter folder (OUT/manifest.json next "
                "to OUT/adapter: it records the RoPE the adapter was trained with)"
            )
        elif info.get("source") == NO_MANIFEST:  # its training RoPE is unknown: a guessed override would be wrong
            fix += (
                ", or pass the RoPE the adapter was trained with: --hf-overrides with the context.hf_overrides of "
                "its needles finetune manifest (OUT/manifest.json beside OUT/adapter)"
            )
        elif info.get("source") == MODEL_CONFIG and takes_overrides:
            wanted = max(too_long) + extra_tokens + CHAT_SLACK
            suggested = json.dumps(ropelib.suggested_overrides(config, wanted), separators=(",", ":"))
            fix += f", or probe the model extended: --hf-overrides '{suggested}' (training-free YaRN)"
        raise NeedlesError(
            f"{flag} {too_long} do not fit the window the model is probed with ({window} tokens, from "
            f"{info['source']}; {extra_tokens} decoded and {CHAT_SLACK} chat-template tokens added)",
            fix=fix,
        )
