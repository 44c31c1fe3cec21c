"""`lm_eval --tasks flenqa,flenqa_cot --model vllm` on SmolLM2 (CPU) over the labelled FLenQA fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness_ext.metrics import flenqa_correct
from harness_ext.runner import vllm_model_args
from kv_tasks.flenqa.fixture import write_fixture
from kv_tasks.flenqa.utils import render_prompt

SIZES = (250, 500)
PER_SIZE = 2  # a standard error needs two rows per cell
LIMIT = PER_SIZE * len(SIZES)  # rows interleave ctx sizes: --limit 4 takes two rows of each size per task


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flenqa-fixture")
    write_fixture(out, ctx_sizes=SIZES, instances=4, seed=0)
    return out


@pytest.mark.vllm
def test_flenqa_direct_and_cot_on_vllm(lm_eval_run, smollm2_dir, fixture_dir):
    meta = {"flenqa_mirror": str(fixture_dir), "allow_unofficial_data": True}
    res = lm_eval_run(
        [
            "--tasks",
            "flenqa,flenqa_cot",
            "--model",
            "vllm",
            "--model_args",
            vllm_model_args(smollm2_dir, 2048),
            "--apply_chat_template",
            "--limit",
            str(LIMIT),
            "--metadata",
            json.dumps(meta),
            "--log_samples",
        ],
        "vllm_flenqa",
    )
    for group in ("flenqa", "flenqa_cot"):
        g = res["results"][group]
        assert 0.0 <= g["acc,none"] <= 1.0 and isinstance(g["acc_stderr,none"], float)
        for size in SIZES:  # accuracy-vs-length, aggregated over the three tasks
            assert isinstance(g[f"acc_ctx{size},none"], float), g
    for task in ("monorel", "pir", "ruletaker"):
        for cot in (False, True):
            name = f"flenqa_{task}{'_cot' if cot else ''}"
            scores = res["results"][name]
            assert "NON-OFFICIAL DATA: fixture" in scores["alias"]
            assert res["configs"][name]["generation_kwargs"]["max_gen_toks"] == 400
            for size in SIZES:
                assert isinstance(scores[f"acc_ctx{size}_stderr,none"], float), scores  # numeric, not "N/A"
            assert any(k.startswith("acc_pad_") for k in scores) and any(k.startswith("acc_disp_") for k in scores)
            rows = list(Path(res["_dir"]).glob(f"samples_{name}_2*.jsonl"))
            assert len(rows) == 1
            samples = [json.loads(line) for line in rows[0].open()]
            assert sorted(s["doc"]["ctx_size"] for s in samples) == sorted(SIZES * PER_SIZE)
            for s in samples:
                prompt = s["arguments"]["gen_args_0"]["arg_0"]
                assert render_prompt(s["doc"]) in prompt and prompt.count("<|im_start|>user") == 1
                assert s["acc"] == flenqa_correct(s["resps"][0][0], s["doc"]["label"])
                assert ("step by step" in prompt) == cot
