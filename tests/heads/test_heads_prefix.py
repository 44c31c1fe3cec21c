"""Prefix sharing (harness_ext.heads.prefix): a probe's prompt cache continued from the previous probe's is
bit-identical to prefilling it alone, so replies, hits and head scores are identical; the blocked prefill keeps
the real positions (it matches one forward pass up to round-off)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness_ext.heads import detect as heads
from harness_ext.heads import prefix, steps
from harness_ext.heads import probes as heads_probes
from harness_ext.heads.model import load_model
from harness_ext.heads.prompts import Probe, encode
from harness_ext.heads.scores import rounded_matrix


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def probes(tiny, shared_data):
    """NIAH at two lengths and three depths (shared haystack prefixes), a KV probe, and a probe that shares no
    token with any other (it does not start with the chat template)."""
    needles = heads_probes.load_needles(shared_data / "retrieval-head" / "needles.jsonl")
    niah = heads_probes.niah_probes(tiny.tokenizer, needles[:1], [200, 400], [0.2, 0.7], tiny.chat)
    docs = heads_probes.kv_docs(tiny.tokenizer, [160], [0.5], num_samples=1, seed=0)
    filler = " ".join(heads_probes.haystack_sentences(12, seed=3))
    text = f"Zebra notes. {filler} The pass code is 4815. {filler}\nWhat is the pass code? Answer:"
    at = text.index("4815")
    lone = Probe("lone", "niah", text, (at, at + 4), "4815")
    return [*niah, *heads_probes.kv_probes(tiny.tokenizer, docs, tiny.chat), lone]


def _same_cache(a, b) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


def test_blocked_prefill_keeps_the_real_positions(tiny, monkeypatch):
    """Blocks continue the cache at the right positions: the cache and the next token's logits match one pass."""
    monkeypatch.setattr(steps, "PREFILL_BLOCK", 32)
    torch.manual_seed(3)
    ids = torch.randint(100, 5000, (150,)).tolist()
    with torch.inference_mode():
        one = steps.prefill(tiny.model, ids, block=0)
        blocked = steps.prefill(tiny.model, ids)
        assert blocked.get_seq_length() == one.get_seq_length() == len(ids) - 1
        for x, y in zip(one.layers, blocked.layers):
            assert torch.allclose(x.keys, y.keys, atol=1e-5) and torch.allclose(x.values, y.values, atol=1e-5)
        nxt = torch.tensor([ids[-1:]])
        a = tiny.model(input_ids=nxt, past_key_values=one, use_cache=True).logits[0, -1]
        b = tiny.model(input_ids=nxt, past_key_values=blocked, use_cache=True).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="whole blocks"):
        steps.prefill(tiny.model, ids, past=steps.prefill(tiny.model, ids[:11]))


@pytest.mark.parametrize("block", [32, None])
def test_shared_prompt_caches_are_bit_identical(tiny, probes, monkeypatch, block):
    """Every probe's cache from the sharing stream equals its lone prefill, bit for bit; sharing really happened
    (tokens reused) and never across the probe that shares nothing."""
    if block:
        monkeypatch.setattr(steps, "PREFILL_BLOCK", block)
    ids = [encode(tiny.tokenizer, p, tiny.chat)[0] for p in probes]
    shared, alone = prefix.PromptCaches(tiny.model), prefix.PromptCaches(tiny.model, share=False)
    with torch.inference_mode():
        for i, x in enumerate(ids):
            before = shared.reused
            assert _same_cache(shared(x), alone(x)), probes[i].probe_id
            if probes[i].probe_id == "lone":
                assert shared.reused == before  # first token differs: nothing to share
    assert shared.sharing and alone.reused == 0 and shared.reused % steps.PREFILL_BLOCK == 0
    if block:  # at the default block (256) these short probes share the chat preamble only: nothing is reused
        assert shared.reused > 0
    assert shared.computed + shared.reused == alone.computed == sum(len(x) - 1 for x in ids)


def test_common_prefix_is_on_token_ids():
    assert prefix.common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert prefix.common_prefix([1, 2], [1, 2, 3]) == 2
    assert prefix.common_prefix([7], [1, 2]) == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_detection_with_shared_prefixes_is_identical(tiny, probes, monkeypatch, batch):
    """Shared vs unshared detection: same replies, same hits, byte-identical score grids (heads.json rounding)."""
    monkeypatch.setattr(steps, "PREFILL_BLOCK", 32)  # many block boundaries inside these short probes
    off = heads.detect(tiny, probes, extra_tokens=0, progress=False, batch_size=batch, share_prefix=False)
    on = heads.detect(tiny, probes, extra_tokens=0, progress=False, batch_size=batch, share_prefix=True)
    assert [r.probe.probe_id for r in on] == [p.probe_id for p in probes]
    for a, b in zip(off, on):
        assert a.response == b.response and a.retrieved == b.retrieved
        np.testing.assert_array_equal(a.hits, b.hits)
    # Every probe counts, so the grids are the mean of all hits (a random model retrieves nothing by itself).
    grid = [np.mean([r.hits / r.needle_tokens for r in res], axis=0) for res in (off, on)]
    assert json.dumps(rounded_matrix(grid[0])) == json.dumps(rounded_matrix(grid[1]))


def test_without_a_plain_cache_every_probe_is_prefilled_in_one_pass(tiny, probes, monkeypatch):
    monkeypatch.setattr(prefix, "plain_cache", lambda model: False)
    caches = prefix.PromptCaches(tiny.model)
    assert not caches.sharing
    ids = encode(tiny.tokenizer, probes[1], tiny.chat)[0]
    with torch.inference_mode():
        got = caches(ids)
        full = tiny.model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).past_key_values
    assert _same_cache(got, full) and caches.reused == 0
    res = heads.detect(tiny, probes[:2], extra_tokens=2, progress=False)
    assert [r.probe.probe_id for r in res] == [p.probe_id for p in probes[:2]]
