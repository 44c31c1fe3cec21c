"""Loading the model whose heads are measured: a causal LM (optionally with a LoRA adapter merged in),
its tokenizer, the instrumented attention's controller, and provenance for the result files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness_ext.core.errors import NeedlesError
from harness_ext.core.paths import local_or_hub
from harness_ext.heads.instrument import HeadControl, instrument

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ADAPTER_FIX = "pass the folder that peft's save_pretrained wrote (it holds adapter_config.json)"


@dataclass
class LoadedModel:
    """An instrumented model in eval mode, its tokenizer, and what was loaded (recorded in heads.json)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    ctl: HeadControl
    info: dict = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return bool(self.info.get("chat_template"))


def _dir_sha256(path: Path, names: Sequence[str]) -> str | None:
    h, seen = hashlib.sha256(), False
    for name in names:
        f = path / name
        if f.is_file():
            seen = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest() if seen else None


def check_model_path(model: str | Path) -> None:
    """Refuse a model path that cannot be a model folder before anything slow is loaded (a hub id passes)."""
    local_or_hub(model, "model")


def check_adapter_path(adapter: str | Path) -> None:
    """Refuse an adapter path that is not a peft adapter folder."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise NeedlesError(f"adapter folder {adapter} does not exist", fix=_ADAPTER_FIX)
    if not path.is_dir():
        raise NeedlesError(f"--adapter {adapter} is a file, not an adapter folder", fix=_ADAPTER_FIX)
    if not (path / "adapter_config.json").is_file():
        raise NeedlesError(f"{adapter} is not a peft adapter folder (no adapter_config.json)", fix=_ADAPTER_FIX)


def load_model(
    model: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "float32",
    chat_template: bool | None = None,
    config_kwargs: dict | None = None,
) -> LoadedModel:
    """A causal LM (optionally with a peft LoRA adapter merged in) in eval mode, instrumented. ``config_kwargs``
    change its config before the weights load (an extended RoPE: harness_ext.heads.rope_window)."""
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise NeedlesError(f"dtype {dtype!r} is not supported", fix="use float32 or bfloat16")
    check_model_path(model)
    if adapter:
        check_adapter_path(adapter)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model))
        extra = {}
        if config_kwargs:
            from transformers import AutoConfig

            extra["config"] = AutoConfig.from_pretrained(str(model), **config_kwargs)
        lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise NeedlesError(
            f"cannot load model {model!r}: {str(exc).splitlines()[0]}",
            fix="pass a local Hugging Face model folder (needles models smollm2 prints one)",
        ) from None
    info = {"model": str(model), "adapter": str(adapter) if adapter else None, "dtype": dtype}
    if config_kwargs:
        info["config_overrides"] = config_kwargs
    model_dir = Path(model)
    if model_dir.is_dir():
        info["model_config_sha256"] = _dir_sha256(model_dir, ["config.json"])
    if adapter:
        lm = _merge_adapter(lm, Path(adapter))
        info["adapter_sha256"] = _dir_sha256(
            Path(adapter), ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
        )
    lm.eval()
    use_chat = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tok, "chat_template", None):
        raise NeedlesError(f"{model} has no chat template", fix="drop --chat-template (plain prompts are used)")
    info["chat_template"] = use_chat
    ctl = instrument(lm)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    info.update(
        num_layers=ctl.num_layers,
        num_heads=ctl.num_heads,
        num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or ctl.num_heads),
    )
    return LoadedModel(lm, tok, ctl, info)


def _merge_adapter(lm: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise NeedlesError("--adapter needs peft", fix="pip install 'lm-eval-needles[train]'") from None

    # Merged weights: the same function as the adapter, and generation runs at base-model speed.
    return PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a reply: EOS and the chat end-of-turn tokens the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids
