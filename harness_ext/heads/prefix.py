"""Prefix sharing across probes: the prompt cache of one probe starts from the previous probe's cache.

Why: probes of one length differ only from the needle on (the chat preamble and the haystack before the
needle are the same tokens at the same positions for every depth, and for every needle: the filler is one
seeded sequence). Prefilling that prefix again for every probe is a large part of detection's work at 2K-4K
tokens (the prefill is most of it there).

How: the previous probe's prompt cache is kept (its key/value tensors: decoding grows a cache by
concatenation into new tensors, so the kept ones stay as they were); the next probe keeps the longest common
prefix of the two *token id* lists (not strings: the chat template wraps the haystack and BPE merges across
the boundary), rounded down to whole prefill blocks (harness_ext.heads.steps.PREFILL_BLOCK), as views, and
prefills only the rest. The kept tokens sit at the same absolute positions (RoPE is applied to keys before
they are cached), and the blocks are the ones a lone prefill computes, so the cache is bit-identical to
prefilling the probe alone (tests/heads/test_heads_prefix.py) and so are every reply, hit and score.

One probe at a time, detection decodes the probes in lexicographic order of their token ids (``sharing_order``):
then the previous probe is always one that shares the longest prefix, so the haystack before each needle is
prefilled once for every needle and depth of a length (what cannot be shared: each probe's needle and the
haystack after it, whose positions and context differ). Sharing needs transformers' plain growing
cache (``DynamicLayer`` in every layer); a model whose cache has sliding-window or other layers is prefilled
one probe at a time in one pass, as before blocks existed (``PromptCaches.sharing`` is then False).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from harness_ext.heads import steps

if TYPE_CHECKING:
    from transformers import Cache


def plain_cache(model: torch.nn.Module) -> bool:
    """Whether ``model`` caches in plain growing layers only (the ones that can be cut and continued)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - any model transformers cannot describe is prefilled the old way
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def sharing_order(prompts: list[list[int]]) -> list[int]:
    """Indices of ``prompts`` in lexicographic order of their token ids: a depth-first walk of their prefix tree,
    in which each prompt's longest common prefix with *any* other is shared with the one just before it, so
    keeping only the previous prompt's cache prefills every tree node once."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i])


def _view(kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> Cache:
    """A fresh cache whose layers hold the first ``length`` positions of ``kv`` (views: nothing is copied)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    for keys, values in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        cache.layers.append(layer)
    return cache


class PromptCaches:
    """Prompt caches for a stream of probes, each continuing the previous probe's cache where they agree.

    ``share=False`` (or a model without a plain cache) prefills every probe alone; the counters say how many
    prompt tokens were computed and how many were reused."""

    def __init__(self, model: torch.nn.Module, share: bool = True) -> None:
        self.model = model
        self.plain = plain_cache(model)
        self.sharing = share and self.plain
        self.computed = 0
        self.reused = 0
        self._ids: list[int] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, ids: list[int]) -> Cache:
        """The cache of all but the last token of ``ids`` (as harness_ext.heads.steps.prefill computes it)."""
        prompt = ids[:-1]
        if not self.plain:
            self.computed += len(prompt)
            return steps.prefill(self.model, ids, block=0)  # one pass: the pre-block prefill, for any cache type
        keep = 0
        if self.sharing and self._kv:
            block = steps.PREFILL_BLOCK
            keep = common_prefix(self._ids, prompt) // block * block
        past = _view(self._kv, keep) if keep else None
        cache = steps.prefill(self.model, ids, past)
        self.computed += len(prompt) - keep
        self.reused += keep
        if self.sharing:
            self._ids, self._kv = prompt, [(layer.keys, layer.values) for layer in cache.layers]
        return cache

    def clear(self) -> None:
        """Drop the kept cache (its memory: one prompt's keys and values)."""
        self._ids, self._kv = [], []
