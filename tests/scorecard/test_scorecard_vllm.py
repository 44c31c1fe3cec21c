"""`needles scorecard` end to end through the real lm_eval CLI and vLLM (CPU) on the tiny random Llama, smallest
budget, and its resume: a second invocation into the same folder starts no engine and rewrites the page.

The NIAH, MDQA and FLenQA data point at an empty mirror, so those families are left out with the reason (as
without network); the KV family needs no data. Measured here: 21 s (one engine start, 8 prompts of 256-512 tokens,
the resume 1-2 s), plus 5 s for the session's tiny-model fixture."""

from __future__ import annotations

import json
import re
import time

import pytest

from harness_ext.cli import main


@pytest.mark.heavy
@pytest.mark.vllm
def test_scorecard_end_to_end_and_resume(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    for env in ("NEEDLES_NIAH_MIRROR", "NEEDLES_MDQA_MIRROR", "NEEDLES_FLENQA_MIRROR"):
        monkeypatch.setenv(env, str(empty))
    out = tmp_path / "card"
    argv = ["scorecard", str(tiny_llama_dir), "--budget", "tiny", "-o", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    err = cap.err
    assert err.index("cost estimate") < err.index("1/6 data") < err.index("2/6 eval_kv: lm_eval run")
    assert "3/6 eval_niah: left out (the data mirror" in err and "6/6 report" in err
    # the engine's progress reaches the terminal while the family runs, not only its log
    assert re.search(r"^  eval_kv: Processed prompts: (\d+)/\1 prompts, [\d:]+ elapsed", err, re.M), err
    card = json.loads((out / "scorecard.json").read_text(encoding="utf-8"))
    assert {f["family"]: f["status"] for f in card["families"]} == {
        "kv": "run", "niah": "left out", "mdqa": "left out", "flenqa": "left out"}  # fmt: skip
    assert all(f["fix"] for f in card["families"] if f["status"] == "left out")
    entries = {e["task"]: e for e in card["effective_length"]}
    assert set(entries) == {"kv_retrieval_simple", "kv_retrieval_multisubkey"}
    assert all(list(e["points"]) == ["256", "512"] and e["rules"][0]["bootstrap"] for e in entries.values())
    assert "kv_retrieval_simple: effective length ruler>85.6" in cap.out
    html = (out / "scorecard.html").read_text(encoding="utf-8")
    assert "kv_retrieval_simple" in html and "lm_eval run --tasks kv_retrieval_simple" in html
    results = sorted((out / "runs").rglob("results_*.json"))
    assert len(results) == 1
    # resume: the finished family run is skipped (no engine), the page is written again from it
    page_time = (out / "scorecard.html").stat().st_mtime_ns
    t = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert "2/6 eval_kv: done before, skipped" in err and "lm_eval run" not in err
    assert sorted((out / "runs").rglob("results_*.json")) == results and elapsed < 20, elapsed
    assert (out / "scorecard.html").stat().st_mtime_ns > page_time
    # another budget into the same folder is refused, naming the marker to delete
    assert main([*argv[:-4], "--budget", "small", "-o", str(out)]) == 2
    assert "finished with another command" in capsys.readouterr().err
