"""The two steps both decoding paths of detection share: the prefill, and Wu et al.'s copy-paste test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import Cache


def prefill(model: torch.nn.Module, ids: list[int]) -> Cache:
    """KV cache of all but the last prompt token. Only the cache is used, so the LM head runs on one position
    (``logits_to_keep=1``) instead of all: a (tokens x vocabulary) float32 logits tensor was a fifth of the
    prefill's compute and most of its memory (200 MB at 1K tokens for a 49K vocabulary). The cache is the same."""
    return model(input_ids=torch.tensor([ids[:-1]]), use_cache=True, logits_to_keep=1).past_key_values


def copy_hits(argmax: torch.Tensor, span: tuple[int, int], context: torch.Tensor, token: int) -> torch.Tensor:
    """Wu et al.'s copy-paste test for one step: each head's most-attended position lies in the needle
    span and holds the token just generated. ``argmax`` is (layers, heads) positions into ``context``."""
    inside = (argmax >= span[0]) & (argmax < span[1])
    same = context[argmax.clamp(0, len(context) - 1)] == token
    return inside & same
