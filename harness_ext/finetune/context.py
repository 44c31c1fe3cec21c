"""Context extension in ``needles finetune``: the ``context`` section checked against the model's config.json
(before anything loads), and the RoPE and window the run trains and serves with (what a run measures per
training length: :mod:`harness_ext.finetune.long_sequences`).

``context: {length: L, rope: {type: T, ...}}``. Defaults a user expects (LLaMA-Factory's and LongLoRA's rule):
``factor = ceil(L / native)``, ``original_max_position_embeddings`` = the model's declared window, and for
``theta`` the NTK-aware base ``theta x s ** (d / (d - 2))`` (d: rotated dimensions per head, s = L / native).
The window written follows what each type means to transformers and vLLM (:mod:`harness_ext.core.rope`): yarn
and llama3 set ``max_position_embeddings = factor x original`` (jquesnelle/yarn's finetune.py), linear keeps the
declared ``max_position_embeddings`` (vLLM multiplies it by ``factor``), ``theta`` raises the base frequency and
sets ``max_position_embeddings = L`` (ProLong's recipe). ``dynamic`` is refused: transformers trains it with a
base that grows with each sequence's length, vLLM serves one base for the whole window, so a model trained with
one is scored with the other everywhere but at the full window. A model with per-layer-type RoPE (Gemma 3) gets
the new RoPE on its ``full_attention`` entry only (:func:`harness_ext.core.rope.layered_rope`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import ROPE_TYPES
from harness_ext.finetune.long_sequences import LengthMeter

CONTEXT_KEYS = ("length", "rope")
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's values
INTEGER_KEYS = ("original_max_position_embeddings",)
# transformers trains these with a sequence-length-dependent base, vLLM serves one fixed base (module docstring)
TRAINING_FREE_ONLY = ("dynamic",)


def _fail(problem: str, fix: str) -> None:
    raise NeedlesError(problem, fix=fix)


def _number(key: str, value: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and int(value) != value):
        kind = "a whole number" if integer else "a number"
        hint = " (YAML reads 1e6 as text: write 1.0e6)" if isinstance(value, str) else ""
        _fail(f"context.{key}={value!r} is not {kind}", f"write context.{key} as {kind}{hint}")
    return float(value)


@dataclass(frozen=True)
class ContextPlan:
    """What a run with a ``context`` section trains and serves with."""

    length: int  # the target window (context.length)
    native: int  # the window the model is served with as it is
    rope: dict  # rope_parameters to train and serve with (transformers 5 names)
    max_position_embeddings: int
    window: int  # the window served with ``rope`` (harness_ext.core.rope.rope_window)
    base_rope: dict = field(default_factory=dict)  # the model's RoPE as it is
    layers: dict | None = None  # the model's per-layer-type rope_parameters (None: one flat dict)
    defaults: dict = field(default_factory=dict)  # rope key -> the rule that chose its value (none given)

    @property
    def changes_rope(self) -> bool:
        return self.rope != self.base_rope or self.window != self.native

    @property
    def extends(self) -> bool:
        """Whether the run serves past the model's native window."""
        return self.length > self.native

    def rope_parameters(self) -> dict:
        """``rope_parameters`` as written to the config and the override: per layer type where the model has
        them (``rope`` on full attention, the others as they were), else ``rope``."""
        return ropelib.layered_rope({"rope_parameters": self.layers}, self.rope) if self.layers else dict(self.rope)

    def config_kwargs(self) -> dict:
        """Config attributes for AutoConfig / from_pretrained, in the installed transformers' form."""
        return ropelib.config_kwargs(self.rope_parameters(), self.max_position_embeddings) if self.changes_rope else {}

    def hf_overrides(self) -> dict | None:
        """vLLM's hf_overrides that serve the base model with this RoPE (None: nothing to override)."""
        if not self.changes_rope:
            return None
        return ropelib.vllm_overrides(self.rope_parameters(), self.max_position_embeddings)

    def describe(self) -> str:
        """One line: the RoPE chosen, each defaulted value with its rule, and the windows."""
        values = ", ".join(
            f"{k} {v:g}" + (f" ({self.defaults[k]})" if k in self.defaults else "")
            for k, v in self.rope.items()
            if k != "rope_type" and isinstance(v, (int, float))
        )
        where = f" on {ropelib.FULL_ATTENTION} layers (other layer types unchanged)" if self.layers else ""
        return (
            f"context {self.length} tokens: RoPE {self.rope['rope_type']}{where}, {values}; window {self.native} -> "
            f"{self.window} (max_position_embeddings {self.max_position_embeddings})"
        )

    def to_json(self) -> dict:
        return {
            "length": self.length,
            "native_window": self.native,
            "window": self.window,
            "rope_parameters": self.rope_parameters(),
            "max_position_embeddings": self.max_position_embeddings,
            "base_rope_parameters": self.base_rope,
            "defaults": self.defaults,
            "config_form": ropelib.config_form(),
            "hf_overrides": self.hf_overrides(),
        }


