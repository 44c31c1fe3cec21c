"""The niah group through the real lm_eval CLI (hf backend, tiny random Llama with SmolLM2's tokenizer)."""

from __future__ import annotations

import shutil

from lm_eval_cli import hf_task_args, logged_samples

from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
from harness_ext.tasklib.niah import niah_dataset

SMALL = {"niah_lengths": [300], "niah_depths": [0.0, 1.0], "niah_num_samples": 2}
CELLS = ("", "_len300", "_depth0.00", "_depth1.00", "_len300_depth0.00", "_len300_depth1.00")


def test_niah_group_via_cli(lm_eval_run, tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    for rel in RETRIEVAL_HEAD.files:
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        src = shared_data / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        shutil.copyfile(src, mirror / rel)
    meta = {**SMALL, "niah_mirror": str(mirror)}
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cli-cache"))  # lm_eval inherits the environment
    res = lm_eval_run(hf_task_args("niah", tiny_llama_dir, meta), "hf_niah")
    scores = res["results"]["niah_single"]
    for metric in ("niah_success", "rouge1_recall"):
        for suffix in CELLS:
            assert 0.0 <= scores[f"{metric}{suffix},none"] <= 1.0
            assert isinstance(scores[f"{metric}{suffix}_stderr,none"], float), (metric, suffix)  # not "N/A"
        assert isinstance(res["results"]["niah"][f"{metric}_stderr,none"], float)
    assert res["n-samples"]["niah_single"]["effective"] == 4  # 2 samples x 2 depths

    info = res["configs"]["niah_single"]["metadata"]
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "own-cache"))  # rebuilt here, not read back
    expected = niah_dataset("niah_single", {**meta, "pretrained": str(tiny_llama_dir), "niah_seed": 0})
    assert info["needles_data_sha256"] == expected.needles_info["needles_data_sha256"]
    assert info["needles_data_files"] == {rel: e.sha256 for rel, e in RETRIEVAL_HEAD.files.items()}
    assert info["needles_data_official"] is True and info["needles_niah_haystack"] == "text"
    assert info["needles_data_cache"].startswith(str(tmp_path / "cli-cache"))

    samples = logged_samples(res["_dir"], "niah_single")
    assert len(samples) == 4
    for s in samples:
        assert s["doc"]["n_tokens"] <= 300 and s["target"] == s["doc"]["real_needle"]
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("<book>") and prompt.endswith(
            "Based on the content of the book, Question: " + s["doc"]["question"] + "\nAnswer:"
        )
