"""`needles experiment` with a context extension, end to end on the tiny random Llama cut to a 512-token native
window and extended to 1024 with YaRN: the real lm_eval + vLLM (CPU) scores three variants (base inside its
window, training-free with the override, the merged finetuned model; one engine start each), peft trains 2 LoRA
steps on 700-token documents in between, and the comparison puts them side by side by length with each variant's
effective length. A random model's scores mean nothing; the test asserts what each variant was served with, which
documents each scored, how they were paired, and that a rerun redoes nothing.

CI budget: KV at 300 tokens (inside the window) and 800 (past it) x 3 documents, 8 generated tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import with_native_window

from harness_ext.cli import main

NATIVE, TARGET = 512, 1024


@pytest.fixture(scope="module")
def small(tiny_llama_dir, tmp_path_factory) -> Path:
    return with_native_window(tiny_llama_dir, tmp_path_factory.mktemp("ext-exp") / "small", NATIVE)


@pytest.mark.heavy
@pytest.mark.vllm
def test_extension_experiment_scores_three_variants_by_length(small, tmp_path, capsys):
    cfg = {
        "name": "ext",
        "model": str(small),
        "gen_kwargs": "max_gen_toks=8",
        "finetune": {
            "context": {"length": TARGET, "rope": {"type": "yarn"}},
            "data": {"lengths": [700], "num_samples": 4},
        },
        "metadata": {"lengths": [300, 800], "depths": [0.5], "num_samples": 3},
        "suite": [
            {"task": "kv_retrieval_simple", "role": "target", "metric": "value_acc"},
            {"task": "kv_retrieval_simple", "role": "guard", "metric": "value_acc", "margin": 0.5, "label": "kv_in"},
        ],
    }
    cfg["finetune"].update(
        {"batch_size": 2, "max_steps": 2, "learning_rate": 5e-3, "lora_r": 8, "lora_alpha": 16, "merge": True}
    )
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    # a random model is at floor on the guard: the pilot check would stop it (tests/experiment/test_pilot.py)
    argv = ["experiment", str(tmp_path / "ext.yaml"), "-o", str(out), "--skip-pilot-check"]
    code = main(argv)
    cap = capsys.readouterr()
    assert code in (0, 1), cap.err
    assert "cost estimate: context extension 512 -> 1024" in cap.err and "8/8 report" in cap.err
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["kind"] == "context_extension" and code == (0 if comparison["claim_holds"] else 1)
    assert (comparison["native_window"], comparison["target_window"]) == (NATIVE, TARGET)

    # what each variant was served with, as lm_eval recorded it
    served = {}
    for v in ("base", "training_free", "finetuned"):
        res = json.loads(Path(comparison["results"][v]["chat"]).read_text())
        served[v] = res["config"]["model_args"]
    assert int(served["base"]["max_model_len"]) == NATIVE and "hf_overrides" not in served["base"]
    assert served["training_free"]["hf_overrides"] == comparison["hf_overrides"]
    assert (
        served["training_free"]["pretrained"] == str(small) and int(served["training_free"]["max_model_len"]) == TARGET
    )
    merged = json.loads((out / "finetune" / "merged" / "config.json").read_text())
    assert served["finetuned"]["pretrained"] == str(out / "finetune" / "merged")
    assert merged["rope_parameters"] == comparison["rope_parameters"] and merged["max_position_embeddings"] == TARGET

    # score by length: the base only inside its window, the extended variants at both lengths, 3 documents each
    (table,) = [t for t in comparison["by_length"] if t["task"] == "kv_retrieval_simple"]
    rows = {r["length"]: r for r in table["rows"]}
    assert set(rows) == {300, 800} and not rows[300]["past_native_window"] and rows[800]["past_native_window"]
    assert [rows[300][v]["n"] for v in ("base", "training_free", "finetuned")] == [3, 3, 3]
    assert "base" not in rows[800] and rows[800]["training_free"]["n"] == rows[800]["finetuned"]["n"] == 3
    # the prompts past the window really are past it (the extended runs' sample logs)
    samples = next(
        Path(comparison["results"]["training_free"]["chat"]).parent.glob("samples_kv_retrieval_simple_*.jsonl")
    )
    lengths = sorted(json.loads(line)["doc"]["n_tokens"] for line in samples.read_text().splitlines())
    assert len(lengths) == 6 and lengths[0] < NATIVE < lengths[-1]

    # pairing: the target against training-free past the window, the guard against the base inside it
    target, guard = comparison["tasks"]
    assert (target["reference"], target["documents"], target["n"]) == ("training_free", "past the native window", 3)
    assert (guard["reference"], guard["documents"], guard["n"]) == ("base", "inside the native window", 3)
    assert target["reference_mean"] == rows[800]["training_free"]["mean"]
    assert guard["reference_mean"] == rows[300]["base"]["mean"] and guard["finetuned"] == rows[300]["finetuned"]["mean"]
    for r in comparison["tasks"]:
        assert r["p_holm"] >= r["p"]
        if r.get("uninformative"):  # both sides at the same bound: never a pass, whatever the test's p says
            assert not r["pass"] and r["verdict"].startswith("uninformative")
        else:
            assert r["pass"] == (r["p_holm"] < comparison["alpha"])

    # each variant's effective length, under RULER's rule and the relative one
    (eff,) = [e for e in comparison["effective_length"] if e["task"] == "kv_retrieval_simple"]
    assert set(eff["variants"]) == {"base", "training_free", "finetuned"}
    assert [r["rule"] for r in eff["variants"]["base"]] == ["ruler>85.6", "relative>0.9x"]
    md = (out / "comparison.md").read_text()
    assert f"| **native window {NATIVE}** |" in md and "800 (past the window) | — |" in md
    for r in comparison["tasks"]:  # a target that is not significant says what its n could have detected
        assert ("mde_text" in r) == (r["role"] == "target" and not r["pass"] and not r.get("uninformative"))
        assert "mde_text" not in r or (r["mde_text"].startswith("MDE ") and f"({r['mde_text']})" in md)
    assert "## Effective context length" in md
    board = (out / "leaderboard.csv").read_text()
    assert "ext-training-free" in board and "ext-finetuned" in board

    # a rerun into the same folder redoes nothing (no evaluation log is rewritten)
    logs = {p: p.stat().st_mtime_ns for p in out.glob("eval_*.log")}
    assert len(logs) == 3
    assert main(argv) == code
    assert capsys.readouterr().err.count("done before, skipped") == 8
    assert logs == {p: p.stat().st_mtime_ns for p in out.glob("eval_*.log")}
