"""Retrieval-head detection (Wu et al., arXiv 2404.15574): which attention heads copy the needle.

During greedy decoding, at each step that generates token ``w``, head ``h`` *copy-pastes* when the
argmax of its attention row (the current query over every cached position) lies inside the needle
span and that position holds ``w``. A probe's score for ``h`` is the number of such steps divided by
the needle length in tokens; a head's retrieval score is the mean over the probes the model actually
answered (NIAH: ROUGE-1 recall of the reference answer > 0.5; KV: the plugin's ``value_acc``).

The attention rows come from the instrumented attention (harness_ext.heads.instrument); the
result document is built by harness_ext.heads.report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness_ext.heads.model import LoadedModel, stop_token_ids
from harness_ext.heads.probes import success
from harness_ext.heads.prompts import Probe, encode


@dataclass
class ProbeResult:
    """One probe's outcome: the reply, whether it counts as retrieved, and every head's copy-paste steps."""

    probe: Probe
    n_tokens: int
    needle_tokens: int
    response: str
    retrieved: bool
    success_value: float
    hits: np.ndarray  # (layers, heads) copy-paste steps


def greedy_trace(
    lm: LoadedModel, ids: list[int], span: tuple[int, int], max_new_tokens: int, stop_at_newline: bool = True
) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with the copy-paste count of every head (reference loop: prefill all but the last
    prompt token, then feed one token per step and check the attention row that produced the next one)."""
    model, ctl = lm.model, lm.ctl
    stop = stop_token_ids(lm.tokenizer)
    prompt = torch.tensor([ids])
    hits = torch.zeros(ctl.num_layers, ctl.num_heads, dtype=torch.int64)
    generated: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=prompt[:, :-1], use_cache=True)
        past, inp = out.past_key_values, prompt[:, -1:]
        context = prompt[0]
        for _ in range(max_new_tokens):
            with ctl.record():
                out = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            hits += copy_hits(ctl.argmax_matrix()[0], span, context, token).long()
            if token in stop:
                break
            generated.append(token)
            if stop_at_newline and "\n" in lm.tokenizer.decode([token]):
                break  # the reference stops at a newline: the answer is one line
            context = torch.cat([context, torch.tensor([token])])
            inp = torch.tensor([[token]])
    return generated, hits.numpy()


def copy_hits(argmax: torch.Tensor, span: tuple[int, int], context: torch.Tensor, token: int) -> torch.Tensor:
    """Wu et al.'s copy-paste test for one step: each head's most-attended position lies in the needle
    span and holds the token just generated. ``argmax`` is (layers, heads) positions into ``context``."""
    inside = (argmax >= span[0]) & (argmax < span[1])
    same = context[argmax.clamp(0, len(context) - 1)] == token
    return inside & same


def run_probe(lm: LoadedModel, probe: Probe, extra_tokens: int = 24) -> ProbeResult:
    """Decode one probe greedily (up to needle tokens + ``extra_tokens``), score its reply and its heads."""
    ids, span = encode(lm.tokenizer, probe, lm.chat)
    needle_len = span[1] - span[0]
    # NIAH and MDQA answers are one line (both references stop at a newline); KV decodes like its task (no stop).
    generated, hits = greedy_trace(lm, ids, span, needle_len + extra_tokens, stop_at_newline=probe.family != "kv")
    response = lm.tokenizer.decode(generated, skip_special_tokens=True)
    value = success(probe, response)
    return ProbeResult(probe, len(ids), needle_len, response, value > 0.5, value, hits)


def aggregate(results: Sequence[ProbeResult], num_layers: int, num_heads: int) -> tuple[np.ndarray, int]:
    """Mean per-probe score (hits / needle tokens) over the retrieved probes; zeros when none was."""
    good = [r.hits / r.needle_tokens for r in results if r.retrieved]
    if not good:
        return np.zeros((num_layers, num_heads)), 0
    return np.mean(np.stack(good), axis=0), len(good)


def detect(
    lm: LoadedModel, probes: Sequence[Probe], extra_tokens: int = 24, progress: bool = True
) -> list[ProbeResult]:
    """Run every probe in order (one progress line each on stderr unless ``progress`` is off)."""
    results = []
    for i, probe in enumerate(probes, 1):
        res = run_probe(lm, probe, extra_tokens)
        results.append(res)
        if progress:
            mark = "ok " if res.retrieved else "miss"
            print(
                f"[needles heads] {i}/{len(probes)} {mark} {probe.probe_id} ({res.n_tokens} tok): "
                f"{res.response[:60]!r}",
                file=sys.stderr,
                flush=True,
            )
    return results
