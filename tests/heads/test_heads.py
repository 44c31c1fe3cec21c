"""Retrieval heads: mechanics on the tiny random Llama and on real data, no slow model.

The SmolLM2 measurements (real retrieval heads, knockout, LoRA compare) are in test_heads_smollm2.py.
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

from harness_ext.core.errors import NeedlesError
from harness_ext.core.stats import spearman_rho
from harness_ext.heads import compare as heads_compare
from harness_ext.heads import detect as heads
from harness_ext.heads import knockout as heads_knockout
from harness_ext.heads import probes as heads_probes
from harness_ext.heads import scorefile
from harness_ext.heads.model import load_model
from harness_ext.heads.prompts import Probe, encode
from harness_ext.heads.scores import retrieval_heads

REPO = Path(__file__).resolve().parents[2]


def _needles(shared_data: Path) -> list[dict]:
    return heads_probes.load_needles(shared_data / "retrieval-head" / "needles.jsonl")


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "harness_ext.cli", "heads", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"needles heads {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def eager_tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()


# ------------------------------------------------------------------------------ instrumentation
def test_recorded_argmax_is_the_eager_attention_argmax(tiny, eager_tiny):
    """The recorder sees what transformers' own eager attention (output_attentions) attends to most."""
    torch.manual_seed(1)
    ids = torch.randint(100, 5000, (1, 40))
    with torch.inference_mode():
        past = tiny.model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        with tiny.ctl.record():
            out = tiny.model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
        ours = tiny.ctl.argmax_matrix()[0]
        ref = eager_tiny(input_ids=ids, output_attentions=True)
    expected = torch.stack([a[0, :, -1, :].argmax(-1) for a in ref.attentions])  # (layers, heads)
    assert torch.equal(ours, expected)
    # Recording does not change the model's function.
    assert torch.allclose(out.logits[0, -1], ref.logits[0, -1], atol=1e-4)


