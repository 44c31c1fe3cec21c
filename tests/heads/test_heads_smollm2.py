"""Retrieval heads on the real SmolLM2-135M-Instruct, through the real CLI.

* the detector finds a small set of high-scoring heads, most heads near zero;
* the detector agrees exactly with a reference loop written the way Wu et al. wrote theirs
  (transformers' eager attention with output_attentions, topk(1) of each head's last row), and gives the
  same hits when run twice (the CLI's byte-for-byte determinism of heads.json/heads.png/retrieval_heads.txt,
  batched and one by one, is tests/heads/test_heads.py::test_cli_is_deterministic_and_writes_scores_heatmap_and_list);
* the LoRA adapter of the finetuning issue's loop (the session's `finetuned_smollm2` fixture: 40 steps
  on synthetic KV, value_acc ~0.05 -> ~0.6-0.8) is detected and compared with the base;
* on that finetuned model, knocking out the top-10 heads lowers KV-retrieval value_acc clearly more
  than knocking out 10 random heads (paired per document, with a bootstrap CI). The base model is
  too weak at KV retrieval (value_acc ~0.12 at 256-512 tokens) for a knockout to have room to show.

Budget: about 70 s on 2 CPU cores after the loop fixture (which tests/experiment/test_finetune_loop.py shares):
one detection of the base model, one detection + knockout run of the adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness_ext.heads import detect as heads
from harness_ext.heads import probes as heads_probes
from harness_ext.heads.model import load_model
from harness_ext.heads.prompts import encode

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# NIAH at 512 tokens (3 reference needles x 2 depths) plus a few KV probes: enough for SmolLM2's heads.
DETECT = [
    "--lengths",
    "512",
    "--depths",
    "0.25",
    "0.75",
    "--kv-lengths",
    "512",
    "--kv-samples",
    "2",
    "--kv-depths",
    "0",
    "1",
    "--probe-batch",  # the batched decoding path on the real model (equal to one-by-one up to round-off)
    "5",
    "--quiet",
]
K = 10


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "harness_ext.cli", "heads", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"needles heads {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def base_dir(smollm2_dir, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heads-base")
    _cli("--model", str(smollm2_dir), *DETECT, "-o", str(out))
    return out


def test_few_heads_score_high_and_most_score_zero(base_dir):
    rep = json.loads((base_dir / "heads.json").read_text())
    scores = np.asarray(rep["scores"])
    assert scores.shape == (30, 9)
    assert rep["num_retrieved"] >= 4  # SmolLM2 answers the 512-token NIAH probes
    n_heads = len(rep["retrieval_heads"])
    assert 3 <= n_heads <= 0.12 * scores.size, rep["summary"]  # a small set: Wu et al. report 3-6 %
    assert scores.max() > 0.3
    assert (scores < 0.01).mean() > 0.6 and np.median(scores) < 0.01
    top = sorted(scores.ravel())[::-1]
    assert np.mean(top[:K]) > 10 * np.mean(top[K:])  # mass concentrates in the top heads
    assert rep["retrieval_heads"][0]["score"] == pytest.approx(scores.max(), abs=1e-6)
    txt = (base_dir / "retrieval_heads.txt").read_text()
    assert f"{n_heads} retrieval heads" in txt


def _reference_hits(model, ids: list[int], span: tuple[int, int], max_new: int) -> np.ndarray:
    """Wu et al.'s loop: eager attention, output_attentions, topk(1) of the last row, same token in span."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    hits = np.zeros((L, H), dtype=np.int64)
    prompt = torch.tensor([ids])
    context = list(ids)
    with torch.no_grad():
        past = model(input_ids=prompt[:, :-1], use_cache=True).past_key_values
        inp = prompt[:, -1:]
        for _ in range(max_new):
            out = model(input_ids=inp, past_key_values=past, use_cache=True, output_attentions=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            for layer in range(L):
                for head in range(H):
                    idx = int(out.attentions[layer][0, head, -1].topk(1).indices[0])
                    if span[0] <= idx < span[1] and context[idx] == token:
                        hits[layer, head] += 1
            if token == model.config.eos_token_id or token == 2:
                break
            context.append(token)
            inp = torch.tensor([[token]])
    return hits


def test_detector_agrees_with_the_reference_loop(smollm2_dir, shared_data):
    from transformers import AutoModelForCausalLM

    lm = load_model(smollm2_dir)
    needle = heads_probes.load_needles(shared_data / "retrieval-head" / "needles.jsonl")[1]
    probe = heads_probes.niah_probe(lm.tokenizer, needle, 256, 0.5, chat=True)
    ids, span = encode(lm.tokenizer, probe, chat=True)
    ours = heads.run_probe(lm, probe, extra_tokens=0)  # budget: the needle's length in tokens
    assert ours.retrieved and ours.hits.sum() > 0
    assert np.array_equal(heads.run_probe(lm, probe, extra_tokens=0).hits, ours.hits)  # deterministic
    eager = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()
    ref = _reference_hits(eager, ids, span, span[1] - span[0])
    assert np.array_equal(ours.hits, ref)


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir, finetuned_smollm2, tmp_path_factory) -> Path:
    """The finetuned model's heads, detected and then knocked out (top-10 and one draw of 10 random heads) in one
    run."""
    out = tmp_path_factory.mktemp("heads-lora")
    _cli(
        "--model", str(smollm2_dir), "--adapter", finetuned_smollm2["adapter"], *DETECT, "-o", str(out),
        "--knockout", f"top:{K}", "--knockout", f"random:{K}", "--draws", "1",
        "--eval-lengths", "256", "--eval-samples", "5",
    )  # fmt: skip
    return out


