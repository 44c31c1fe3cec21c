"""Context extension in ``needles finetune``: the ``context`` section checked against the model's config.json
(before anything loads), the RoPE and window the run trains and serves with, and what a run measures per
training length (tokens/s, peak memory).

``context: {length: L, rope: {type: T, ...}}``. Defaults a user expects (LLaMA-Factory's and LongLoRA's rule):
``factor = ceil(L / native)``, ``original_max_position_embeddings`` = the model's declared window. The window
written follows what each type means to transformers and vLLM (:mod:`harness_ext.core.rope`): yarn and llama3
set ``max_position_embeddings = factor x original`` (jquesnelle/yarn's finetune.py), linear and dynamic keep the
declared ``max_position_embeddings`` (dynamic NTK reads it as the pretraining window; vLLM multiplies it by
``factor``), ``theta`` raises the base frequency and sets ``max_position_embeddings = L`` (ProLong's recipe).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from harness_ext.core import rope as ropelib
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import ROPE_TYPES

CONTEXT_KEYS = ("length", "rope")
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's values
INTEGER_KEYS = ("original_max_position_embeddings",)


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

    @property
    def changes_rope(self) -> bool:
        return self.rope != self.base_rope or self.window != self.native

    def config_kwargs(self) -> dict:
        """Config attributes for AutoConfig / from_pretrained, in the installed transformers' form."""
        return ropelib.config_kwargs(self.rope, self.max_position_embeddings) if self.changes_rope else {}

    def hf_overrides(self) -> dict | None:
        """vLLM's hf_overrides that serve the base model with this RoPE (None: nothing to override)."""
        return ropelib.vllm_overrides(self.rope, self.max_position_embeddings) if self.changes_rope else None

    def to_json(self) -> dict:
        return {
            "length": self.length,
            "native_window": self.native,
            "window": self.window,
            "rope_parameters": self.rope,
            "max_position_embeddings": self.max_position_embeddings,
            "base_rope_parameters": self.base_rope,
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
    _check_keys(rope, rope_type)
    for key, value in rope.items():
        if key != "type":
            _number(f"rope.{key}", value, integer=key in INTEGER_KEYS)
    if rope.get("theta") is not None and rope["theta"] <= 0:
        _fail(f"context.rope.theta={rope['theta']} must be positive", "use e.g. theta: 8.0e6 (ProLong's for 64K)")
    if rope_type == "theta":
        return _theta_plan(rope, length, native, declared, base)
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
    return _scaled_plan(rope, rope_type, length, native, base)


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


def _scaled_plan(rope: dict, rope_type: str, length: int, native: int, base: dict) -> ContextPlan:
    original = int(rope.get("original_max_position_embeddings") or native)
    if original < 1:
        _fail(f"context.rope.original_max_position_embeddings={original} must be positive", f"use {native}")
    reach = native if rope_type in ropelib.FACTOR_SCALES_WINDOW else original
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
    max_positions = native if rope_type in ropelib.FACTOR_SCALES_WINDOW else window
    return ContextPlan(length, native, out, max_positions, window, base)


def _theta_plan(rope: dict, length: int, native: int, declared: int, base: dict) -> ContextPlan:
    if rope.get("theta") is None:
        _fail("context.rope.theta is required for type theta", "set e.g. theta: 8.0e6 (ProLong's for 64K)")
    out = {**base, "rope_theta": float(rope["theta"])}
    scale = float(base.get("factor") or 1.0) if base["rope_type"] in ropelib.FACTOR_SCALES_WINDOW else 1.0
    max_positions = max(declared, math.ceil(length / scale))
    window = ropelib.rope_window({"rope_parameters": out, "max_position_embeddings": max_positions})
    return ContextPlan(length, native, out, max_positions, window or max_positions, base)


# ------------------------------------------------------------------------------------- long sequences
def use_gradient_checkpointing(cfg: Any, longest: int) -> bool:
    """The configured switch, or (unset) on when the longest example exceeds ``gradient_checkpointing_above``."""
    if cfg.gradient_checkpointing is not None:
        return bool(cfg.gradient_checkpointing)
    return longest > cfg.gradient_checkpointing_above


def length_bucket(tokens: int) -> int:
    """The power of two a step's longest sequence rounds up to (the manifest's training length)."""
    return 1 << max(int(tokens) - 1, 1).bit_length()


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(r"VmHWM:\s+(\d+)", f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM, so each step's peak RSS is its own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class LengthMeter:
    """Tokens/s and peak memory per training length: CUDA peak allocation on a GPU, peak RSS on CPU (VmHWM reset
    at each step; where it cannot be reset, the process's peak so far, marked as such)."""

    def __init__(self, device: Any = None):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.rows: dict[int, dict] = {}
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak_per_step"
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif not _reset_peak_rss():
            self.kind = "rss_peak_of_process"
        self._t0 = time.perf_counter()

    def stop(self, longest: int, tokens: int) -> None:
        seconds = time.perf_counter() - self._t0
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            kib = _vm_hwm_kib()
            if kib is None:
                import resource

                kib, self.kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_peak_of_process"
            peak = kib * 1024
        row = self.rows.setdefault(length_bucket(longest), {"steps": 0, "tokens": 0, "seconds": 0.0, "peak": 0})
        row["steps"] += 1
        row["tokens"] += int(tokens)
        row["seconds"] += seconds
        row["peak"] = max(row["peak"], int(peak))
        row["longest"] = max(row.get("longest", 0), int(longest))

    def summary(self) -> dict:
        """``{"up_to_N": {steps, tokens, seconds, tokens_per_second, peak_memory_mb, longest_sequence}}``."""
        out = {}
        for bucket, r in sorted(self.rows.items()):
            out[f"up_to_{bucket}"] = {
                "steps": r["steps"],
                "tokens": r["tokens"],
                "seconds": round(r["seconds"], 3),
                "tokens_per_second": round(r["tokens"] / r["seconds"], 1) if r["seconds"] else None,
                "peak_memory_mb": round(r["peak"] / 2**20, 1),
                "memory": self.kind,
                "longest_sequence": r["longest"],
            }
        return out


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


def refuse_sequence_parallel(environ: Any = None, on_gpu: bool = False) -> None:
    """Refuse an accelerate launch with context or sequence parallelism (``parallelism_config`` cp_size or
    sp_size > 1, e.g. examples/accelerate/fsdp2_context_parallel.yaml) before accelerate builds its device mesh."""
    import os

    env = os.environ if environ is None else environ
    if str(env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false")).lower() != "true":
        return
    sizes = {k: int(env.get(f"PARALLELISM_CONFIG_{k.upper()}_SIZE", "1") or 1) for k in ("cp", "sp")}
    split = {k: v for k, v in sizes.items() if v > 1}
    if not split:
        return
    what = ", ".join(f"{k}_size={v}" for k, v in split.items())
    if not on_gpu:
        raise NeedlesError(
            f"the accelerate config asks for sequence parallelism ({what}), which needs CUDA GPUs: torch's context "
            "parallel shards attention over NCCL, and this machine has none",
            fix="train on one process (long examples fit through gradient checkpointing, on above "
            "--gradient-checkpointing-above tokens, and --batch-size 1), or run the config on a GPU node",
        )
    raise NeedlesError(
        f"the accelerate config asks for sequence parallelism ({what}), which the needles training loop does not "
        "do yet: its answer-only loss reads the last positions of each sequence, which context parallelism "
        "splits over ranks",
        fix="shard the model instead (examples/accelerate/fsdp.yaml) with gradient checkpointing and --batch-size 1",
    )
