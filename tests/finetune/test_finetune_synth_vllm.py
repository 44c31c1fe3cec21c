"""The synthetic-data finetuning plumbing on the real tools: LoRA-finetune a model on a synthetic MDQA cell and on the real-data
baseline (CI budget: 4 documents, 2 steps each), then score both merged models on the 10-document MDQA fixture
through the real `lm_eval --model vllm`, held-out questions only (`mdqa_split: eval`). Asserts the plumbing, not
the scores: the same questions scored for both, numeric stderr, hashes and the leakage check recorded.

The model is the tiny random Llama with SmolLM2's tokenizer and chat template (the claim is mechanical: the
prompts, data and manifests do not depend on the weights); SmolLM2 itself is finetuned and scored through vLLM
in the experiment fixture (tests/conftest.py) and `make demo` (this test with SmolLM2 would take ~143 s on 2 cores)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness_ext.cli import main
from harness_ext.plugin.runner import vllm_eval_command
from harness_ext.tasklib.mdqa import question_split
from harness_ext.tasklib.mdqa_fixture import build_fixture

EVAL = {
    "mdqa_num_documents": 10,
    "mdqa_positions": [1, 10],
    "mdqa_num_questions": 2,
    "mdqa_split": "eval",
    "allow_unofficial_data": True,
}


@pytest.mark.heavy
def test_synth_cell_and_real_baseline_are_scored_on_the_same_held_out_mdqa_questions(
    tiny_llama_dir, shared_data, lm_eval_run, tmp_path, monkeypatch
):
    oracle = shared_data / "lost-in-the-middle" / "qa_data" / "nq-open-oracle.jsonl.gz"
    mirror = tmp_path / "mdqa"
    build_fixture(oracle, mirror, settings=(10,), progress=False)
    shutil.copyfile(oracle, mirror / "qa_data" / "nq-open-oracle.jsonl.gz")  # the real file: the corpus is official
    monkeypatch.setenv("NEEDLES_MDQA_MIRROR", str(mirror))  # lm_eval inherits it
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    scored = {}
    for cell in ("templated_entities", "real"):
        out = tmp_path / cell
        argv = ["finetune", "--model", str(tiny_llama_dir), "-o", str(out), "--data-family", "synth_mdqa"]
        argv += ["--data-cell", cell, "--num-samples", "2", "--num-documents", "5", "--positions", "1", "5"]
        argv += ["--eval-tasks", "mdqa_sweep", "--eval-metadata", json.dumps(EVAL), "--merge"]
        argv += ["--lora-r", "8", "--epochs", "1", "--batch-size", "2", "--lr", "5e-4"]
        assert main(argv) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        data, leak = manifest["data"], manifest["leakage_check"]
        assert (data["family"], data["cell"], data["split"], data["documents"]) == ("synth_mdqa", cell, "train", 4)
        assert len(data["dataset_sha256"]) == 64 and data["data_official"] is True
        assert leak["tasks"] == ["mdqa_sweep"] and leak["overlap"] == 0 and leak["eval_questions"] == 2
        args = vllm_eval_command(
            str(tiny_llama_dir), ["mdqa_sweep"], EVAL, 4096, merged=Path(manifest["outputs"]["model"])
        )
        assert "lora_local_path" not in " ".join(args)  # the merged model is scored
        scored[cell] = lm_eval_run([*args[2:], "--gen_kwargs", "max_gen_toks=16"], f"synth-{cell}")

    samples = {}
    for cell, res in scored.items():
        scores = res["results"]["mdqa_sweep"]
        assert 0.0 <= scores["best_subspan_em,none"] <= 1.0
        assert isinstance(scores["best_subspan_em_stderr,none"], float)  # numeric, not "N/A"
        info = res["configs"]["mdqa_sweep"]["metadata"]
        assert info["needles_question_split"] == "eval"
        (path,) = Path(res["_dir"]).glob("samples_mdqa_sweep_*.jsonl")
        samples[cell] = [json.loads(line) for line in path.open()]
    questions = {cell: [(s["doc_id"], s["doc"]["question"]) for s in rows] for cell, rows in samples.items()}
    assert questions["templated_entities"] == questions["real"] and len(questions["real"]) == 4  # 2 x 2 positions
    assert all(question_split(q) == "eval" for _, q in questions["real"])
    prompts = {cell: [s["arguments"]["gen_args_0"]["arg_0"] for s in rows] for cell, rows in samples.items()}
    assert prompts["templated_entities"] == prompts["real"]  # the same documents, before the model differs
