"""kv_retrieval on the real embedded model through real vLLM (CPU): `lm_eval --model vllm` and
`lm_eval --model local-chat-completions` against `vllm serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness_ext.plugin.runner import lm_eval_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_cli_kv_retrieval_group(smollm2_vllm_suite):
    res, meta = smollm2_vllm_suite, smollm2_vllm_suite["_meta"]
    per_task = len(meta["lengths"]) * len(meta["depths"]) * meta["num_samples"]
    for task in ("kv_retrieval_simple", "kv_retrieval_simple_template", "kv_retrieval_multisubkey"):
        scores = res["results"][task]
        assert res["n-samples"][task]["effective"] == per_task
        for metric in ("value_acc", "dict_acc", "both_acc"):
            lengths = [f"_len{n}" for n in meta["lengths"]]
            depths = [f"_depth{d:.2f}" for d in meta["depths"]]
            for suffix in ("", *lengths, *depths, lengths[-1] + depths[-1]):
                assert 0.0 <= scores[f"{metric}{suffix},none"] <= 1.0
                assert isinstance(scores[f"{metric}{suffix}_stderr,none"], float)
    group = res["results"]["kv_retrieval"]
    # plausible for a 135M instruct model on short dictionaries: it answers some, not all
    assert 0.0 < group["value_acc,none"] < 1.0, group
    replies = [
        json.loads(line)["resps"][0][0]
        for f in Path(res["_dir"]).glob("samples_kv_retrieval_simple_template_*.jsonl")
        for line in open(f)
    ]
    assert sum("value of key" in r.lower() for r in replies) >= len(replies) // 2  # template-shaped answers
    assert res["configs"]["kv_retrieval_simple"]["metadata"]["needles_data_sha256"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    cmd = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(smollm2_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.3",
    ]
    with open(log, "w") as out:
        env = lm_eval_env()
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users start it (tests/conftest.py sets it)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not start in 300 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)


def test_local_chat_completions_against_vllm_serve(lm_eval_run, vllm_server, smollm2_dir):
    meta = {"lengths": [400], "depths": [0.0, 1.0], "num_samples": 3}
    res = lm_eval_run(
        [
            "--tasks",
            "kv_retrieval_simple_template",
            "--model",
            "local-chat-completions",
            "--model_args",
            f"model={smollm2_dir},base_url={vllm_server}/v1/chat/completions,num_concurrent=2,"
            f"max_retries=1,tokenizer={smollm2_dir},tokenized_requests=False,max_length=2048",
            "--apply_chat_template",
            "--metadata",
            json.dumps(meta),
            "--log_samples",
        ],
        "chat_api",
    )
    scores = res["results"]["kv_retrieval_simple_template"]
    assert res["n-samples"]["kv_retrieval_simple_template"]["effective"] == 6
    assert isinstance(scores["both_acc_stderr,none"], float)
    replies = [json.loads(line)["resps"][0][0] for f in Path(res["_dir"]).glob("samples_*.jsonl") for line in open(f)]
    assert all(isinstance(r, str) and r for r in replies)
