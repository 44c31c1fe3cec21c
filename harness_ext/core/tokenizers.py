"""The evaluated model's tokenizer, as lm-eval hands it to synthetic tasks through metadata."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import truthy
from harness_ext.core.paths import local_or_hub

# Keys a model name arrives under: `--model_args` are merged into task metadata by lm-eval.
TOKENIZER_KEYS = ("tokenizer", "pretrained", "model")


def tokenizer_name(metadata: dict) -> str | None:
    for key in TOKENIZER_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@lru_cache(maxsize=8)
def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name = local_or_hub(name, "tokenizer", required_file=None)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise NeedlesError(
            f"cannot load the tokenizer {name!r} to size prompts: {str(exc).splitlines()[0]}",
            fix="pass a local model folder or a downloaded hub id with --model_args pretrained=... "
            "(or tokenizer=...); offline, pre-download it with `huggingface-cli download`",
        ) from None
    if len(tok("The quick brown fox.", add_special_tokens=False)["input_ids"]) == 0:
        raise NeedlesError(f"tokenizer {name!r} encodes text to 0 tokens", fix="point tokenizer= at a real tokenizer")
    return tok


def tokenizer_from_metadata(metadata: dict):
    name = tokenizer_name(metadata)
    if name is None:
        return None
    return load_tokenizer(name, truthy(metadata.get("trust_remote_code", False)))


def required_fingerprint(task: str, metadata: dict, use: str = "sizes prompts in the evaluated model's tokens") -> str:
    """The tokenizer fingerprint of a task whose rows are cut in the evaluated model's tokens (``use`` says how);
    without a tokenizer in the metadata the rows cannot be built, so the task is refused with the fix."""
    fingerprint = tokenizer_fingerprint(metadata)
    if fingerprint is None:
        raise NeedlesError(
            f"task {task} {use} and needs its tokenizer", fix="pass --model_args pretrained=... (or tokenizer=...)"
        )
    return fingerprint


def tokenizer_fingerprint(metadata: dict) -> str | None:
    """A content hash of the tokenizer without loading it when its files are on disk."""
    name = tokenizer_name(metadata)
    if name is None:
        return None
    folder = Path(name).expanduser()
    files = [folder / f for f in ("tokenizer.json", "tokenizer_config.json")] if folder.is_dir() else []
    if not any(f.is_file() for f in files):
        try:
            from huggingface_hub import try_to_load_from_cache

            files = [
                Path(p)
                for f in ("tokenizer.json", "tokenizer_config.json")
                if isinstance(p := try_to_load_from_cache(name, f), str)
            ]
        except Exception:  # noqa: BLE001 - any failure just means: fingerprint by loading
            files = []
    h = hashlib.sha256()
    if files:
        for f in files:
            if f.is_file():
                h.update(f.read_bytes())
        return h.hexdigest()
    tok = tokenizer_from_metadata(metadata)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    return h.hexdigest()