def test_knockout_makes_a_head_attend_uniformly_and_leaves_others_alone(tiny):
    """A knocked-out head outputs the mean of the values it can see (pads excluded); other heads are unchanged."""
    attn = tiny.ctl.modules[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o.detach())),
        attn.o_proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("o_in", i[0].detach())),
    ]
    try:
        torch.manual_seed(2)
        ids = torch.randint(100, 5000, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # left padding in row 1, as the batched knockout eval uses
        with torch.inference_mode():
            tiny.model(input_ids=ids, attention_mask=mask)
            plain = seen["o_in"].clone()
            with tiny.ctl.knocked_out([(0, 1)]):
                tiny.model(input_ids=ids, attention_mask=mask)
            knocked = seen["o_in"]
    finally:
        for h in hooks:
            h.remove()
    hd = attn.head_dim
    kv_head = 1 // attn.num_key_value_groups
    v = seen["v"].view(2, 12, -1, hd)[:, :, kv_head]
    real = mask.bool()  # pad rows' outputs are never used; compare the real positions
    assert torch.allclose(knocked[..., :hd][real], plain[..., :hd][real], atol=1e-5)  # head 0 untouched
    for row, first in ((0, 0), (1, 5)):
        for t in range(first, 12):
            uniform = v[row, first : t + 1].mean(dim=0)
            assert torch.allclose(knocked[row, t, hd : 2 * hd], uniform, atol=1e-5)
    assert not torch.allclose(knocked[0, 5:, hd:], plain[0, 5:, hd:], atol=1e-4)


def test_copy_paste_criterion():
    context = torch.tensor([5, 7, 9, 7, 3, 11])
    argmax = torch.tensor([[1, 3, 0], [2, 5, 4]])  # (layers, heads) most-attended positions
    span = (1, 4)  # needle tokens 7 9 7
    got = heads.copy_hits(argmax, span, context, token=7)
    # (0,0) pos 1 holds 7 in span; (0,1) pos 3 holds 7 in span; (0,2) pos 0 outside; (1,0) holds 9; others outside.
    assert got.tolist() == [[True, True, False], [False, False, False]]
    assert heads.copy_hits(argmax, span, context, token=9).tolist() == [[False, False, False], [True, False, False]]


def _result(family: str, retrieved: bool, hits: np.ndarray, needle_tokens: int = 4) -> heads.ProbeResult:
    probe = Probe(f"{family}/x", family, "text", (0, 4), "answer")
    return heads.ProbeResult(probe, 100, needle_tokens, "reply", retrieved, float(retrieved), hits)


def test_scores_average_only_retrieved_probes_normalised_by_needle_length():
    a = np.array([[4, 0], [2, 0]])
    b = np.array([[0, 0], [4, 4]])
    missed = np.array([[8, 8], [8, 8]])
    scores, n = heads.aggregate(
        [_result("niah", True, a), _result("kv", True, b, 2), _result("niah", False, missed)], 2, 2
    )
    assert n == 2
    assert np.allclose(scores, [[0.5, 0.0], [1.25, 1.0]])  # (a/4 + b/2) / 2; the missed probe is ignored
    assert retrieval_heads(scores, 0.6) == [
        {"layer": 1, "head": 0, "score": 1.25},
        {"layer": 1, "head": 1, "score": 1.0},
    ]
    assert heads.aggregate([_result("niah", False, missed)], 2, 2)[1] == 0


# ------------------------------------------------------------------------------ probes
def test_niah_probe_places_the_needle_at_depth_within_the_length(tiny, shared_data):
    tok, needles = tiny.tokenizer, _needles(shared_data)
    probes = heads_probes.niah_probes(tok, needles[:1], [256, 512], [0.0, 0.5, 1.0], chat=True)
    for p in probes:
        assert p.text[p.needle[0] : p.needle[1]] == needles[0]["needle"]
        ids, span = encode(tok, p, chat=True)
        assert len(ids) <= p.meta["length"] and len(ids) > 0.8 * p.meta["length"]
        assert tok.decode(ids[span[0] : span[1]]).strip() == needles[0]["needle"]
        # Share of the haystack (book minus needle) that comes before the needle.
        book = p.text.index("<book>") + len("<book>"), p.text.index("</book>")
        rel = (p.needle[0] - book[0]) / (book[1] - book[0] - len(needles[0]["needle"]))
        assert abs(rel - p.meta["depth"]) < 0.1
    again = heads_probes.niah_probes(tok, needles[:1], [256, 512], [0.0, 0.5, 1.0], chat=True)
    assert [p.text for p in again] == [p.text for p in probes]
    other = heads_probes.niah_probe(tok, needles[0], 256, 0.5, chat=True, seed=1)
    assert other.text != probes[1].text


def test_kv_probe_needle_is_the_gold_value_in_the_gold_dictionary(tiny):
    docs = heads_probes.kv_docs(tiny.tokenizer, [256], [0.0, 1.0], num_samples=3, seed=5)
    for d, p in zip(docs, heads_probes.kv_probes(tiny.tokenizer, docs, chat=True)):
        assert p.text[p.needle[0] : p.needle[1]] == d["gold_value"]
        line_start = p.text.rfind("\n", 0, p.needle[0]) + 1
        assert p.text[line_start:].startswith(f"Dictionary [{d['gold_dict']}] ")
        ids, span = encode(tiny.tokenizer, p, chat=True)
        assert tiny.tokenizer.decode(ids[span[0] : span[1]]).strip() == d["gold_value"]
        assert heads_probes.success(p, f"The value of key {d['gold_key']} is {d['gold_value']}.") == 1.0
        assert heads_probes.success(p, f"The value of key {d['gold_key']} is 1.") == 0.0


@pytest.fixture(scope="module")
def mdqa_meta(shared_data, tmp_path_factory) -> dict:
    """MDQA in the official format from the real oracle file (the 10-document files are not shipped offline)."""
    from harness_ext.tasklib.mdqa_fixture import build_fixture

    mirror = tmp_path_factory.mktemp("mdqa-mirror")
    oracle = shared_data / "lost-in-the-middle" / "qa_data" / "nq-open-oracle.jsonl.gz"
    build_fixture(oracle, mirror, settings=(10,), num_questions=40, progress=False)
    return {
        "mdqa_mirror": str(mirror),
        "allow_unofficial_data": True,
        "mdqa_num_documents": 10,
        "mdqa_positions": [1, 10],
        "mdqa_num_questions": 3,
    }


def test_mdqa_adapter_uses_the_answer_span_of_the_gold_document(tiny, mdqa_meta):
    docs = heads_probes.mdqa_docs(mdqa_meta)
    probes = heads_probes.mdqa_probes(tiny.tokenizer, docs, chat=True)
    assert len(probes) == 6 and {p.meta["gold_position"] for p in probes} == {1, 10}
    for d, p in zip(docs, probes):
        gold = next(c for c in d["ctxs"] if c["isgold"])
        needle = p.text[p.needle[0] : p.needle[1]]
        if p.meta["needle_is_answer"]:
            assert any(needle.lower() == a.lower() for a in d["answers"])
        assert needle in gold["text"]
        # The span sits inside the gold document's line, which is the one at the gold position.
        line_start = p.text.rfind("\n", 0, p.needle[0]) + 1
        assert p.text[line_start:].startswith(f"Document [{d['gold_position']}](Title: {gold['title']})")
        assert heads_probes.success(p, f"{d['answers'][0]}\nmore") == 1.0
    assert any(p.meta["needle_is_answer"] for p in probes)


# ------------------------------------------------------------------------------ knockout + compare helpers
def test_random_heads_are_outside_the_top_set_and_reproducible():
    scores = np.zeros((6, 4))
    scores[2, 1], scores[3, 3], scores[5, 0] = 0.9, 0.5, 0.3
    top = heads_knockout.select_heads(scores, heads_knockout.parse_knockout("top:2"))
    assert top == [(2, 1), (3, 3)]
    spec = heads_knockout.parse_knockout("random:2")
    draws = [heads_knockout.select_heads(scores, spec, d, seed=0) for d in range(5)]
    assert all(len(d) == 2 and not set(d) & set(top) for d in draws)
    assert draws == [heads_knockout.select_heads(scores, spec, d, seed=0) for d in range(5)]
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(NeedlesError):
        heads_knockout.parse_knockout("best:3")


def test_niah_eval_scores_the_first_line_by_rouge(tiny, shared_data):
    needle = _needles(shared_data)[1]
    probe = heads_probes.niah_probe(tiny.tokenizer, needle, 256, 0.5, chat=True, seed=3)
    ev = heads_knockout.niah_eval_set([probe])
    assert ev.scorers[0](needle["real_needle"] + ".") == 1.0
    assert ev.scorers[0]("I do not know.\n" + needle["real_needle"]) == 0.0
    assert ev.texts == [probe.text] and len(ev.data_sha256) == 64


def _report(scores: np.ndarray, threshold: float = 0.1) -> dict:
    return {
        "schema": scorefile.SCHEMA,
        "scores": scores.tolist(),
        "threshold": threshold,
        "model": {"model": "m"},
        "retrieval_heads": retrieval_heads(scores, threshold),
    }


def _scores(scores: np.ndarray, threshold: float = 0.1) -> scorefile.HeadScores:
    return scorefile.from_report(_report(scores, threshold))


def test_compare_overlap_and_rank_correlation():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.random((5, 4)) * 0.05
    b = a + rng.random((5, 4)) * 0.02
    a[0, 0], a[1, 1], a[2, 2] = 0.5, 0.4, 0.2  # A: {(0,0), (1,1), (2,2)}
    b[0, 0], b[1, 1], b[3, 3] = 0.6, 0.05, 0.3  # B: {(0,0), (3,3)}
    c = heads_compare.compare(_scores(a), _scores(b))
    assert (c["num_heads_a"], c["num_heads_b"], c["num_shared"]) == (3, 2, 1)
    assert c["recall_b_in_a"] == 0.5 and c["jaccard"] == 0.25
    assert c["spearman_all_heads"] == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-6)
    assert [(r["layer"], r["head"]) for r in c["appeared"]] == [(3, 3)]
    assert [(r["layer"], r["head"]) for r in c["disappeared"]] == [(1, 1), (2, 2)]  # largest drop first
    ties = np.array([0.0, 0.0, 1.0, 2.0, 2.0])
    assert spearman_rho(ties, np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(
        spearmanr(ties, [1, 2, 3, 4, 5]).statistic
    )
    with pytest.raises(NeedlesError):
        heads_compare.compare(_scores(a), _scores(np.zeros((2, 2))))


# ------------------------------------------------------------------------------ CLI end to end (tiny model)
@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_cli_is_deterministic_and_writes_scores_heatmap_and_list(tiny_llama_dir, shared_data, mdqa_meta, tmp_path):
    mdqa = json.dumps(dict(mdqa_meta, mdqa_positions=[5], mdqa_num_questions=1))
    args = [
        "--probes",
        "niah",
        "kv",
        "mdqa",
        "--mdqa-metadata",
        mdqa,
        "--model",
        str(tiny_llama_dir),
        "--lengths",
        "128",
        "--depths",
        "0",
        "1",
        "--kv-lengths",
        "128",
        "--kv-samples",
        "1",
        "--kv-depths",
        "0.5",
        "--quiet",
    ]
    _cli(*args, "-o", str(tmp_path / "r1"))
    _cli(*args, "-o", str(tmp_path / "r2"))
    for name in ("heads.json", "heads.png", "retrieval_heads.txt"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name
    rep = json.loads((tmp_path / "r1" / "heads.json").read_text())
    assert rep["schema"] == scorefile.SCHEMA and (rep["num_layers"], rep["num_heads"]) == (2, 2)
    assert np.asarray(rep["scores"]).shape == (2, 2)
    assert rep["num_probes"] == 8 and {p["family"] for p in rep["probes"]} == {"niah", "kv", "mdqa"}
    assert set(rep["families"]) == {"niah", "kv", "mdqa"} and rep["settings"]["mdqa"]["mdqa_positions"] == [5]
    assert rep["settings"]["niah"]["lengths"] == [128] and rep["model"]["chat_template"] is True
    assert rep["num_retrieved"] == sum(p["retrieved"] for p in rep["probes"])
    assert (tmp_path / "r1" / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --probe-batch decodes several probes per forward pass: the same replies and copy-paste counts here
    _cli(*args, "--probe-batch", "3", "-o", str(tmp_path / "batched"))
    batched = json.loads((tmp_path / "batched" / "heads.json").read_text())
    assert batched["settings"]["probe_batch"] == 3 and rep["settings"]["probe_batch"] == 1
    assert [p["response"] for p in batched["probes"]] == [p["response"] for p in rep["probes"]]
    assert batched["scores"] == rep["scores"]

    out = _cli(
        "compare",
        str(tmp_path / "r1" / "heads.json"),
        str(tmp_path / "r2" / "heads.json"),
        "-o",
        str(tmp_path / "cmp.json"),
    )
    assert "Jaccard" in out.stdout
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["appeared"] == [] and cmp["disappeared"] == []


@pytest.mark.heavy  # runs lm-eval or a model in a subprocess
def test_cli_knockout_on_saved_scores(tiny_llama_dir, tmp_path):
    scores = np.array([[0.9, 0.0], [0.0, 0.3]])
    report = _report(scores) | {"num_layers": 2, "num_heads": 2}
    scorefile.write_json(tmp_path / "s.json", report)
    _cli(
        "--model",
        str(tiny_llama_dir),
        "--scores",
        str(tmp_path / "s.json"),
        "--knockout",
        "top:1",
        "--knockout",
        "random:1",
        "--draws",
        "2",
        "--eval-lengths",
        "128",
        "--eval-depths",
        "0",
        "--eval-samples",
        "3",
        "--eval-max-new-tokens",
        "4",
        "-o",
        str(tmp_path),
        "--quiet",
    )
    ko = json.loads((tmp_path / "knockout.json").read_text())
    assert ko["num_items"] == 3 and ko["task"] == "kv_retrieval_simple" and ko["metric"] == "value_acc"
    top, rnd = ko["conditions"]
    assert top["runs"][0]["heads"] == [[0, 0]] and top["draws"] == 1
    assert rnd["draws"] == 2 and all(r["heads"][0] != [0, 0] for r in rnd["runs"])
    assert ko["top_vs_random"][0]["k"] == 1 and ko["scores_format"] == "needles"
    for c in ko["conditions"]:  # the bootstrap interval of the paired delta brackets the observed delta
        assert c["delta_ci95"][0] <= c["delta"] <= c["delta_ci95"][1]
    t = ko["top_vs_random"][0]
    assert t["ci95"][0] <= t["delta_top_minus_random"] <= t["ci95"][1]
    bad = _cli("--model", str(tiny_llama_dir), "--scores", str(tmp_path / "s.json"), "--knockout", "top:x", check=False)
    assert bad.returncode == 2 and "top:K or random:K" in bad.stderr
