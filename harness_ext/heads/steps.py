"""The two steps both decoding paths of detection share: the prefill, and Wu et al.'s copy-paste test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import Cache

# The prompt is prefilled in blocks that start at fixed absolute positions (0, 256, 512, ...). Why: a forward over
# tokens [a, b) on top of a cache is not bit-identical to the same positions inside a longer forward (the linear
# layers and SDPA sum in another order for another number of rows: ~1e-7 apart, measured). With fixed boundaries
# a probe's cache depends on its own tokens only, so a cache whose first k blocks come from another probe with the
# same first k blocks (harness_ext.heads.prefix) is bit-identical to prefilling the probe alone. A prompt of up to
# PREFILL_BLOCK + 1 tokens is one block: exactly the single forward pass used before blocks existed.
PREFILL_BLOCK = 256


def prefill(model: torch.nn.Module, ids: list[int], past: Cache | None = None, block: int | None = None) -> Cache:
    """KV cache of all but the last prompt token, in blocks of ``block`` tokens (default PREFILL_BLOCK; 0: one pass),
    continuing ``past`` (which must hold the first ``k * block`` of those tokens) when given.

    Only the cache is used, so the LM head runs on one position (``logits_to_keep=1``) instead of all: a (tokens x
    vocabulary) float32 logits tensor was a fifth of the prefill's compute and most of its memory (200 MB at 1K
    tokens for a 49K vocabulary). The cache is the same."""
    prompt = ids[:-1]
    size = PREFILL_BLOCK if block is None else block
    start = past.get_seq_length() if past is not None else 0
    if size <= 0:
        size = max(1, len(prompt) - start)
    if start % size:
        raise ValueError(f"a prefill continues a cache of whole blocks ({start} tokens is not a multiple of {size})")
    for lo in range(start, len(prompt), size):
        chunk = torch.tensor([prompt[lo : lo + size]])
        past = model(input_ids=chunk, past_key_values=past, use_cache=True, logits_to_keep=1).past_key_values
    return past


def copy_hits(argmax: torch.Tensor, span: tuple[int, int], context: torch.Tensor, token: int) -> torch.Tensor:
    """Wu et al.'s copy-paste test for one step: each head's most-attended position lies in the needle
    span and holds the token just generated. ``argmax`` is (layers, heads) positions into ``context``."""
    inside = (argmax >= span[0]) & (argmax < span[1])
    same = context[argmax.clamp(0, len(context) - 1)] == token
    return inside & same
