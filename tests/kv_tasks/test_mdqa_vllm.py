"""`lm_eval --model vllm` on SmolLM2 (CPU) over the labelled fixture mirror, chat template on: tasks of the mdqa20
group (gold first and last of 20 documents, closed-book, oracle).

The run is the session's `smollm2_vllm_suite` (tests/conftest.py): 20-document fixture built from the real
oracle file, `mdqa_num_questions` 2 (the same 2 questions in every task). The group's membership (all six
positions) is tests/kv_tasks/test_general_groups.py; every position is the same task code.
"""

from __future__ import annotations

import pytest
from lm_eval_cli import logged_samples

from harness_ext.tasklib.mdqa import render_prompt


@pytest.mark.vllm
def test_mdqa20_on_vllm(smollm2_vllm_suite):
    res = smollm2_vllm_suite
    num_questions, tasks = res["_meta"]["mdqa_num_questions"], res["_mdqa_tasks"]
    assert {"mdqa20_pos1", "mdqa20_pos20", "mdqa_closedbook", "mdqa_oracle"} <= set(tasks) <= set(res["results"])
    questions = None
    for task in tasks:
        scores = res["results"][task]
        assert 0.0 <= scores["best_subspan_em,none"] <= 1.0
        assert isinstance(scores["best_subspan_em_stderr,none"], float), scores  # numeric, not "N/A"
        assert "NON-OFFICIAL DATA: fixture" in scores["alias"]  # the fixture is marked in the table...
        assert res["configs"][task]["metadata"]["needles_data_official"] is False  # ...and in the metadata
        rows = logged_samples(res["_dir"], task)
        assert len(rows) == num_questions
        # paired design: the same questions, in the same order, in every task
        order = [r["doc"]["question"] for r in sorted(rows, key=lambda r: r["doc_id"])]
        questions = questions or order
        assert order == questions, task
        for r in rows:
            prompt, doc = r["arguments"]["gen_args_0"]["arg_0"], r["doc"]
            assert "<|im_start|>user" in prompt and render_prompt(doc) in prompt  # chat template around our prompt
            reply = r["filtered_resps"][0]
            assert "\n" not in reply  # generation stopped at the first newline
            if task.startswith("mdqa20_pos"):
                p = int(task.removeprefix("mdqa20_pos"))
                gold = doc["ctxs"][p - 1]
                assert doc["gold_position"] == p and gold["isgold"] and sum(c["isgold"] for c in doc["ctxs"]) == 1
                assert f"Document [{p}](Title: {gold['title']}) {gold['text']}" in prompt
                assert prompt.count("Document [") == 20
            elif task == "mdqa_oracle":
                assert prompt.count("Document [") == 1 and doc["ctxs"][0]["isgold"]
            else:
                assert "Document [" not in prompt
