"""MDQA through the real `lm_eval` CLI with the fast hf backend (tiny random Llama): plain prompts without a
chat template, the any-position sweep, the download path end to end, and the length guard."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from lm_eval_cli import hf_args, lm_eval_command, logged_samples
from loopback import FileServer

from harness_ext.tasklib.mdqa import render_prompt
from harness_ext.tasklib.mdqa_fixture import build_fixture

ORACLE = "qa_data/nq-open-oracle.jsonl.gz"


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("mdqa-fixture")
    build_fixture(shared_data / "lost-in-the-middle" / ORACLE, out, settings=(10, 20), num_questions=40, progress=False)
    return out


def test_plain_prompts_and_any_position_sweep(lm_eval_run, tiny_llama_dir, fixture_dir):
    meta = {
        "mdqa_mirror": str(fixture_dir),
        "allow_unofficial_data": True,
        "mdqa_num_documents": 10,
        "mdqa_positions": [1, 3, 10],
        "mdqa_num_questions": 2,
    }
    res = lm_eval_run(
        [
            "--tasks",
            "mdqa20_pos2,mdqa_sweep",
            *hf_args(tiny_llama_dir),
            "--metadata",
            json.dumps(meta),
            "--gen_kwargs",
            "max_gen_toks=4",
            "--log_samples",
        ],
        "mdqa_hf",
    )
    sweep = res["results"]["mdqa_sweep"]
    for p in (1, 3, 10):
        assert isinstance(sweep[f"best_subspan_em_pos{p},none"], float)
        assert isinstance(sweep[f"best_subspan_em_pos{p}_stderr,none"], float)
    assert res["n-samples"]["mdqa_sweep"]["effective"] == 6  # 2 questions x 3 positions
    assert "NON-OFFICIAL DATA: fixture" in sweep["alias"]
    assert res["configs"]["mdqa_sweep"]["metadata"]["needles_positions"] == [1, 3, 10]
    for s in logged_samples(res["_dir"], "mdqa20_pos2"):
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        assert prompt == render_prompt(s["doc"])  # no chat template: the reference prompt itself
        assert prompt.endswith("\nAnswer:") and "<|im_start|>" not in prompt
        gold = s["doc"]["ctxs"][1]
        assert gold["isgold"] and f"\nDocument [2](Title: {gold['title']}) {gold['text']}\n" in prompt
        assert s["arguments"]["gen_args_0"]["arg_1"]["until"] == ["\n"]
    rows = logged_samples(res["_dir"], "mdqa_sweep")
    assert [r["doc"]["gold_position"] for r in rows] == [1, 3, 10, 1, 3, 10]
    assert all(len(r["doc"]["ctxs"]) == 10 for r in rows)


def test_official_data_downloaded_end_to_end(lm_eval_run, tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    server = FileServer({ORACLE: (shared_data / "lost-in-the-middle" / ORACLE).read_bytes()})
    monkeypatch.setenv("NEEDLES_MDQA_BASE_URL", server.url)
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEEDLES_MDQA_MIRROR", raising=False)
    try:
        res = lm_eval_run(
            [
                "--tasks",
                "mdqa_oracle,mdqa_closedbook",
                *hf_args(tiny_llama_dir),
                "--limit",
                "2",
                "--gen_kwargs",
                "max_gen_toks=4",
                "--log_samples",
            ],
            "mdqa_download",
        )
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert server.requests == [f"/{ORACLE}"]  # downloaded once, then read from the cache
    for task in ("mdqa_oracle", "mdqa_closedbook"):
        assert res["results"][task]["alias"] == task  # official data: no marker
        meta = res["configs"][task]["metadata"]
        assert meta["needles_data_official"] is True
        assert meta["needles_data_files"] == {
            ORACLE: "6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e"
        }
        assert isinstance(res["results"][task]["best_subspan_em_stderr,none"], float)
    assert res["configs"]["mdqa_oracle"]["metadata"]["needles_data_origin"] == ["download"]
    questions = [
        [s["doc"]["question"] for s in logged_samples(res["_dir"], t)] for t in ("mdqa_oracle", "mdqa_closedbook")
    ]
    assert questions[0] == questions[1]
    assert all(
        s["arguments"]["gen_args_0"]["arg_0"].startswith("Question: ")
        for s in logged_samples(res["_dir"], "mdqa_closedbook")
    )


def test_length_guard_refuses_twenty_documents_in_a_small_context(tiny_llama_dir, fixture_dir, tmp_path):
    meta = {"mdqa_mirror": str(fixture_dir), "allow_unofficial_data": True}
    cmd = lm_eval_command(
        *("--tasks", "mdqa20_pos1", *hf_args(tiny_llama_dir, 1024), "--limit", "1"),
        *("--metadata", json.dumps(meta), "--output_path", str(tmp_path)),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert proc.returncode != 0
    assert "prompts longer than the model's context" in proc.stderr and "task mdqa20_pos1" in proc.stderr
    assert "max_gen_toks 100" in proc.stderr
