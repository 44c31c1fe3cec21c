"""Effective length on real lm-eval outputs: the session's `smollm2_vllm_suite` run (tests/conftest.py; SmolLM2
through `lm_eval --model vllm --log_samples`, KV at its SUITE_KV lengths, FLenQA fixture at 250 and 500).
No engine of its own: it reads what that run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from harness_ext.cli import main
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.effective_length import default_rules, effective_length


def test_effective_length_of_the_real_suite_run(smollm2_vllm_suite, tmp_path, capsys):
    res = smollm2_vllm_suite
    run_dir = Path(res["_dir"])
    rows = lb.collect_rows([res["_path"]], rules=default_rules())
    el = {(r["task"], r["filter"]): r for r in rows if r["metric"] == "effective_length"}
    for task in ("kv_retrieval_simple", "kv_retrieval_simple_template", "kv_retrieval_multisubkey", "kv_retrieval"):
        for rule in default_rules():
            row = el[(task, rule.label)]
            assert "bootstrap over documents" in row["note"], row["note"]  # the sample logs were found
        if task != "kv_retrieval":
            scores = res["results"][task]
            points = {n: scores[f"both_acc_len{n},none"] for n in res["_meta"]["lengths"]}
            ours = effective_length(points, default_rules()[0])
            assert el[(task, "ruler>85.6")]["note"].startswith(ours.display() + " | ")
            assert el[(task, "ruler>85.6")]["n"] == str(res["n-samples"][task]["effective"])
    assert ("flenqa_pir", "ruler>85.6") in el and "acc at lengths 250, 500" in el[("flenqa_pir", "ruler>85.6")]["note"]
    assert main(["results", "--effective-length", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "kv_retrieval (3 tasks)" in out and "relative>0.9x" in out
    report = tmp_path / "gate.json"
    argv = [
        "gate",
        "--effective-length",
        "--baseline",
        res["_path"],
        "--candidate",
        res["_path"],
        "--report",
        str(report),
    ]
    assert main(argv) == 0
    checks = json.loads(report.read_text())["effective_length"]
    assert checks and all(c["verdict"] == "held" and c["baseline"] == c["candidate"] for c in checks)
    png = tmp_path / "length.png"
    assert main(["plot", "length", str(run_dir), "-o", str(png)]) == 0 and png.stat().st_size > 10_000
