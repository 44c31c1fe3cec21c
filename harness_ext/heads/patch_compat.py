"""Can two models be patched into each other? Same architecture (layers, heads, head size, hidden size, model
type) and the same tokenizer, checked from their config and tokenizer files before any weights are loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness_ext.core.errors import NeedlesError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
_PROBE_TEXT = 'Patching heads: 12-7, 3.14159 — naïve café ünïcode <tag> {"key": [1, 2]}\n\tend.'
ARCH_KEYS = ("model_type", "num_layers", "num_heads", "head_dim", "hidden_size")


def architecture(model: str | Path) -> dict:
    """The fields that must agree between source and target, read from the model's config (no weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as exc:
        raise NeedlesError(
            f"cannot read the config of {model!r}: {str(exc).splitlines()[0]}",
            fix="pass a local Hugging Face model folder (it holds config.json)",
        ) from None
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    return {
        "model_type": cfg.model_type,
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": heads,
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "hidden_size": int(cfg.hidden_size),
    }


def _tokenizer_sha(model: Path) -> str | None:
    if not model.is_dir():
        return None
    h, seen = hashlib.sha256(), False
    for name in _TOKENIZER_FILES:
        if (model / name).is_file():
            seen = True
            h.update(name.encode() + (model / name).read_bytes())
    return h.hexdigest() if seen else None


def same_tokenizer(source: str | Path, target: str | Path) -> bool:
    """Identical tokenizer files, or else the same vocabulary, special tokens and tokenization of a probe text."""
    sha_s, sha_t = _tokenizer_sha(Path(source)), _tokenizer_sha(Path(target))
    if sha_s is not None and sha_s == sha_t:
        return True
    from transformers import AutoTokenizer

    tok_s, tok_t = AutoTokenizer.from_pretrained(str(source)), AutoTokenizer.from_pretrained(str(target))
    return (
        tok_s.get_vocab() == tok_t.get_vocab()
        and tok_s.all_special_ids == tok_t.all_special_ids
        and tok_s(_PROBE_TEXT)["input_ids"] == tok_t(_PROBE_TEXT)["input_ids"]
    )


def check_compatible(source: str | Path, target: str | Path) -> dict:
    """The shared architecture of source and target; refuses models whose heads or tokens do not correspond."""
    arch_s, arch_t = architecture(source), architecture(target)
    diff = [f"{k} {arch_s[k]} vs {arch_t[k]}" for k in ARCH_KEYS if arch_s[k] != arch_t[k]]
    if diff:
        raise NeedlesError(
            f"source {source} and target {target} differ in architecture (source vs target: {', '.join(diff)}); "
            "heads can only be patched between models of one architecture",
            fix="patch between finetunes (or adapters) of the same base model",
        )
    if not same_tokenizer(source, target):
        raise NeedlesError(
            f"source {source} and target {target} do not share a tokenizer (vocabulary or tokenization differs), "
            "so one token sequence cannot be fed to both",
            fix="patch between finetunes (or adapters) of the same base model, saved with its tokenizer",
        )
    return arch_t