def plan_context(context: Any, model_path: str, model_name: str | None = None) -> ContextPlan | None:
    """The run's RoPE and window, or None without a context section. Reads only the model's config.json;
    every bad value is a NeedlesError (exit 2) naming the key and the fix."""
    if not context:
        return None
    name = model_name or model_path
    if not isinstance(context, dict):
        _fail(f"context={context!r} is not a mapping", "write context: {length: 16384, rope: {type: yarn}}")
    unknown = sorted(set(context) - set(CONTEXT_KEYS))
    if unknown:
        _fail(f"unknown context key(s) {unknown}", "use context.length and context.rope ({type, factor, theta, ...})")
    length = context.get("length")
    if length is None:
        _fail("context.length is missing", "set the target window, e.g. --context-length 16384")
    if _number("length", length, integer=True) < 1:
        _fail(f"context.length={length} must be positive", "set the target window, e.g. --context-length 16384")
    length = int(length)
    rope = context.get("rope") or {}
    if not isinstance(rope, dict):
        _fail(f"context.rope={rope!r} is not a mapping", "write rope: {type: yarn}")
    config = ropelib.read_config_json(model_path)
    if config is None:
        _fail(f"cannot read config.json of {name}", "pass a local model folder or a downloaded hub id")
    native = ropelib.rope_window(config)
    if native is None:
        _fail(
            f"the config of {name} declares no window (max_position_embeddings)", "use a RoPE model that declares one"
        )
    base = ropelib.read_rope(config)
    declared = ropelib.declared_positions(config) or native
    layers = config.get("rope_parameters") if ropelib.layer_key(config) else None
    if not rope:
        if length > native:
            _fail(
                f"context.length={length} is past the native window {native} of {name} and no context.rope is given",
                f"add rope: {{type: yarn}} (--rope-type yarn; factor defaults to ceil({length}/{native}) = "
                f"{math.ceil(length / native)}), or lower context.length to {native}",
            )
        return ContextPlan(length, native, base, declared, native, base)
    rope_type = rope.get("type")
    if rope_type is None:
        _fail("context.rope.type is missing", f"use one of {list(ROPE_TYPES)}")
    if rope_type not in ROPE_TYPES:
        _fail(f"unknown context.rope.type {rope_type!r}", f"use one of {list(ROPE_TYPES)}")
    if rope_type in TRAINING_FREE_ONLY:
        _fail(
            f"context.rope.type {rope_type} cannot be trained for the server: transformers trains dynamic NTK with "
            "a base frequency recomputed from each sequence's length, vLLM serves one base fixed for the maximum "
            "length, so the trained model would be scored with another RoPE everywhere but at the full window",
            "train with --rope-type yarn (or linear, or theta: a fixed NTK-aware base); dynamic NTK is a "
            "training-free method: score the untrained model with its hf_overrides, no needles finetune",
        )
    if layers is not None and ropelib.layer_key(config) != ropelib.FULL_ATTENTION:
        _fail(
            f"{name} has per-layer-type RoPE without a {ropelib.FULL_ATTENTION} entry (types {sorted(layers)})",
            "needles extends the full-attention RoPE only; extend this model with its own recipe",
        )
    _check_keys(rope, rope_type)
    for key, value in rope.items():
        if key != "type":
            _number(f"rope.{key}", value, integer=key in INTEGER_KEYS)
    if rope.get("theta") is not None and rope["theta"] <= 0:
        _fail(f"context.rope.theta={rope['theta']} must be positive", "use e.g. theta: 8.0e6 (ProLong's for 64K)")
    if rope_type == "theta":
        return _theta_plan(rope, length, native, declared, base, config, layers)
    if base["rope_type"] != "default":
        _fail(
            f"{name} already uses {base['rope_type']} RoPE scaling (window {native})",
            "extend the model it was extended from, or use context.rope.type theta",
        )
    if length <= native:
        _fail(
            f"context.length={length} is not past the native window {native} of {name}, but "
            f"context.rope.type={rope_type} scales RoPE",
            f"raise context.length above {native}, or drop context.rope",
        )
    return _scaled_plan(rope, rope_type, length, native, base, config, layers)


def _check_keys(rope: dict, rope_type: str) -> None:
    """Refuse a key transformers does not accept for this RoPE type, naming the types that do take it."""
    accepted = {"type", "theta"} | (set() if rope_type == "theta" else set(ropelib.TYPE_KEYS[rope_type]))
    for key in sorted(set(rope) - accepted):
        takers = [t for t in ROPE_TYPES if t != "theta" and key in ropelib.TYPE_KEYS[t]]
        known = sorted(accepted - {"type"})
        fix = f"drop context.rope.{key} ({rope_type} takes {known})"
        if takers:
            fix += f", or use type {' or '.join(takers)}, which takes it"
        _fail(f"context.rope.{key} is not a parameter of {rope_type} RoPE", fix)


def _scaled_plan(
    rope: dict, rope_type: str, length: int, native: int, base: dict, config: dict, layers: dict | None
) -> ContextPlan:
    original = int(rope.get("original_max_position_embeddings") or native)
    if original < 1:
        _fail(f"context.rope.original_max_position_embeddings={original} must be positive", f"use {native}")
    defaults = {} if rope.get("theta") is not None else {"rope_theta": "the model's"}
    if rope_type in ("yarn", "llama3") and rope.get("original_max_position_embeddings") is None:
        defaults["original_max_position_embeddings"] = "the model's declared window"
    reach = native if rope_type in ropelib.FACTOR_SCALES_WINDOW else original
    if rope.get("factor") is None:
        defaults["factor"] = f"ceil({length} / {reach})"
    factor = float(rope["factor"]) if rope.get("factor") is not None else float(math.ceil(length / reach))
    if factor < 1:
        _fail(
            f"context.rope.factor={rope['factor']} must be at least 1",
            f"use factor >= 1, or drop it: the default is ceil({length}/{reach}) = {math.ceil(length / reach)}",
        )
    window = int(reach * factor)
    if window < length:
        _fail(
            f"context.rope.factor={factor:g} gives a window of {window} tokens, shorter than context.length={length}",
            f"raise factor to {math.ceil(length / reach)} or more, or drop it (default ceil(length / {reach}))",
        )
    out = {"rope_type": rope_type, "rope_theta": float(rope.get("theta") or base["rope_theta"]), "factor": factor}
    if rope_type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        out.update({k: float(rope.get(k, v)) for k, v in LLAMA3_DEFAULTS.items()})
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            _fail(
                f"context.rope.high_freq_factor={out['high_freq_factor']:g} must be above low_freq_factor="
                f"{out['low_freq_factor']:g}",
                "use Llama 3.1's low_freq_factor 1, high_freq_factor 4",
            )
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            out[key] = float(rope[key])
    if out.get("beta_fast", 32.0) <= out.get("beta_slow", 1.0):
        _fail(
            f"context.rope.beta_fast={out.get('beta_fast', 32.0):g} must be above beta_slow={out.get('beta_slow', 1.0):g}",
            "use transformers' defaults (beta_fast 32, beta_slow 1) or drop both",
        )
    # linear: vLLM multiplies max_position_embeddings by factor (not on Gemma 3, which needs the window itself)
    max_positions = native if ropelib.factor_scales_window(config, rope_type) else window
    return ContextPlan(length, native, out, max_positions, window, base, layers, defaults)


def _theta_plan(
    rope: dict, length: int, native: int, declared: int, base: dict, config: dict, layers: dict | None
) -> ContextPlan:
    defaults = {}
    theta = rope.get("theta")
    if theta is None:
        dims = ropelib.rotary_dims(config)
        if dims is None:
            _fail(
                "context.rope.theta has no default here: the config gives no head size for the NTK-aware rule",
                "set e.g. theta: 8.0e6 (ProLong's for 64K)",
            )
        scale = max(length / native, 1.0)
        theta = ropelib.ntk_theta(base["rope_theta"], dims, scale)
        defaults["rope_theta"] = f"NTK-aware: {base['rope_theta']:g} x ({length}/{native}) ** ({dims}/{dims - 2})"
    out = {**base, "rope_theta": float(theta)}
    scale = float(base.get("factor") or 1.0) if ropelib.factor_scales_window(config, base["rope_type"]) else 1.0
    max_positions = max(declared, math.ceil(length / scale))
    served = {**config, "rope_parameters": out, "max_position_embeddings": max_positions}
    window = ropelib.rope_window(served)
    return ContextPlan(length, native, out, max_positions, window or max_positions, base, layers, defaults)


def extended_config(base: str, plan: ContextPlan | None, trust_remote_code: bool = False) -> Any:
    """The base model's config with the plan's RoPE and window (None: load the model as it is)."""
    kwargs = plan.config_kwargs() if plan else {}
    if not kwargs:
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **kwargs)


def context_manifest(manifest: dict, plan: ContextPlan | None, meter: LengthMeter, checkpointing: bool) -> dict:
    """The manifest with the run's context (RoPE, windows, hf_overrides) and its per-length cost."""
    manifest["context"] = plan.to_json() if plan else None
    manifest["training"]["gradient_checkpointing"] = checkpointing
    manifest["training"]["by_length"] = meter.summary()
    return manifest
