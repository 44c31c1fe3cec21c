"""MuSiQue and SummHay citation through the real `lm_eval --model vllm` CLI (tiny random Llama, one engine start):
the generated fixtures, prompts exactly at their target lengths in the model's tokens, the three placements
paired, per-length / per-placement / per-hop scores with numeric standard errors, non-official data marked."""

from __future__ import annotations

import json

import pytest
from lm_eval_cli import logged_samples

from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.plugin.runner import vllm_model_args
from harness_ext.tasklib.haystack_fit import key_slots
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture
from harness_ext.tasklib.token_budget import count_tokens

LENGTH = 1024


@pytest.mark.heavy
@pytest.mark.vllm
def test_both_families_through_lm_eval_vllm(lm_eval_run, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    write_musique_fixture(tmp_path / "musique", num_questions=6)
    write_summhay_fixture(tmp_path / "summhay", num_documents=8)
    meta = {
        "musique_mirror": str(tmp_path / "musique"),
        "musique_lengths": [LENGTH],
        "musique_num_questions": 2,
        "summhay_mirror": str(tmp_path / "summhay"),
        "summhay_lengths": [LENGTH],
        "summhay_num_insights": 2,
        "summhay_haystacks": ["news1", "conv1"],
        "allow_unofficial_data": True,
    }
    args = ["--tasks", "musique,summhay_citation", "--model", "vllm"]
    args += ["--model_args", vllm_model_args(tiny_llama_dir, 2048), "--batch_size", "auto"]
    args += ["--gen_kwargs", "max_gen_toks=4", "--metadata", json.dumps(meta), "--log_samples"]
    res = lm_eval_run(args, "qa_vllm")
    tok = load_tokenizer(str(tiny_llama_dir))
    for task, metric in (("musique", "answer_f1"), ("summhay_citation", "citation_f1")):
        scores = res["results"][task]
        assert "NON-OFFICIAL DATA: fixture" in scores["alias"]
        assert res["n-samples"][task]["effective"] == 2 * 3  # 2 samples x 1 length x 3 placements
        for place in ("early", "spread", "late"):
            assert isinstance(scores[f"{metric}_len{LENGTH}_place_{place},none"], float)
            assert isinstance(scores[f"{metric}_place_{place}_stderr,none"], float)  # numeric, not "N/A"
        rows = logged_samples(res["_dir"], task)
        prompts = [r["arguments"]["gen_args_0"]["arg_0"] for r in rows]
        assert prompts == [r["doc"]["prompt"] for r in rows]  # no chat template: the task's prompt itself
        counts = count_tokens(tok, prompts)
        assert counts == [r["doc"]["n_tokens"] for r in rows] and max(counts) <= LENGTH
        assert min(max(counts[i : i + 3]) for i in range(0, len(rows), 3)) >= LENGTH - 24
        by_sample: dict[int, list[dict]] = {}
        for r in rows:
            by_sample.setdefault(r["doc"]["sample"], []).append(r["doc"])
        for docs in by_sample.values():
            assert [d["placement"] for d in docs] == ["early", "spread", "late"]
            assert len({tuple(sorted(x.rstrip("*") for x in d["layout"])) for d in docs}) == 1  # paired
            for d in docs:
                keys = d["supporting_positions"] if task == "musique" else d["gold_positions"]
                n = d["num_paragraphs"] if task == "musique" else d["num_documents"]
                assert keys == [s + 1 for s in key_slots(d["placement"], len(keys), n)]
    assert any(k.startswith("answer_em_hops") for k in res["results"]["musique"])
    assert res["configs"]["musique"]["metadata"]["needles_data_official"] is False
