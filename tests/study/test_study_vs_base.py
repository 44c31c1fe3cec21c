"""`needles study`'s "vs base" from planted lm-eval files: the paired delta, the two-sided exact McNemar p (against
scipy's binomial test), the bootstrap on continuous metrics, Holm across runs x targets, the report's columns,
and a run that cannot be paired (reported with the reason, never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from harness_ext.core.stats import holm
from harness_ext.study.config import study_from_dict
from harness_ext.study.report import build_report, to_markdown
from harness_ext.study.steps import Study, make_runs
from harness_ext.study.vs_base import cell, paired_test, rounded, vs_base, with_holm

TASK, DATE = "kv_retrieval_simple", "2026-01-01T00-00-00"
BASE_OK = [1] * 10 + [0] * 30
# 2 pairs only base gets right, 14 only the run: clearly better (exact two-sided p about 0.004)
BETTER = [1] * 8 + [0, 0] + [1] * 14 + [0] * 16


def plant(out: Path, rel: str, values: list[float], prompt: str = "p") -> str:
    """A results file and its sample log as `lm_eval --log_samples` writes them; returns the results path."""
    folder = out / rel
    folder.mkdir(parents=True)
    results = {
        "results": {TASK: {"alias": TASK, "value_acc,none": float(np.mean(values)), "value_acc_stderr,none": 0.05}},
        "configs": {TASK: {}},
        "versions": {TASK: 1.0},
        "n-samples": {TASK: {"original": len(values), "effective": len(values)}},
    }
    (folder / f"results_{DATE}.json").write_text(json.dumps(results))
    rows = [
        {"doc_id": i, "filter": "none", "doc_hash": f"d{i}", "prompt_hash": f"{prompt}{i}", "target_hash": f"t{i}",
         "value_acc": v}
        for i, v in enumerate(values)
    ]  # fmt: skip
    rows.reverse()  # pairing is on doc_id, not on the order of the lines
    (folder / f"samples_{TASK}_{DATE}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{rel}/results_{DATE}.json"


def _study(tmp_path: Path) -> Study:
    cfg = study_from_dict(
        {
            "name": "s",
            "model": "smollm2",
            "reference_variant": "real",
            "variants": [{"name": "real"}, {"name": "better"}, {"name": "same"}],
            "targets": [{"task": TASK, "metric": "value_acc"}],
            "bootstrap_iters": 500,
        }
    )
    return Study(cfg, tmp_path, "/models/tiny", make_runs(cfg), {}, lambda argv: 0, print)


def _eval(out: Path, name: str, values: list[float], prompt: str = "p") -> dict:
    rel = plant(out, "base/eval/m" if name == "base" else f"runs/{name}/eval/m", values, prompt)
    return {"results": rel, "scores": {TASK: {"value": round(float(np.mean(values)), 6), "stderr": 0.05, "n": 40}}}


def test_mcnemar_two_sided_matches_scipys_binomial_test():
    t = paired_test(np.array(BASE_OK, float), np.array(BETTER, float), iters=200)
    assert t["discordant"] == {"only_base_right": 2, "only_run_right": 14}
    assert t["delta"] == pytest.approx((14 - 2) / 40) == pytest.approx(np.mean(BETTER) - np.mean(BASE_OK))
    assert t["p"] == pytest.approx(binomtest(14, 16, 0.5).pvalue, rel=1e-12) and t["p"] < 0.01
    assert t["ci95"][0] > 0 and t["ci95"][0] < t["delta"] < t["ci95"][1]
    assert t["method"].startswith("exact McNemar (two-sided)")
    swapped = paired_test(np.array(BETTER, float), np.array(BASE_OK, float), iters=200)  # symmetric: same p
    assert swapped["p"] == t["p"] and swapped["delta"] == -t["delta"]
    same = paired_test(np.array(BASE_OK, float), np.array(BASE_OK, float), iters=200)
    assert same["delta"] == 0 and same["p"] == 1.0 and same["ci95"][0] <= 0 <= same["ci95"][1]
    # one discordant pair each way: scipy's two-sided p is 1, ours must not exceed 1
    tie = paired_test(np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), iters=200)
    assert tie["p"] == pytest.approx(binomtest(1, 2, 0.5).pvalue) == 1.0


def test_a_tiny_p_keeps_its_digits():
    """71 prompts down and 22 up out of 384: exact McNemar p 3.5e-07, which is neither 0 in report.json nor p=0."""
    base, run = np.zeros(384), np.zeros(384)
    base[:71], run[71:93] = 1, 1
    test = rounded(paired_test(base, run, iters=100))
    assert test["p"] == pytest.approx(binomtest(22, 93, 0.5).pvalue, rel=1e-5) and test["p"] > 0
    assert test["delta"] == pytest.approx((22 - 71) / 384, abs=1e-6)
    assert "p=3.48e-07" in cell({**test, "p_holm": test["p"]})


def test_continuous_metric_uses_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 60)
    shifted = paired_test(base, base + 0.2 + rng.normal(0, 0.05, 60), iters=2000)
    assert shifted["method"].startswith("paired bootstrap (two-sided)")
    assert shifted["delta"] == pytest.approx(0.2, abs=0.03) and shifted["ci95"][0] > 0.1
    assert shifted["p"] == pytest.approx(2 / 2001)  # no resample reaches 0: the smallest p, doubled
    noise = paired_test(base, base + rng.normal(0, 0.05, 60), iters=2000)
    assert noise["ci95"][0] < noise["delta"] < noise["ci95"][1] and 0.0 <= noise["p"] <= 1.0


def test_holm_spans_runs_and_targets_and_skips_failed_pairs():
    tests = {"a": {"x": {"p": 0.01}, "y": {"p": 0.04}}, "b": {"x": {"p": 0.03}, "y": {"error": "no samples"}}}
    with_holm(tests)
    assert [tests["a"]["x"]["p_holm"], tests["a"]["y"]["p_holm"], tests["b"]["x"]["p_holm"]] == pytest.approx(
        [0.03, 0.06, 0.06]
    )
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06]) and "p_holm" not in tests["b"]["y"]


def test_report_pairs_every_run_with_base_from_planted_sample_logs(tmp_path):
    study = _study(tmp_path)
    done = {"eval:base": _eval(tmp_path, "base", BASE_OK)}
    for name, values in (("real", BASE_OK), ("better", BETTER), ("same", BASE_OK)):
        done[f"eval:{name}"] = _eval(tmp_path, name, values)
    tests = vs_base(study, done)
    better, same = tests["better"][TASK], tests["same"][TASK]
    assert better["n"] == 40 and better["delta"] == float(f"{(14 - 2) / 40:.6g}")
    assert better["p"] == float(f"{binomtest(14, 16, 0.5).pvalue:.6g}")  # six significant digits
    assert same["delta"] == 0 and same["p"] == 1.0
    raw_p = [1.0, binomtest(14, 16, 0.5).pvalue, 1.0]  # real, better, same
    assert [tests[r][TASK]["p_holm"] for r in ("real", "better", "same")] == [float(f"{p:.6g}") for p in holm(raw_p)]
    assert better["p_holm"] == float(f"{3 * binomtest(14, 16, 0.5).pvalue:.6g}")

    # the report around it: the base row, the vs-base column and the same numbers in report.json
    for run in study.runs.values():
        done[f"heads:{run.name}"] = {"num_heads": 0, "heads": [], "probes_retrieved": [0, 1]}
        ko = {"accuracy": 0.1, "delta": 0.0, "delta_ci95": [0.0, 0.0]}
        done[f"knockout:{run.name}"] = {"task": TASK, "metric": "value_acc", "top": ko, "random": {**ko, "draws": 1}}
        if not run.is_reference:
            done[f"recall:{run.name}"] = {"recall": None, "jaccard": None}
            done[f"patch:{run.name}"] = {"sets": {}, "skipped": {}, "intersection_minus_random": []}
    done["correlation"] = {"targets": {TASK: {"n": 0, "spearman": None, "ci95": None, "note": "none", "score": []}}}
    rep = build_report(study, done)
    assert rep["base"] == {"scores": done["eval:base"]["scores"]} and rep["base"]["scores"][TASK]["value"] == 0.25
    assert rep["runs"][1]["vs_base"][TASK] == better
    md = to_markdown(rep)
    assert "| run | kv_retrieval_simple | vs base | heads |" in md
    assert "| base (no finetune) | 0.250 ± 0.050 | — |" in md
    assert f"| better | 0.550 ± 0.050 | {cell(better)} | 0 |" in md
    assert cell(better) == f"+0.300 [{better['ci95'][0]:+.3f}, {better['ci95'][1]:+.3f}] p=0.00418 (Holm 0.0125)"
    # "no significant" always carries what the pair could have detected, "none" included (no discordant pair)
    assert cell(same).endswith(", n.s.: MDE " + ("none" if same["mde"] is None else f"{same['mde']:.3f}"))
    assert cell({**same, "mde": None}).endswith(", n.s.: MDE none") and "MDE" not in cell(better)
    assert json.dumps(rep).count(str(tmp_path)) == 0


def test_a_run_that_cannot_be_paired_is_reported_with_the_reason(tmp_path):
    study = _study(tmp_path)
    done = {"eval:base": _eval(tmp_path, "base", BASE_OK)}
    done["eval:real"] = _eval(tmp_path, "real", BASE_OK)
    done["eval:better"] = _eval(tmp_path, "better", BETTER, prompt="other chat template ")
    done["eval:same"] = {"results": "runs/same/eval/gone/results_x.json", "scores": {}}
    tests = vs_base(study, done)
    assert "prompts" in tests["better"][TASK]["error"] and "p" not in tests["better"][TASK]
    assert tests["same"][TASK]["error"] == "runs/same/eval/gone/results_x.json: no such file or folder"
    assert tests["real"][TASK]["p_holm"] == 1.0  # the family is the pairs that could be tested

    (tmp_path / done["eval:base"]["results"]).unlink()
    tests = vs_base(study, done)
    assert all("no such file" in tests[r][TASK]["error"] for r in ("real", "better", "same"))
