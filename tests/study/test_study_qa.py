"""`needles study` end to end with a MuSiQue target on the tiny random Llama: the real-data baseline (MuSiQue train
questions) and the symbolic multi-hop cell are finetuned, scored on `musique` (real lm_eval, hf backend), their heads
detected on MuSiQue probes, knocked out and patched on MuSiQue items; the report carries every number."""

from __future__ import annotations

import json

import pytest

from harness_ext.cli.app import main
from harness_ext.tasklib.qa_fixtures import write_musique_fixture

EVAL = {"task": "musique", "eval_lengths": [640], "eval_depths": [0.0], "eval_samples": 1, "eval_max_new_tokens": 4}


@pytest.mark.heavy
def test_a_study_with_a_musique_target_runs_end_to_end(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    write_musique_fixture(tmp_path / "fx", num_questions=6)
    monkeypatch.setenv("NEEDLES_MUSIQUE_MIRROR", str(tmp_path / "fx"))
    monkeypatch.setenv("NEEDLES_ALLOW_UNOFFICIAL_DATA", "1")
    config = {
        "name": "tiny_musique",
        "model": str(tiny_llama_dir),
        "reference_variant": "real",
        "finetune": {"data": {"num_samples": 2, "lengths": [640], "placements": ["late"]}, "max_steps": 1},
        "variants": [
            {"name": "real", "finetune": {"data": {"family": "musique", "cell": "real"}}},
            {"name": "symbolic", "finetune": {"data": {"family": "musique", "cell": "symbolic"}}},
        ],
        "targets": [{"task": "musique", "metric": "answer_f1"}],
        "metadata": {"musique_lengths": [640], "musique_num_questions": 1, "musique_placements": ["early"]},
        "backend": "hf",
        "max_model_len": 1024,
        "gen_kwargs": "max_gen_toks=4",
        "heads": {"probes": ["musique"], "qa_metadata": {"musique_lengths": [640], "musique_num_questions": 1},
                  "extra_tokens": 2},
        "knockout": EVAL,
        "patching": {**EVAL, "sets": ["top", "random"]},
        "k": 1,
        "draws": 1,
        "bootstrap_iters": 200,
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["study", str(path), "-o", str(out), "--dry-run"]) == 0
    assert "cost estimate" in capsys.readouterr().err
    assert main(["study", str(path), "-o", str(out), "--skip-pilot-check"]) == 0  # a random model: at floor
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "runs" / "real" / "finetune" / "manifest.json").read_text())
    data = manifest["data"]
    assert data["family"] == "musique" and data["cell"] == "real" and data["dataset_sha256"]
    assert manifest["leakage_check"]["tasks"] == ["musique"]  # checked against the scored dev questions
    heads = json.loads((out / "runs" / "symbolic" / "heads" / "heads.json").read_text())
    assert {p["family"] for p in heads["probes"]} == {"musique"} and len(heads["probes"]) == 3
    knock = json.loads((out / "runs" / "symbolic" / "knockout" / "knockout.json").read_text())
    assert knock["task"] == "musique" and knock["metric"] == "answer_f1" and knock["num_items"] == 1
    patch = json.loads((out / "runs" / "symbolic" / "patch" / "patch.json").read_text())
    assert patch["task"] == "musique" and patch["num_items"] == 1
    assert "symbolic" in json.dumps(report) and report["schema"].startswith("needles.study")
