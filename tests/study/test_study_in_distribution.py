"""`needles study`'s in-distribution check: each run's eval step scores the held-out task of its own training
family and the base eval scores every run's (planned commands, no model run), and the report leads with each
run's paired test against base (planted lm-eval results and sample logs)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from scipy.stats import binomtest

from harness_ext.core.stats import holm
from harness_ext.study.config import BASE, study_from_dict
from harness_ext.study.in_distribution import report_section
from harness_ext.study.plan import plan_steps, prepare, tool_command
from harness_ext.study.report import build_report, to_markdown
from harness_ext.study.steps import Study, make_runs
from harness_ext.workflow.in_distribution import NOT_LEARNED

TARGET = "kv_retrieval_simple_template"
VARIANTS = {  # variant -> (training data, its held-out task)
    "kv": ({"num_samples": 4, "lengths": [256]}, "kv_retrieval_simple"),
    "symbolic": ({"family": "synth_mdqa", "cell": "symbolic_kv", "num_samples": 4}, "synth_mdqa_symbolic_kv"),
    "entities": ({"family": "synth_mdqa", "cell": "templated_entities"}, "synth_mdqa_templated_entities"),
    "chains": ({"family": "musique", "cell": "symbolic"}, None),
}


def config(model: str, litm: Path) -> dict:
    return {
        "name": "s",
        "model": model,
        "reference_variant": "kv",
        "finetune": {"max_steps": 1},
        "variants": [{"name": n, "finetune": {"data": d}} for n, (d, _) in VARIANTS.items()],
        "targets": [{"task": TARGET, "metric": "value_acc"}],
        "metadata": {"lengths": [128], "num_samples": 2, "mdqa_mirror": str(litm)},  # the synth cells' corpus
        "backend": "hf",
        "k": 1,
        "in_distribution": {"documents": 30},
    }


def _tasks(study, run: str) -> list[str]:
    """The --tasks of the eval step's planned command (plan.json's ``tools``)."""
    argv = shlex.split(tool_command(study, next(s for s in plan_steps(study) if s.name == f"eval:{run}")))
    return argv[argv.index("--tasks") + 1].split(",")


def test_eval_steps_score_each_runs_own_held_out_task_and_base_every_one(tmp_path, tiny_llama_dir, shared_data):
    values = config(str(tiny_llama_dir), shared_data / "lost-in-the-middle")
    study, _ = prepare(study_from_dict(values), tmp_path / "out", lambda a: 0, print, False)
    held = [t for _, t in VARIANTS.values() if t]
    assert _tasks(study, BASE) == [TARGET, *held]
    for name, (_, task) in VARIANTS.items():
        assert _tasks(study, name) == [TARGET] + ([task] if task else [])
        if task and name != "kv":  # the finetune's leakage check covers the held-out documents
            assert task in study.finetune[name].eval_tasks
    meta = study.cfg.metadata
    # synth_mdqa: no target reads its keys, so the training shape is added (30 documents: 10 x 3 positions)
    assert meta["synth_num_samples"] == 10 and meta["synth_positions"] == [1, 5, 10]
    # kv: the target reads the KV keys, so its settings govern and the report says where they differ
    assert meta["lengths"] == [128] and meta["num_samples"] == 2
    assert study.in_distribution["kv"]["differs"]["lengths"] == {"trained": [256], "scored": [128]}
    assert study.in_distribution["chains"]["task"] is None
    off = {**values, "in_distribution": False}
    plain, _ = prepare(study_from_dict(off), tmp_path / "off", lambda a: 0, print, False)
    assert _tasks(plain, BASE) == [TARGET] and plain.in_distribution == {}


def _results(folder: Path, per_task: dict[str, list[float]]) -> str:
    """An lm-eval results file and one sample log per task (0/1 value_acc, one document per value)."""
    folder.mkdir(parents=True)
    date = "2026-01-01T00-00-00"
    data = {"results": {}, "configs": {}, "versions": {}, "n-samples": {}}
    for task, values in per_task.items():
        data["results"][task] = {"alias": task, "value_acc,none": sum(values) / len(values)}
        data["configs"][task], data["versions"][task] = {}, 1.0
        data["n-samples"][task] = {"original": len(values), "effective": len(values)}
        rows = [{"doc_id": i, "filter": "none", "doc_hash": f"{task}{i}", "prompt_hash": f"p{i}",
                 "target_hash": f"t{i}", "value_acc": v} for i, v in enumerate(values)]  # fmt: skip
        (folder / f"samples_{task}_{date}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"results_{date}.json").write_text(json.dumps(data))
    return str((folder / f"results_{date}.json").relative_to(folder.parent.parent))


BASE_HELD = [1.0] * 10 + [0.0] * 50
AFTER = {  # run -> (its held-out task, its values there)
    "learned": ("kv_retrieval_simple", [1.0] * 40 + [0.0] * 20),
    "worse": ("synth_mdqa_symbolic_kv", [1.0] * 1 + [0.0] * 59),
    "flat": ("synth_mdqa_real", [1.0] * 9 + [0.0] * 51),
}


def test_report_leads_with_each_runs_check_against_base(tmp_path):
    cfg = study_from_dict(
        {"name": "s", "model": "smollm2", "reference_variant": "learned", "bootstrap_iters": 200,
         "variants": [{"name": n} for n in (*AFTER, "chains")], "targets": [{"task": TARGET, "metric": "value_acc"}]}
    )  # fmt: skip
    checks = {
        n: {"family": f"fam-{n}", "task": t, "metric": "value_acc", "disjoint": "held out"}
        for n, (t, _) in AFTER.items()
    }
    checks["chains"] = {"family": "musique:symbolic", "task": None, "missing": "no lm-eval task scores it"}
    study = Study(cfg, tmp_path, "/models/tiny", make_runs(cfg), {}, lambda a: 0, print, in_distribution=checks)
    target = [1.0] * 20 + [0.0] * 40
    done = {"eval:base": {"results": _results(tmp_path / "base" / "eval", {TARGET: target, **{t: BASE_HELD for t, _ in AFTER.values()}}),
                          "scores": {TARGET: {"value": 1 / 3, "stderr": None, "n": 60}}}}  # fmt: skip
    for name in study.runs:
        per_task = {TARGET: target} | ({AFTER[name][0]: AFTER[name][1]} if name in AFTER else {})
        done[f"eval:{name}"] = {
            "results": _results(tmp_path / "runs" / name, per_task),
            "scores": done["eval:base"]["scores"],
        }
        done[f"heads:{name}"] = {"num_heads": 0, "heads": [], "probes_retrieved": [0, 1]}
        ko = {"accuracy": 0.1, "delta": 0.0, "delta_ci95": [0.0, 0.0]}
        done[f"knockout:{name}"] = {"task": "kv", "metric": "value_acc", "top": ko, "random": {**ko, "draws": 1}}
        if name != "learned":
            done[f"recall:{name}"] = {"recall": None, "jaccard": None}
            done[f"patch:{name}"] = {"sets": {}, "skipped": {}, "intersection_minus_random": []}
    done["correlation"] = {"targets": {TARGET: {"n": 0, "spearman": None, "ci95": None, "note": "none", "score": []}}}
    rep = build_report(study, done)
    assert list(rep).index("in_distribution") < list(rep).index("runs")
    got = rep["in_distribution"]
    assert [got[n]["status"] for n in (*AFTER, "chains")] == ["learned", "not_learned", "not_shown", "unavailable"]
    raw = [binomtest(30, 30, 0.5).pvalue, binomtest(0, 9, 0.5).pvalue, binomtest(0, 1, 0.5).pvalue]
    # exact McNemar, two-sided, to six significant digits (30 of 30: p 1.9e-09, not 0)
    assert [got[n]["p"] for n in AFTER] == [float(f"{p:.6g}") for p in raw] and got["learned"]["p"] > 0
    assert [got[n]["p_holm"] for n in AFTER] == [float(f"{p:.6g}") for p in holm(raw)]  # Holm across the checks only
    assert got["worse"]["delta"] == float(f"{-9 / 60:.6g}") and "mde" in got["flat"] and "mde" not in got["learned"]
    assert rep["runs"][1]["vs_base"][TARGET]["p_holm"] == 1.0  # the targets' family is unchanged
    md = to_markdown(rep)
    sentence = f"**worse: {NOT_LEARNED}.**"
    assert md.index("## In-distribution check") < md.index(sentence) < md.index(f"| run | {TARGET} |")
    assert "the finetune was not shown to learn its own task (MDE " in md.split("| flat |")[1].splitlines()[0]
    assert "| chains | musique:symbolic | — |" in md and "no lm-eval task scores it" in md
    # beside the transfer columns: each run's own-task score, its delta against base and the verdict's word
    table = md.split(f"| run | {TARGET} |")[1]
    assert table.splitlines()[0].startswith(" vs base | own task (vs base) | heads |")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[3] for line in table.splitlines()[2:8] if line}
    assert rows["worse"] == "0.017 (-0.150, worse)" and rows["learned (reference)"] == "0.667 (+0.500, learned)"
    assert rows["flat"] == "0.150 (-0.017, n.s.)" and rows["chains"] == "—" and rows["base (no finetune)"] == "—"
    assert json.dumps(rep).count(str(tmp_path)) == 0


def test_a_run_whose_eval_lacks_its_held_out_task_is_reported_not_raised(tmp_path):
    cfg = study_from_dict(
        {"name": "s", "model": "smollm2", "reference_variant": "a", "variants": [{"name": "a"}, {"name": "b"}],
         "targets": [{"task": TARGET, "metric": "value_acc"}]}
    )  # fmt: skip
    checks = {n: {"family": "kv", "task": "kv_retrieval_simple", "metric": "value_acc"} for n in ("a", "b")}
    study = Study(cfg, tmp_path, "/m", make_runs(cfg), {}, lambda a: 0, print, in_distribution=checks)
    done = {"eval:base": {"results": _results(tmp_path / "base" / "eval", {"kv_retrieval_simple": BASE_HELD})}}
    for name in ("a", "b"):
        done[f"eval:{name}"] = {"results": _results(tmp_path / "runs" / name, {TARGET: BASE_HELD})}
    got = report_section(study, done)
    assert got["a"]["status"] == "error" and "kv_retrieval_simple" in got["a"]["verdict"]
    assert str(tmp_path) not in got["a"]["verdict"]
