"""`needles scorecard` end to end through the real lm_eval CLI and vLLM (CPU) on the tiny random Llama, smallest
budget, and its resume: a second invocation into the same folder starts no engine and rewrites the page.

The MDQA and FLenQA data point at an empty mirror, and the NIAH mirror holds only the held-out book part (the loss
family's text), so NIAH, MDQA and FLenQA are left out with the reason (as without network) while the loss family
runs; KV and passkey need no data. Measured here: 103 s on the 2-core machine shared with other jobs, the
tiny-model fixture included (three engine starts: KV 8 prompts, passkey 4, the loss family 2 log-likelihood
requests, all of 256-640 tokens; the resume 1-2 s)."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from harness_ext.cli import main
from harness_ext.tasklib.long_ppl_text import BOOK_PART


@pytest.mark.heavy
@pytest.mark.vllm
def test_scorecard_end_to_end_and_resume(tiny_llama_dir, shared_data, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    book_only = tmp_path / "book-only"  # the loss family's book part, not the NIAH needles and other parts
    (book_only / BOOK_PART).parent.mkdir(parents=True)
    shutil.copy(shared_data / "retrieval-head" / BOOK_PART, book_only / BOOK_PART)
    for env in ("NEEDLES_MDQA_MIRROR", "NEEDLES_FLENQA_MIRROR"):
        monkeypatch.setenv(env, str(empty))
    monkeypatch.setenv("NEEDLES_NIAH_MIRROR", str(book_only))
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))  # the tasks' row caches: lm_eval inherits it
    out = tmp_path / "card"
    argv = ["scorecard", str(tiny_llama_dir), "--budget", "tiny", "-o", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    err = cap.err
    assert err.index("cost estimate") < err.index("1/8 data") < err.index("2/8 eval_kv: lm_eval run")
    assert "  passkey: needles_passkey: 4 prompts" in err  # 1 key x 2 lengths x 2 depths
    assert "  long_ppl: needles_long_ppl: 2 prompts, ~1,024 prompt tokens (log-likelihoods, no chat template)" in err
    assert "3/8 eval_niah: left out (the data mirror" in err and "4/8 eval_passkey: lm_eval run" in err
    assert "7/8 eval_long_ppl: lm_eval run" in err and "8/8 report" in err
    # the engine's progress reaches the terminal while the family runs, not only its log
    assert re.search(r"^  eval_kv: Processed prompts: (\d+)/\1 prompts, [\d:]+ elapsed", err, re.M), err
    card = json.loads((out / "scorecard.json").read_text(encoding="utf-8"))
    families = {f["family"]: f for f in card["families"]}
    assert {k: f["status"] for k, f in families.items()} == {
        "kv": "run", "niah": "left out", "passkey": "run", "mdqa": "left out", "flenqa": "left out",
        "long_ppl": "run"}  # fmt: skip
    assert all(f["fix"] for f in card["families"] if f["status"] == "left out")
    # the loss family is its own lm_eval call on plain text; the others get the chat template
    assert "--apply_chat_template" not in families["long_ppl"]["command"]
    assert "--apply_chat_template" in families["passkey"]["command"]
    entries = {e["task"]: e for e in card["effective_length"]}
    assert set(entries) == {"kv_retrieval_simple", "kv_retrieval_multisubkey", "needles_passkey"}
    assert all(list(e["points"]) == ["256", "512"] and e["rules"][0]["bootstrap"] for e in entries.values())
    assert entries["needles_passkey"]["metric"] == "passkey_acc" and entries["needles_passkey"]["documents"] == 4
    grid = next(g for g in card["grids"] if g["task"] == "needles_passkey")
    assert grid["lengths"] == [256, 512] and grid["depths"] == [0.0, 1.0]
    # the loss curve: one document after 256 and 512 tokens; a random model's NLL is near ln(49152) = 10.8 nats
    (loss,) = card["loss"]
    assert loss["task"] == "needles_long_ppl" and list(loss["points"]) == ["256", "512"]
    assert all(
        5 < p["nll"] < 20 and p["ppl"] == pytest.approx(2.718281828 ** p["nll"]) for p in loss["points"].values()
    )
    assert "kv_retrieval_simple: effective length ruler>85.6" in cap.out and "needles_passkey: effective" in cap.out
    html = (out / "scorecard.html").read_text(encoding="utf-8")
    assert "kv_retrieval_simple" in html and "lm_eval run --tasks kv_retrieval_simple" in html
    assert 'alt="passkey length x depth"' in html and "<h2>Loss by position</h2>" in html
    assert 'alt="continuation loss by context length"' in html and "lm_eval run --tasks needles_long_ppl" in html
    results = sorted((out / "runs").rglob("results_*.json"))
    assert len(results) == 3
    # resume: the finished family runs are skipped (no engine), the page is written again from them
    page_time = (out / "scorecard.html").stat().st_mtime_ns
    t = time.perf_counter()
    assert main(argv) == 0
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert "2/8 eval_kv: done before, skipped" in err and "7/8 eval_long_ppl: done before, skipped" in err
    assert "lm_eval run" not in err
    assert sorted((out / "runs").rglob("results_*.json")) == results and elapsed < 20, elapsed
    assert (out / "scorecard.html").stat().st_mtime_ns > page_time
    # another budget into the same folder is refused, naming the marker to delete
    assert main([*argv[:-4], "--budget", "small", "-o", str(out)]) == 2
    assert "finished with another command" in capsys.readouterr().err