def test_top_heads_matter_more_than_random_ones(adapter_dir):
    ko = json.loads((adapter_dir / "knockout.json").read_text())
    top, rnd = ko["conditions"]
    assert ko["num_items"] == 25 and ko["metric"] == "value_acc"
    assert ko["baseline"]["accuracy"] >= 0.6, "the finetuned SmolLM2 should retrieve most KV values at 256 tokens"
    scores = np.asarray(json.loads((adapter_dir / "heads.json").read_text())["scores"])
    top_heads = {tuple(h) for h in top["runs"][0]["heads"]}
    assert top_heads == {
        tuple(int(x) for x in np.unravel_index(i, scores.shape)) for i in np.argsort(-scores, axis=None)[:K]
    }
    assert all(not top_heads & {tuple(h) for h in r["heads"]} for r in rnd["runs"])
    # Knocking out the retrieval heads hurts, and clearly more than random heads (paired, per document).
    assert top["delta"] < -0.3
    assert top["delta"] < rnd["delta"] - 0.2
    (cmp,) = ko["top_vs_random"]
    assert cmp["ci95"][1] < 0
    print((adapter_dir / "knockout.json").read_text())


def test_compare_base_with_the_finetuned_adapter(finetuned_smollm2, base_dir, adapter_dir, tmp_path):
    out = adapter_dir
    a = json.loads((base_dir / "heads.json").read_text())
    b = json.loads((out / "heads.json").read_text())
    assert b["model"]["adapter"] == finetuned_smollm2["adapter"] and len(b["model"]["adapter_sha256"]) == 64
    assert a["probes_sha256"] == b["probes_sha256"]  # same prompts: the model is the only difference
    sa, sb = np.asarray(a["scores"]), np.asarray(b["scores"])
    assert not np.array_equal(sa, sb)  # the adapter really changed the model's attention
    proc = _cli("compare", str(base_dir / "heads.json"), str(out / "heads.json"), "-o", str(tmp_path / "cmp.json"))
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    ha = {(h["layer"], h["head"]) for h in a["retrieval_heads"]}
    hb = {(h["layer"], h["head"]) for h in b["retrieval_heads"]}
    assert cmp["num_shared"] == len(ha & hb)
    assert cmp["recall_b_in_a"] == pytest.approx(len(ha & hb) / len(hb), abs=1e-6)
    assert cmp["jaccard"] == pytest.approx(len(ha & hb) / len(ha | hb), abs=1e-6)
    assert {(r["layer"], r["head"]) for r in cmp["appeared"]} == hb - ha
    assert {(r["layer"], r["head"]) for r in cmp["disappeared"]} == ha - hb
    assert -1.0 <= cmp["spearman_all_heads"] <= 1.0
    assert "Jaccard" in proc.stdout
    print(proc.stdout)
