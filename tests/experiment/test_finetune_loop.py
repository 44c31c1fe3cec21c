"""The issue's acceptance test: LoRA finetuning raises SmolLM2's kv_retrieval accuracy, significantly.

Real everything: `lm_eval --model vllm` scores the base model and the finetuned one (the LoRA adapter
merged into the base, the command the manifest prints for it) on the same held-out documents, peft trains
on CPU in between, and an exact one-sided McNemar test on the paired outcomes must reject "no improvement".

The loop itself runs once per session in the `finetuned_smollm2` fixture (tests/conftest.py), whose
adapter the retrieval-head tests analyse too. Budget (2 cores, measured 2026-12-06): base evaluation ~60 s,
40 LoRA steps ~150 s, merged-model evaluation ~60 s. vLLM serving the adapter itself (lora_local_path,
max_lora_rank from the adapter) is tests/finetune/test_context_extension_serving.py, on the tiny model.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from harness_ext.experiment.loop import DEFAULT_TRAINING, compare, format_table, mcnemar_exact


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0)["p_greater"] == 1.0
    assert mcnemar_exact(0, 5)["p_greater"] == pytest.approx(1 / 32)
    assert mcnemar_exact(2, 8)["p_greater"] == pytest.approx(56 / 1024)  # P(X >= 8 | n=10)
    assert mcnemar_exact(8, 2)["p_greater"] == pytest.approx(1 - 11 / 1024)
    assert mcnemar_exact(2, 8)["p_two_sided"] == pytest.approx(2 * 56 / 1024)


def _rows(values: list[float]) -> list[dict]:
    return [{"doc_id": i, "doc_hash": f"h{i}", "value_acc": v, "both_acc": v} for i, v in enumerate(values)]


def test_loop_report_gives_the_mde_beside_not_significant():
    """The loop's own table (loop.md / loop.json) says what its n could have detected where the gain is not
    significant, with the experiment's one implementation (harness_ext.workflow.mde.beside), and nothing where it is."""
    from harness_ext.workflow.mde import beside

    base = [1.0, 0.0] * 10  # 20 documents, 2 discordant pairs, one each way: p = 0.75
    new = list(base)
    new[0], new[1] = 0.0, 1.0
    result = compare(_rows(base), _rows(new), ["value_acc", "both_acc"], "value_acc", alpha=0.05)
    row = result["metrics"]["value_acc"]
    assert row["p_greater"] >= 0.05 and row["mde_text"] == beside(base, new, 0.05)["text"]
    assert "at n 20" in row["mde_text"] and row["mde"] > abs(row["finetuned"] - row["base"])
    table = format_table(result, "base", 0.05)
    assert table.splitlines()[-1].endswith(f"NOT significant ({row['mde_text']})")
    # 12 of 20 documents gained, none lost: significant, so no MDE is given
    gained = compare(_rows([0.0] * 20), _rows([1.0] * 12 + [0.0] * 8), ["value_acc"], "value_acc", alpha=0.05)
    assert gained["p_value"] < 0.05 and "mde" not in gained["metrics"]["value_acc"]
    assert format_table(gained, "base", 0.05).splitlines()[-1].endswith("-> significant")


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_finetuning_significantly_improves_kv_retrieval(finetuned_smollm2):
    result, out = finetuned_smollm2, finetuned_smollm2["output_dir"]
    comparison = result["comparison"]
    assert comparison["n"] == result["eval_metadata"]["num_samples"]  # every held-out document scored by both
    value = comparison["metrics"]["value_acc"]
    assert value["finetuned"] > value["base"]
    assert result["significant"] and comparison["p_value"] < 0.05, result["table"]
    # the finetuned run used the manifest's merged model (the adapter's weights folded in), no LoRA kernels
    manifest = json.loads((out / "finetune" / "manifest.json").read_text())
    argv = shlex.split(result["commands"]["finetuned"])
    model_args = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
    assert model_args["pretrained"] == manifest["outputs"]["model"] and "lora_local_path" not in model_args
    assert (Path(manifest["outputs"]["model"]) / "config.json").is_file()
    assert manifest["outputs"]["lora_rank"] == DEFAULT_TRAINING["lora_r"]
    assert (Path(manifest["outputs"]["adapter"]) / "adapter_config.json").is_file()  # kept beside the merged model
    assert "lora_local_path" not in result["commands"]["base"]
    # training documents never overlap the scored ones
    assert manifest["leakage_check"]["overlap"] == 0 and manifest["leakage_check"]["eval_docs"] == comparison["n"]
    print(result["table"], json.dumps(result["timings"]), sep="\n")


@pytest.mark.vllm
@pytest.mark.slow
def test_experiment_verdict_on_the_real_runs(finetuned_smollm2, capsys):
    """`needles experiment` end to end (the session's fixture): the verdict follows from the tests, the exit code
    from the verdict, and a rerun into the same folder redoes nothing."""
    from harness_ext.cli import main

    exp, out = finetuned_smollm2["experiment"], finetuned_smollm2["output_dir"]
    kv, guard = exp["tasks"]
    assert (kv["task"], kv["role"], guard["task"], guard["role"]) == (
        "kv_retrieval_simple",
        "target",
        "mdqa_closedbook",
        "guard",
    )
    assert kv["n"] == finetuned_smollm2["eval_metadata"]["num_samples"] and guard["n"] == 40
    # the experiment's target test is the loop's McNemar on the same pairs
    assert kv["p"] == pytest.approx(finetuned_smollm2["comparison"]["metrics"]["value_acc"]["p_greater"])
    assert kv["verdict"] == "improved" and kv["ci"][0] > 0
    for row in exp["tasks"]:
        assert row["p_holm"] >= row["p"] and row["pass"] == (row["p_holm"] < exp["alpha"])
        assert row["ci"][0] <= row["delta"] <= row["ci"][1]
    assert exp["claim_holds"] == all(r["pass"] for r in exp["tasks"])
    assert finetuned_smollm2["exit_code"] == (0 if exp["claim_holds"] else 1)
    # outputs: comparison, leaderboard rows of both runs, the plan with every step's command
    assert (out / "comparison.md").read_text().startswith("# Experiment ci: ")
    board = (out / "leaderboard.csv").read_text()
    assert "ci-finetuned" in board and "mdqa_closedbook" in board
    # resumable: every step has its marker, so a rerun skips all seven (data and the skipped pilot included) and
    # gives the same verdict
    capsys.readouterr()
    code = main(["experiment", str(out.parent / "ci.yaml"), "-o", str(out)])
    assert code == finetuned_smollm2["exit_code"]
    assert capsys.readouterr().err.count("done before, skipped") == 7
