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

from harness_ext.heads.batched import Job, batched_traces
from harness_ext.heads.model import LoadedModel, stop_token_ids
from harness_ext.heads.prefix import PromptCaches, sharing_order
from harness_ext.heads.probes import success
from harness_ext.heads.prompts import Probe, encode
from harness_ext.heads.steps import copy_hits


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
    lm: LoadedModel,
    ids: list[int],
    span: tuple[int, int],
    max_new_tokens: int,
    stop_at_newline: bool = True,
    prompts: PromptCaches | None = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with the copy-paste count of every head (reference loop: prefill all but the last
    prompt token, then feed one token per step and check the attention row that produced the next one).
    ``prompts`` supplies the prompt cache (shared with earlier probes' prefixes; a fresh one by default)."""
    model, ctl = lm.model, lm.ctl
    prompts = prompts if prompts is not None else PromptCaches(model)
    stop = stop_token_ids(lm.tokenizer)
    prompt = torch.tensor([ids])
    hits = torch.zeros(ctl.num_layers, ctl.num_heads, dtype=torch.int64)
    generated: list[int] = []
    with torch.inference_mode():
        past, inp = prompts(ids), prompt[:, -1:]
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


def run_probe(lm: LoadedModel, probe: Probe, extra_tokens: int = 24) -> ProbeResult:
    """Decode one probe greedily (up to needle tokens + ``extra_tokens``), score its reply and its heads."""
    return run_probes(lm, [probe], extra_tokens)[0]


def _job(lm: LoadedModel, probe: Probe, extra_tokens: int) -> Job:
    ids, span = encode(lm.tokenizer, probe, lm.chat)
    # NIAH and MDQA answers are one line (both references stop at a newline); KV decodes like its task (no stop).
    return Job(ids, span, span[1] - span[0] + extra_tokens, stop_at_newline=probe.family != "kv")


def run_probes(
    lm: LoadedModel, probes: Sequence[Probe], extra_tokens: int = 24, prompts: PromptCaches | None = None
) -> list[ProbeResult]:
    """Decode ``probes`` (one at a time when there is one, else batched) and score replies and heads.
    ``prompts`` carries the prompt-prefix cache from call to call (a fresh one by default)."""
    prompts = prompts if prompts is not None else PromptCaches(lm.model)
    jobs = [_job(lm, p, extra_tokens) for p in probes]
    traces = batched_traces(lm, jobs, prompts) if len(jobs) > 1 else None
    if traces is None:
        traces = [greedy_trace(lm, j.ids, j.span, j.max_new_tokens, j.stop_at_newline, prompts) for j in jobs]
    results = []
    for probe, job, (generated, hits) in zip(probes, jobs, traces):
        response = lm.tokenizer.decode(generated, skip_special_tokens=True)
        value = success(probe, response)
        results.append(ProbeResult(probe, len(job.ids), job.span[1] - job.span[0], response, value > 0.5, value, hits))
    return results


def aggregate(results: Sequence[ProbeResult], num_layers: int, num_heads: int) -> tuple[np.ndarray, int]:
    """Mean per-probe score (hits / needle tokens) over the retrieved probes; zeros when none was."""
    good = [r.hits / r.needle_tokens for r in results if r.retrieved]
    if not good:
        return np.zeros((num_layers, num_heads)), 0
    return np.mean(np.stack(good), axis=0), len(good)


def detect(
    lm: LoadedModel,
    probes: Sequence[Probe],
    extra_tokens: int = 24,
    progress: bool = True,
    batch_size: int = 1,
    share_prefix: bool = True,
) -> list[ProbeResult]:
    """Run every probe (one progress line each on stderr unless ``progress`` is off); results in ``probes``' order.
    ``batch_size`` > 1 decodes that many probes per forward pass (faster on CPU; equal up to float round-off, see
    batched). ``share_prefix`` prefills the prompt prefix a probe shares with the one before it once (bit-identical
    results, see harness_ext.heads.prefix); off, every probe is prefilled alone."""
    size = max(1, batch_size)
    prompts = PromptCaches(lm.model, share=share_prefix)
    order = list(range(len(probes)))
    if prompts.sharing and size == 1:
        # One probe at a time, a probe's result does not depend on its neighbours: decode in the order that
        # shares the most (batches keep their order, since a batch's round-off depends on who is in it).
        order = sharing_order([encode(lm.tokenizer, p, lm.chat)[0] for p in probes])
    results: list[ProbeResult | None] = [None] * len(probes)
    done = 0
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        for i, res in zip(chunk, run_probes(lm, [probes[i] for i in chunk], extra_tokens, prompts)):
            results[i] = res
            done += 1
            if progress:
                mark = "ok " if res.retrieved else "miss"
                print(
                    f"[needles heads] {done}/{len(probes)} {mark} {res.probe.probe_id} ({res.n_tokens} tok): "
                    f"{res.response[:60]!r}",
                    file=sys.stderr,
                    flush=True,
                )
    return [r for r in results if r is not None]
