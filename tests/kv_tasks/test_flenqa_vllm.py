"""`lm_eval --tasks flenqa,flenqa_cot --model vllm` on SmolLM2 (CPU) over the labelled FLenQA fixture.

The run is the session's `smollm2_vllm_suite` (tests/conftest.py): fixture contexts of 250 and 500 tokens,
one padding type and one dispersion, two instances per size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness_ext.tasklib.flenqa import render_prompt
from harness_ext.tasklib.metrics import flenqa_correct


@pytest.mark.vllm
def test_flenqa_direct_and_cot_on_vllm(smollm2_vllm_suite):
    res = smollm2_vllm_suite
    sizes = tuple(res["_meta"]["flenqa_ctx_sizes"])
    per_size = 2  # the suite's fixture: one true and one false instance per size (a stderr needs two rows)
    for group in ("flenqa", "flenqa_cot"):
        g = res["results"][group]
        assert 0.0 <= g["acc,none"] <= 1.0 and isinstance(g["acc_stderr,none"], float)
        for size in sizes:  # accuracy-vs-length, aggregated over the three tasks
            assert isinstance(g[f"acc_ctx{size},none"], float), g
    for task in ("monorel", "pir", "ruletaker"):
        for cot in (False, True):
            name = f"flenqa_{task}{'_cot' if cot else ''}"
            scores = res["results"][name]
            assert "NON-OFFICIAL DATA: fixture" in scores["alias"]
            # the suite's --gen_kwargs cap (the task's own 400 is asserted in test_general_groups.py)
            assert res["configs"][name]["generation_kwargs"]["max_gen_toks"] == res["_max_gen_toks"]
            for size in sizes:
                assert isinstance(scores[f"acc_ctx{size}_stderr,none"], float), scores  # numeric, not "N/A"
            assert any(k.startswith("acc_pad_") for k in scores) and any(k.startswith("acc_disp_") for k in scores)
            rows = list(Path(res["_dir"]).glob(f"samples_{name}_2*.jsonl"))
            assert len(rows) == 1
            samples = [json.loads(line) for line in rows[0].open()]
            assert sorted(s["doc"]["ctx_size"] for s in samples) == sorted(sizes * per_size)
            for s in samples:
                prompt = s["arguments"]["gen_args_0"]["arg_0"]
                assert render_prompt(s["doc"]) in prompt and prompt.count("<|im_start|>user") == 1
                assert s["acc"] == flenqa_correct(s["resps"][0][0], s["doc"]["label"])
                assert ("step by step" in prompt) == cot
