"""The kv_retrieval tasks through the real lm_eval CLI and Python API (hf backend, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from lm_eval_cli import hf_args, hf_task_args, lm_eval_command, logged_samples

import harness_ext.tasklib.kv
from kv_tasks.kv_retrieval import utils as kv_utils

SMALL = {"lengths": [300], "depths": [0.0, 1.0], "num_samples": 2}
SUBTASKS = ("kv_retrieval_simple", "kv_retrieval_simple_template", "kv_retrieval_multisubkey")


def _assert_scores(res: dict, task: str, breakdown: tuple[str, ...]) -> None:
    scores = res["results"][task]
    for metric in ("value_acc", "dict_acc", "both_acc"):
        for suffix in ("", *breakdown):
            value = scores[f"{metric}{suffix},none"]
            err = scores[f"{metric}{suffix}_stderr,none"]
            assert 0.0 <= value <= 1.0
            assert isinstance(err, float), (task, metric, suffix, err)  # numeric, not "N/A"


def test_hf_cli_without_chat_template(lm_eval_run, tiny_llama_dir):
    res = lm_eval_run(hf_task_args("kv_retrieval", tiny_llama_dir, SMALL), "hf_plain")
    for task in SUBTASKS:
        _assert_scores(res, task, ("_len300", "_depth0.00", "_depth1.00", "_len300_depth0.00"))
        assert res["n-samples"][task]["effective"] == 4  # 2 samples x 2 depths
        assert len(res["configs"][task]["metadata"]["needles_data_sha256"]) == 64
    assert isinstance(res["results"]["kv_retrieval"]["both_acc_stderr,none"], float)
    samples = logged_samples(res["_dir"], "kv_retrieval_simple")
    assert len(samples) == 4 and all(s["doc"]["n_tokens"] <= 300 for s in samples)
    assert not samples[0]["arguments"]["gen_args_0"]["arg_0"].startswith("<|im_start|>")


def test_length_guard_refuses_before_generation(tmp_path, tiny_llama_dir):
    meta = {"lengths": [1000], "depths": [0.5], "num_samples": 2}
    args = ("--tasks", "kv_retrieval_simple", *hf_args(tiny_llama_dir, 512), "--metadata", json.dumps(meta))
    cmd = lm_eval_command(*args, "--output_path", str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode != 0
    assert "needles: error: prompts longer than the model's context" in proc.stderr
    assert "task kv_retrieval_simple: 2 prompt(s) do not fit" in proc.stderr
    assert "> model limit 512" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results_*.json"))


def test_python_api_with_chat_template(tiny_llama_dir):
    import lm_eval

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_llama_dir},dtype=float32,max_length=1024",
        tasks=["kv_retrieval"],
        metadata={**SMALL, "pretrained": str(tiny_llama_dir)},
        apply_chat_template=True,
        device="cpu",
        gen_kwargs="max_gen_toks=8",
        limit=2,
    )
    assert set(SUBTASKS) <= set(res["results"])
    assert isinstance(res["results"]["kv_retrieval"]["value_acc_stderr,none"], float)


def test_dataset_cache_second_call_does_not_regenerate(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path))
    meta = {**SMALL, "pretrained": str(smollm2_dir), "version": 1.0}
    first = kv_utils.simple(**meta)

    def boom(self):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(harness_ext.tasklib.kv.KVGenerator, "generate", boom)
    second = kv_utils.simple(**meta)
    assert first["test"].to_list() == second["test"].to_list()
    assert first.needles_info == second.needles_info
    with pytest.raises(AssertionError, match="regenerated"):
        kv_utils.simple(**{**meta, "seed": 7})  # other parameters -> other cache entry
