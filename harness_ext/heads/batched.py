"""Several probes decoded together: one forward pass per step for the whole batch (opt-in, ``batch_size`` > 1).

Why: on CPU a decode step is bound by reading the weights (about 540 MB for a 135M-parameter model in
float32), not by arithmetic, so B probes per forward cost little more than one. Each probe is still
prefilled on its own (same prompts, same kernels, same cache as the one-probe path, prefix sharing included);
the caches are then left-padded to a common width and stacked, and decoding runs with a padding mask and
per-row positions. A finished probe leaves the batch (its cache row is dropped).

Not bit-identical to one probe at a time: the linear layers run as a matrix product over B rows instead
of a matrix-vector product, which sums in another order (differences of ~1e-6, measured on this CPU),
and the softmax runs over the padded row. Scores change only where that round-off flips a near-tie
(the greedy token or a head's most-attended position); benchmarks/bench_heads.py measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness_ext.heads.model import LoadedModel, stop_token_ids
from harness_ext.heads.prefix import PromptCaches
from harness_ext.heads.steps import copy_hits


@dataclass
class Job:
    """One probe's decoding task: prompt ids, needle span, token budget, whether a newline ends it."""

    ids: list[int]
    span: tuple[int, int]
    max_new_tokens: int
    stop_at_newline: bool


def mergeable(caches: Sequence) -> bool:
    """Only plain growing caches can be padded and stacked (sliding-window or static layers cannot)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return all(type(c) is DynamicCache and all(type(la) is DynamicLayer for la in c.layers) for c in caches)


def _stack(caches: Sequence) -> tuple[object, list[int]]:
    """Left-pad every probe's cache to the longest one and stack them along the batch (in the first cache)."""
    width = max(c.get_seq_length() for c in caches)
    pads = [width - c.get_seq_length() for c in caches]
    merged = caches[0]
    for i, layer in enumerate(merged.layers):
        for name in ("keys", "values"):
            rows = [torch.nn.functional.pad(getattr(c.layers[i], name), (0, 0, p, 0)) for c, p in zip(caches, pads)]
            for c in caches[1:]:
                setattr(c.layers[i], name, None)  # free as we go: the peak is one layer copied twice, not all
            setattr(layer, name, torch.cat(rows))
    return merged, pads


def batched_traces(
    lm: LoadedModel, jobs: Sequence[Job], prompts: PromptCaches | None = None
) -> list[tuple[list[int], np.ndarray]] | None:
    """Greedy decoding with per-head copy-paste counts for several probes at once, as ``greedy_trace`` does
    for one; ``None`` when the model's cache cannot be batched (the caller then decodes one at a time).
    ``prompts`` supplies the prompt caches (shared prefixes, harness_ext.heads.prefix; fresh by default)."""
    model, ctl = lm.model, lm.ctl
    prompts = prompts if prompts is not None else PromptCaches(model)
    stop = stop_token_ids(lm.tokenizer)
    hits = [torch.zeros(ctl.num_layers, ctl.num_heads, dtype=torch.int64) for _ in jobs]
    generated: list[list[int]] = [[] for _ in jobs]
    contexts = [torch.tensor(j.ids) for j in jobs]
    with torch.inference_mode():
        caches = [prompts(j.ids) for j in jobs]
        if not mergeable(caches):
            return None
        past, pads = _stack(caches)
        del caches
        active = list(range(len(jobs)))  # probe index of each batch row
        mask = torch.tensor([[0] * p + [1] * (past.get_seq_length() - p + 1) for p in pads])
        inp = torch.tensor([[j.ids[-1]] for j in jobs])
        pos = torch.tensor([[len(j.ids) - 1] for j in jobs])
        step = 0
        while active:
            with ctl.record():
                out = model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens = out.logits[:, -1].argmax(dim=-1).tolist()
            argmax = ctl.argmax_matrix()  # (rows, layers, heads), positions in the padded cache
            keep = []
            for row, (i, token) in enumerate(zip(active, tokens)):
                hits[i] += copy_hits(argmax[row] - pads[i], jobs[i].span, contexts[i], token).long()
                if token in stop:
                    continue
                generated[i].append(token)
                if jobs[i].stop_at_newline and "\n" in lm.tokenizer.decode([token]):
                    continue  # the reference stops at a newline: the answer is one line
                if step + 1 >= jobs[i].max_new_tokens:
                    continue
                contexts[i] = torch.cat([contexts[i], torch.tensor([token])])
                keep.append(row)
            step += 1
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep)
                past.batch_select_indices(index)
                mask, pos, tokens = mask[index], pos[index], [tokens[r] for r in keep]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype)], dim=1)
            inp, pos = torch.tensor(tokens).view(-1, 1), pos + 1
    return [(g, h.numpy()) for g, h in zip(generated, hits)]
