"""The RoPE side of the length guard: the window a model is *served* with, read from its config with the
``hf_overrides`` it was started with, so an extended model is accepted up to its new window and an un-extended
one is refused past its old one.

vLLM starts a model at any ``max_model_len`` once ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` is set, and a model served
past its RoPE window produces positions it never saw (vLLM's own warning: NaN or garbage), with no error. So
the vLLM backend is refused before its engine starts when ``max_model_len`` exceeds the served RoPE window
(``NEEDLES_ALLOW_PAST_ROPE_WINDOW=1`` lets it through), and every backend's prompts are checked against
``min(max_length, RoPE window)`` (harness_ext.plugin.registration.check_prompt_lengths).

A LoRA adapter (``lora_local_path``) trained with an extended RoPE by ``needles finetune`` is refused, before the
engine starts, when the model is served without that RoPE: its run's manifest (OUT/manifest.json beside
OUT/adapter) names the ``hf_overrides`` it was trained with, and scoring it on the unscaled base measures it on
positions encoded another way, inside the native window too.

Every fix shows ``hf_overrides`` as its own ``--model_args`` value after the comma-separated one: lm_eval 0.4.13
splits a ``key=value,...`` value on top-level commas and reads a first value holding ``{`` as one whole JSON
object (anything else there is an error), while a later ``hf_overrides={...}`` value is read as a Python literal.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError

WINDOW_ATTR = "_needles_rope_window"  # the served RoPE window, on a started vLLM model (patch_vllm_init)
_CONFIG = "_needles_served_config"
ESCAPE = "NEEDLES_ALLOW_PAST_ROPE_WINDOW"


def _overrides(value: Any) -> dict:
    if isinstance(value, str):  # the Python API may pass the JSON text
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def served_config(pretrained: Any, hf_overrides: Any) -> dict | None:
    """config.json of ``pretrained`` with ``hf_overrides`` applied as vLLM applies them (None: unreadable)."""
    if pretrained is None:
        return None
    config = ropelib.read_config_json(str(pretrained))
    return None if config is None else ropelib.with_overrides(config, _overrides(hf_overrides))


def model_args_with(overrides: dict, model_args: str) -> str:
    """``--model_args`` as lm_eval 0.4.13 reads an override: the ``key=value,...`` value, then
    ``'hf_overrides={...}'`` as a second value (module docstring)."""
    return f"--model_args {model_args} 'hf_overrides={json.dumps(overrides, separators=(',', ':'))}'"


def fix_for(config: dict | None, length: int, model: Any = None) -> str:
    """How to serve ``length`` tokens: the RoPE override to try, or the training that provides it."""
    if not config:
        return "serve the model with a RoPE extension (docs/extension.md) or lower the lengths"
    args = model_args_with(
        ropelib.suggested_overrides(config, length), f"pretrained={model or 'MODEL'},max_model_len={length}"
    )
    return (
        f"serve it extended with training-free YaRN, the override as its own --model_args value after the "
        f"comma-separated one: {args}; `needles finetune --context-length {length} --rope-type yarn` trains "
        "for it and prints the command; or lower the lengths to the window"
    )


def refuse_unscaled_adapter(config: dict | None, adapter: Any, model: Any, requested: int | None) -> None:
    """Refuse serving a LoRA adapter that ``needles finetune`` trained with an extended RoPE on a model served
    without it (``config``: the served one, overrides applied)."""
    trained = ropelib.trained_overrides(adapter)
    base = ropelib.read_config_json(str(model)) if trained and model is not None else None
    if not trained or not config or not base:
        return
    expected = ropelib.with_overrides(base, trained)
    served_rope, trained_rope = ropelib.read_rope(config), ropelib.read_rope(expected)
    if served_rope == trained_rope:
        return
    length = int(requested or ropelib.rope_window(expected) or 0)
    args = f"pretrained={model},max_model_len={length},lora_local_path={adapter}"
    raise NeedlesError(
        f"the adapter {adapter} was trained with RoPE {trained_rope} (context.hf_overrides of "
        f"{ropelib.adapter_manifest(adapter)}), but {model} is served with {served_rope}: its scores would "
        "measure it on positions encoded another way, inside the native window too",
        fix=f"serve it with the override it was trained with, as its own --model_args value after the "
        f"comma-separated one: {model_args_with(trained, args)} (the run's eval_command.sh holds the whole "
        "command)",
    )


def refuse_past_window(config: dict | None, requested: int | None, model: Any) -> int | None:
    """The served RoPE window; refuses a ``max_model_len`` beyond it (before any engine starts)."""
    window = ropelib.rope_window(config) if config else None
    if window and requested and int(requested) > window and os.environ.get(ESCAPE) != "1":
        rope = ropelib.read_rope(config)
        raise NeedlesError(
            f"max_model_len={requested} is past the RoPE window {window} of {model} (rope_type "
            f"{rope['rope_type']}, max_position_embeddings {ropelib.declared_positions(config)}): positions past it "
            "were never trained, and vLLM serves them without an error under VLLM_ALLOW_LONG_MAX_MODEL_LEN=1",
            fix=fix_for(config, int(requested), model) + f" (or set {ESCAPE}=1 to serve it anyway)",
        )
    return window


def patch_vllm_init(cls: type) -> None:
    """``VLLM(...)`` learns its served window (config + hf_overrides) and refuses a longer max_model_len
    before the engine starts."""
    original = cls.__init__
    if getattr(original, "_needles_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        pretrained = kwargs.get("pretrained", args[0] if args else None)
        config = served_config(pretrained, kwargs.get("hf_overrides"))
        requested = kwargs.get("max_model_len") or kwargs.get("max_length")
        refuse_unscaled_adapter(config, kwargs.get("lora_local_path"), pretrained, requested)
        window = refuse_past_window(config, requested, pretrained)
        original(self, *args, **kwargs)
        setattr(self, WINDOW_ATTR, window)
        setattr(self, _CONFIG, config)

    __init__._needles_patched = True
    cls.__init__ = __init__


def vllm_window(lm: Any) -> int | None:
    """The RoPE window a vLLM model was started with (recorded by :func:`patch_vllm_init`); None for other backends."""
    return getattr(lm, WINDOW_ATTR, None)


def served_window(lm: Any) -> tuple[int | None, dict | None]:
    """(RoPE window, served config) of an lm-eval model: recorded at vLLM start, or the HF model's config."""
    if hasattr(lm, WINDOW_ATTR):
        return getattr(lm, WINDOW_ATTR), getattr(lm, _CONFIG, None)
    config = getattr(getattr(lm, "_model", None) or getattr(lm, "model", None), "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None, None
    as_dict = config.to_dict()
    return ropelib.rope_window(as_dict), as_dict
