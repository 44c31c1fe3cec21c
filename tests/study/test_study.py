"""`needles study` end to end on the tiny random Llama with two variants: every step (real finetunes, real
lm_eval, `needles heads` detection / compare / knockout / patch), the plan, the report; resuming reruns nothing
that finished and redoes exactly what did not; `--executor ray` on a local Ray writes the same report bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness_ext.cli.app import main

STEPS = [
    "eval:base",
    "finetune:real",
    "eval:real",
    "heads:real",
    "finetune:synthetic",
    "eval:synthetic",
    "heads:synthetic",
    "knockout:real",
    "knockout:synthetic",
    "recall:synthetic",
    "patch:synthetic",
    "correlation",
    "report",
]
EVAL = {"eval_lengths": [128], "eval_depths": [0.5], "eval_samples": 1, "eval_max_new_tokens": 4}


def tiny_study(model: Path) -> dict:
    """Two KV-data variants (different data seeds and dictionary counts) of the cheapest real configuration."""
    return {
        "name": "tiny",
        "model": str(model),
        "reference_variant": "real",
        "finetune": {"data": {"num_samples": 4, "num_dicts": 4, "lengths": None}, "max_steps": 1, "batch_size": 2},
        "variants": [
            {"name": "real", "finetune": {"data": {"seed": 0}}},
            {"name": "synthetic", "finetune": {"data": {"seed": 1, "num_dicts": 6}}},
        ],
        "targets": [{"task": "kv_retrieval_simple", "metric": "value_acc"}],
        "metadata": {"num_dicts": 4, "num_samples": 2, "lengths": None, "depths": [0.5]},
        "backend": "hf",
        "max_model_len": 1024,
        "gen_kwargs": "max_gen_toks=8",
        "heads": {"probes": ["niah"], "lengths": [128], "depths": [0.5], "extra_tokens": 4},
        "knockout": EVAL,
        "patching": EVAL,
        "k": 1,
        "draws": 2,
        "bootstrap_iters": 200,
    }


@pytest.fixture(scope="module")
def config(tiny_llama_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study-config") / "study.yaml"
    path.write_text(json.dumps(tiny_study(tiny_llama_dir)))
    return path


@pytest.fixture(scope="module")
def local_study(config, tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("study") / "local"
    # a random model sits at floor on every target: the pilot check would stop the study (tests/study/test_pilot.py)
    assert main(["study", str(config), "-o", str(out), "--skip-pilot-check"]) == 0
    return out


def _marker(out: Path, name: str) -> dict:
    return json.loads((out / "steps" / f"{name}.json").read_text())


def _sample_values(results: Path) -> dict[int, float]:
    """doc_id -> value_acc from the sample log lm_eval wrote beside a results file."""
    date_id = results.stem.removeprefix("results_")
    lines = (results.parent / f"samples_kv_retrieval_simple_{date_id}.jsonl").read_text().splitlines()
    return {row["doc_id"]: float(row["value_acc"]) for row in map(json.loads, lines)}


@pytest.mark.slow
def test_every_step_runs_and_the_plan_records_it(local_study):
    out = local_study
    plan = json.loads((out / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == STEPS
    for s in plan["steps"]:  # each step is one command any scheduler can run
        assert s["command"] == f"needles study {out / 'study.yaml'} -o {out} --step {s['name']}"
        assert (out / "steps" / f"{s['name']}.json").is_file()
    assert plan["depends_on"]["patch:synthetic"] == ["heads:real", "heads:synthetic"]
    assert plan["depends_on"]["eval:real"] == ["finetune:real"] and plan["depends_on"]["eval:base"] == []
    assert "eval:base" in plan["depends_on"]["report"]
    assert f"--model_args pretrained={plan['model']},dtype=float32," in plan["tools"]["eval:base"]
    assert "peft=" not in plan["tools"]["eval:base"] and "peft=" in plan["tools"]["eval:real"]
    assert f" --output_path {out / 'base' / 'eval'} " in plan["tools"]["eval:base"]
    assert list((out / "base" / "eval").rglob("results_*.json"))  # the base model, scored without adapter
    assert plan["resources"]["finetune:real"] == {"num_cpus": 1, "num_gpus": 0}
    assert plan["tools"]["eval:real"].startswith("lm_eval run --tasks kv_retrieval_simple --model hf")
    assert "--knockout top:1 --knockout random:1" in plan["tools"]["knockout:real"]
    assert plan["tools"]["patch:synthetic"].startswith("needles heads patch --source ")
    # real outputs of the real tools
    for run in ("real", "synthetic"):
        assert (out / "runs" / run / "finetune" / "adapter" / "adapter_config.json").is_file()
        assert list((out / "runs" / run / "eval").rglob("results_*.json"))
        assert json.loads((out / "runs" / run / "heads" / "heads.json").read_text())["schema"] == "needles.heads/1"
        assert (out / "runs" / run / "knockout" / "knockout.json").is_file()
    assert json.loads((out / "runs" / "synthetic" / "recall" / "compare.json").read_text())["num_heads_a"] == 0
    patch = json.loads((out / "runs" / "synthetic" / "patch" / "patch.json").read_text())
    assert [s["set"] for s in patch["sets"]] == ["random:1"]  # the only set a random model's empty head sets allow
    # the two variants really trained on different data
    real_ft, synth_ft = ((out / "runs" / r / "finetune.yaml").read_text() for r in ("real", "synthetic"))
    assert "num_dicts: 4" in real_ft and "num_dicts: 6" in synth_ft


@pytest.mark.slow
def test_report_holds_every_measurement_beside_the_paper(local_study):
    out = local_study
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "needles.study/1" and rep["reference_variant"] == "real"
    assert [r["run"] for r in rep["runs"]] == ["real", "synthetic"]
    eval_marker = _marker(out, "eval:synthetic")["outputs"]
    results = json.loads((out / eval_marker["results"]).read_text())
    synth = rep["runs"][1]
    assert synth["scores"]["kv_retrieval_simple"]["value"] == round(
        results["results"]["kv_retrieval_simple"]["value_acc,none"], 6
    )
    assert synth["scores"]["kv_retrieval_simple"]["n"] == 2
    # the base model's scores are its own eval's, and every run is paired with it sample by sample
    base_marker = _marker(out, "eval:base")["outputs"]
    base_results = json.loads((out / base_marker["results"]).read_text())
    assert base_marker["results"].startswith("base/eval/") and "results" not in rep["base"]  # timestamped name
    assert rep["base"]["scores"]["kv_retrieval_simple"]["value"] == round(
        base_results["results"]["kv_retrieval_simple"]["value_acc,none"], 6
    )
    base_values = _sample_values(out / base_marker["results"])
    for row in rep["runs"]:
        values = _sample_values(out / _marker(out, f"eval:{row['run']}")["outputs"]["results"])
        paired = sorted(set(values) & set(base_values))
        assert paired == sorted(base_values) and len(paired) == 2
        test = row["vs_base"]["kv_retrieval_simple"]
        diff = sum(values[i] - base_values[i] for i in paired) / len(paired)
        assert test["n"] == 2 and test["delta"] == pytest.approx(diff, abs=1e-6)
        assert 0.0 <= test["p"] <= test["p_holm"] <= 1.0 and test["method"].startswith("exact McNemar")
        assert test["ci95"][0] <= test["delta"] <= test["ci95"][1]
    knockout = json.loads((out / "runs" / "synthetic" / "knockout" / "knockout.json").read_text())
    assert synth["knockout"]["top"]["delta"] == knockout["conditions"][0]["delta"]
    assert synth["knockout"]["random"]["draws"] == 2
    assert set(synth["patching"]["skipped"]) == {"intersection", "complement"}
    assert "share none" in synth["patching"]["skipped"]["intersection"]
    assert synth["patching"]["sets"]["random:1"]["num_heads"] == 1
    assert rep["runs"][0]["overlap"] is None and rep["runs"][0]["patching"] is None
    # a random model retrieves nothing: no heads, so recall and the correlation are undefined, and say why
    assert synth["overlap"]["recall"] is None
    corr = rep["correlation"]["targets"]["kv_retrieval_simple"]
    assert corr["spearman"] is None and "no recall" in corr["note"]
    assert [p["finding"] for p in rep["paper"]] == ["gap", "correlation", "knockout", "patching"]
    assert all("PAPERS.md section 4.1" in p["source"] and p["ours"] for p in rep["paper"])
    assert str(out) not in (out / "report.json").read_text()  # relative paths only: comparable across folders
    md = (out / "report.md").read_text()
    assert "| base (no finetune) | 0." in md and "| vs base |" in md
    assert "| synthetic | 0." in md and "Beside the paper" in md and "patch set intersection not run" in md
    for name in ("recall_vs_score", "head_overlap"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_resumed_study_reruns_nothing_that_finished(local_study, config, capsys):
    out = local_study
    report = (out / "report.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    capsys.readouterr()
    assert main(["study", str(config), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(STEPS)
    assert "--step" not in err  # no step announced as running (a running step is logged with its command)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == mtimes
    assert (out / "report.json").read_bytes() == report

    # an interrupted step (no marker, a half-written folder) is redone from a clean folder, and only it
    (out / "steps" / "knockout:synthetic.json").unlink()
    (out / "steps" / "report.json").unlink()
    (out / "runs" / "synthetic" / "knockout" / "half-written").write_text("x")
    assert main(["study", str(config), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(STEPS) - 2
    ran = [line.split()[2:4] for line in err.splitlines() if line.startswith("[needles study] ") and "--step" in line]
    # numbered within the whole plan, not "1/1" before every step
    assert ran == [[f"{STEPS.index('knockout:synthetic') + 1}/{len(STEPS)}", "knockout:synthetic:"],
                   [f"{len(STEPS)}/{len(STEPS)}", "report:"]]  # fmt: skip
    assert not (out / "runs" / "synthetic" / "knockout" / "half-written").exists()
    assert (out / "report.json").read_bytes() == report

    # the base eval is a step like the others: by name it is skipped while its marker exists
    base_marker = (out / "steps" / "eval:base.json").read_bytes()
    assert main(["study", str(out / "study.yaml"), "-o", str(out), "--step", "eval:base"]) == 0
    assert "eval:base: done before, skipped" in capsys.readouterr().err
    assert (out / "steps" / "eval:base.json").read_bytes() == base_marker

    # one step by its plan command, as an outside scheduler runs it
    (out / "steps" / "correlation.json").unlink()
    assert main(["study", str(out / "study.yaml"), "-o", str(out), "--step", "correlation"]) == 0
    assert _marker(out, "correlation")["outputs"]["file"] == "correlation/correlation.json"


@pytest.mark.slow
def test_ray_executor_runs_the_same_plan_and_writes_the_same_report(local_study, config, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(["study", str(config), "-o", str(out), "--executor", "ray", "--skip-pilot-check"]) == 0
    err = capsys.readouterr().err
    assert err.count("submitted ({'num_cpus': 1, 'num_gpus': 0})") == len(STEPS)
    assert (out / "report.json").read_bytes() == (local_study / "report.json").read_bytes()
    local_plan = (local_study / "plan.json").read_text().replace(str(local_study), "OUT")
    assert (out / "plan.json").read_text().replace(str(out), "OUT") == local_plan
    for name in STEPS:  # every step ran as its own Ray task, through its plan command
        assert _marker(out, name)["command"].endswith(f"--step {name}")
    # resuming under Ray submits nothing
    assert main(["study", str(config), "-o", str(out), "--executor", "ray"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == len(STEPS) and "submitted" not in err
