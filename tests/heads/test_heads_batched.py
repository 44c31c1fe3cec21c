"""Faster detection: the LM-head-free prefill is exact, batched decoding matches one probe at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness_ext.heads import batched
from harness_ext.heads import detect as heads
from harness_ext.heads import probes as heads_probes
from harness_ext.heads.model import load_model
from harness_ext.heads.steps import prefill


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def probes(tiny, shared_data):
    needles = heads_probes.load_needles(shared_data / "retrieval-head" / "needles.jsonl")
    # Different lengths (so the batch is padded), several depths, plus a KV probe (no newline stop).
    niah = heads_probes.niah_probes(tiny.tokenizer, needles[:2], [160, 200], [0.3, 0.7], tiny.chat)
    docs = heads_probes.kv_docs(tiny.tokenizer, [180], [0.5], num_samples=1, seed=0)
    return niah + heads_probes.kv_probes(tiny.tokenizer, docs, tiny.chat)


def test_prefill_keeps_the_cache_of_a_full_forward(tiny):
    """logits_to_keep=1 only skips the LM head on earlier positions: the cache is bit-identical."""
    ids = torch.randint(100, 5000, (60,)).tolist()
    with torch.inference_mode():
        full = tiny.model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).past_key_values
        ours = prefill(tiny.model, ids)
    for a, b in zip(full.layers, ours.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_batched_detection_matches_one_probe_at_a_time(tiny, probes):
    one = heads.detect(tiny, probes, extra_tokens=6, progress=False)
    many = heads.detect(tiny, probes, extra_tokens=6, progress=False, batch_size=4)
    assert len(one) == len(many) == len(probes)
    for a, b in zip(one, many):
        assert a.probe.probe_id == b.probe.probe_id and a.n_tokens == b.n_tokens
        assert a.response == b.response
        np.testing.assert_array_equal(a.hits, b.hits)


def test_batching_falls_back_when_the_cache_cannot_be_stacked(tiny, probes, monkeypatch):
    monkeypatch.setattr(batched, "mergeable", lambda caches: False)
    assert batched.batched_traces(tiny, [heads._job(tiny, p, 2) for p in probes[:2]]) is None
    res = heads.detect(tiny, probes[:2], extra_tokens=2, progress=False, batch_size=2)
    assert [r.probe.probe_id for r in res] == [p.probe_id for p in probes[:2]]
