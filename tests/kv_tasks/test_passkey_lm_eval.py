"""needles_passkey through the real lm_eval CLI (hf backend, tiny random Llama with SmolLM2's tokenizer), and the
length guard on its prompts."""

from __future__ import annotations

import pytest
from lm_eval_cli import hf_task_args, logged_samples

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.leaderboard import collect_rows
from harness_ext.reporting.length_curves import curves
from harness_ext.reporting.plots import kv_cells
from harness_ext.tasklib.breakdowns import PASSKEY_METRIC, PASSKEY_TASK
from harness_ext.tasklib.passkey import passkey_dataset, passkey_match, plain_prompt

SMALL = {"passkey_lengths": [256], "passkey_depths": [0.0, 1.0], "passkey_num_samples": 2}
CELLS = ("", "_len256", "_depth0.00", "_depth1.00", "_len256_depth0.00", "_len256_depth1.00")


def test_passkey_via_cli(lm_eval_run, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cli-cache"))  # lm_eval inherits the environment
    res = lm_eval_run(hf_task_args("needles_passkey", tiny_llama_dir, SMALL), "hf_passkey")
    scores = res["results"]["needles_passkey"]
    for suffix in CELLS:
        assert 0.0 <= scores[f"passkey_acc{suffix},none"] <= 1.0
        assert isinstance(scores[f"passkey_acc{suffix}_stderr,none"], float), suffix  # not "N/A"
    assert res["n-samples"]["needles_passkey"]["effective"] == 4  # 2 keys x 2 depths
    info = res["configs"]["needles_passkey"]["metadata"]
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "own-cache"))  # rebuilt here, not read back
    expected = passkey_dataset("needles_passkey", {**SMALL, "pretrained": str(tiny_llama_dir)})
    assert info["needles_data_sha256"] == expected.needles_info["needles_data_sha256"]

    samples = logged_samples(res["_dir"], "needles_passkey")
    assert len(samples) == 4
    for s in samples:
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("There is an important info hidden inside a lot of irrelevant text.")
        # no chat template: the user turn, a space, the cue (gen_prefix); the exact length is of this text
        assert prompt == plain_prompt(s["doc"]) and prompt.endswith("\nWhat is the pass key? The pass key is")
        assert s["doc"]["n_tokens"] <= 256
        assert s["target"] == s["doc"]["passkey"] and f"The pass key is {s['target']}." in prompt
        assert s["passkey_acc"] == passkey_match(s["target"], s["filtered_resps"][0])

    # reporting: the length x depth grid is drawn and the score-by-length curve reads passkey_acc
    rows = collect_rows([res["_dir"]])
    grid = kv_cells(rows, PASSKEY_METRIC, task=PASSKEY_TASK)
    assert grid == {
        (tiny_llama_dir.name, "needles_passkey"): {
            (256, d): scores[f"passkey_acc_len256_depth{d:.2f},none"] for d in (0.0, 1.0)
        }
    }
    assert [(c.task, c.metric, c.points) for c in curves(rows)] == [
        ("needles_passkey", PASSKEY_METRIC, {256: scores["passkey_acc_len256,none"]})
    ]
    png = tmp_path / "passkey.png"
    assert main(["plot", "passkey", res["_dir"], "-o", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_length_guard_refuses_a_passkey_prompt_past_max_length(tiny_llama_dir, tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path))
    rows = passkey_dataset("needles_passkey", {**SMALL, "pretrained": str(tiny_llama_dir)})["test"].to_list()
    lm = HFLM(pretrained=str(tiny_llama_dir), dtype="float32", max_length=200, device="cpu")
    requests = [
        Instance("generate_until", r, (plain_prompt(r), {"max_gen_toks": 16}), i, ("needles_passkey", i, 1))
        for i, r in enumerate(rows)
    ]
    with pytest.raises(NeedlesError, match=r"task needles_passkey: 4 prompt\(s\) do not fit; longest 256 tokens"):
        lm.generate_until(requests)
