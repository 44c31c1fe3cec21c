"""The base model of a finetune: name -> folder, config and tokenizer, LoRA targets, merging an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.core.paths import local_or_hub

EMBEDDED_MODEL = "smollm2"
MODEL_FIX = "pass a local model folder, a downloaded hub id, or smollm2"


def resolve_model(name: str) -> str:
    """``smollm2`` -> the embedded model folder; an existing folder -> its absolute path; a hub id stays.

    A path-like name that does not exist is refused here (transformers would call it a bad repo id)."""
    if name == EMBEDDED_MODEL:
        from harness_ext.data.models import smollm2_path

        return str(smollm2_path())
    return local_or_hub(name, "model")


def model_max_length(config: Any) -> int | None:
    """The context length a transformers config declares (None if it declares none)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def linear_module_names(model: Any) -> set[str]:
    """Short names of the linear layers LoRA can target (e.g. q_proj, down_proj)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return names


def check_target_modules(model: Any, targets: list[str]) -> None:
    """Refuse LoRA target names the model has no linear layer for."""
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available and t != "all-linear"]
    if unknown:
        raise NeedlesError(
            f"unknown LoRA target module(s) {unknown} for {type(model).__name__}",
            fix=f"use names among {sorted(available)} (or all-linear)",
        )


def load_base(cfg: Any) -> tuple[str, Any, Any]:
    """(resolved model path, its config, its tokenizer); a model without chat template is refused."""
    from transformers import AutoConfig, AutoTokenizer

    from harness_ext.finetune.data import require_chat_template

    base = resolve_model(cfg.model)
    try:
        model_config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise NeedlesError(f"cannot load model {cfg.model!r}: {str(exc).splitlines()[0]}", fix=MODEL_FIX) from None
    require_chat_template(tokenizer, cfg.model)
    return base, model_config, tokenizer


def merge_adapter(base: str, adapter: Path, target: Path, trust_remote_code: bool = False, context: Any = None) -> Path:
    """base + adapter -> one plain model folder. Done from the saved adapter on the main process, so
    it works the same after FSDP / DeepSpeed training (sharded weights are never merged in place).

    ``context`` (a :class:`harness_ext.finetune.context.ContextPlan`): the folder's config.json carries the RoPE
    and window the adapter was trained with, in the installed transformers' form, and its tokenizer's
    ``model_max_length`` is raised to the window where it was lower (vLLM caps its window by it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness_ext.finetune.context import extended_config

    config = extended_config(base, context, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, trust_remote_code=trust_remote_code, **({"config": config} if config else {})
    )
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    if context is not None and (tokenizer.model_max_length or 0) < context.window:
        tokenizer.model_max_length = context.window
    tokenizer.save_pretrained(target)
    return target
