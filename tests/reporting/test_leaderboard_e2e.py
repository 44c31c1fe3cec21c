"""two real `lm_eval --model vllm` runs (SmolLM2-135M-Instruct and a tiny random Llama with
the same tokenizer and chat template, so both see byte-identical prompts) on KV retrieval, MDQA and FLenQA; both
exported to one leaderboard; HTML (checked in headless Chromium) and PNGs rendered; one run gated against the other.

MDQA and FLenQA run on the projects' labelled FIXTURE data (built from the real LitM oracle file / invented FLenQA
instances), because the official files are not on this machine; the task names and metric keys are the real ones.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest

from harness_ext.cli import main
from harness_ext.plugin.runner import lm_eval_env, vllm_model_args
from harness_ext.reporting import leaderboard as lb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KV = "kv_retrieval_simple_template"
TASKS = [KV, "mdqa_sweep", "mdqa_closedbook", "flenqa_pir"]
POSITIONS = [1, 5, 10]


def _metadata(mdqa: Path, flenqa: Path) -> dict:
    # CI budget: the SmolLM2 run is prefill-bound; 2 MDQA questions (a stderr needs two) and 2 FLenQA instances
    # per cell (8 items, ~20K prompt tokens) keep every breakdown the assertions read
    return {
        "lengths": [256, 512], "depths": [0.0, 1.0], "num_samples": 5,  # KV: 2 x 2 cells x 5 = 20 docs
        "mdqa_mirror": str(mdqa), "mdqa_num_documents": 10, "mdqa_positions": POSITIONS, "mdqa_num_questions": 2,
        "flenqa_mirror": str(flenqa), "flenqa_padding_types": ["identity"], "flenqa_dispersions": ["first", "last"],
        "allow_unofficial_data": True,
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(lm_eval_run, smollm2_dir, tiny_llama_dir, shared_data, tmp_path_factory) -> dict[str, Path]:
    """One lm_eval run per model (one vLLM engine each): {"smollm2": results.json, "tiny": results.json}."""
    from harness_ext.tasklib.flenqa_fixture import write_fixture
    from harness_ext.tasklib.mdqa_fixture import build_fixture

    data = tmp_path_factory.mktemp("fixtures")
    oracle = shared_data / "lost-in-the-middle" / "qa_data" / "nq-open-oracle.jsonl.gz"
    build_fixture(oracle, data / "mdqa", settings=(10,), num_questions=60, progress=False)
    write_fixture(data / "flenqa", (250, 500), 2, 0)
    meta = json.dumps(_metadata(data / "mdqa", data / "flenqa"))
    out = {}
    for name, model in (("smollm2", smollm2_dir), ("tiny", tiny_llama_dir)):
        res = lm_eval_run(
            ["--tasks", ",".join(TASKS), "--model", "vllm", "--model_args", vllm_model_args(model, 2048),
             "--apply_chat_template", "--metadata", meta, "--gen_kwargs", "max_gen_toks=32", "--batch_size", "auto",
             "--log_samples"],
            f"e2e_{name}",
        )  # fmt: skip
        out[name] = Path(res["_path"])
    return out


def needles(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `needles` CLI in a subprocess (exit codes and printed output as a CI job sees them)."""
    cmd = [sys.executable, "-m", "harness_ext.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**lm_eval_env(), **(env or {})})


def _copy_run(results: Path, dest: Path, samples: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in results.parent.iterdir():
        if f.name == results.name or (samples and f.name.startswith("samples_")):
            shutil.copy(f, dest / f.name)
    return dest / results.name


# ------------------------------------------------------------------------------------------ leaderboard
def test_both_runs_in_one_leaderboard(runs, tmp_path):
    out = tmp_path / "leaderboard.csv"
    assert main(["leaderboard", str(runs["smollm2"].parent), str(runs["tiny"]), "-o", str(out)]) == 0
    rows = lb.read_csv(out)
    models = {r["model"] for r in rows}
    assert len(models) == 2 and "SmolLM2-135M-Instruct" in models
    for path in runs.values():
        results = json.loads(path.read_text())
        mine = {(r["task"], r["metric"], r["length"], r["position"]): r for r in rows if r["source"] == str(path)}
        assert {r["task"] for r in mine.values()} == set(TASKS)
        # every value is lm-eval's own number, with breakdowns parsed from the metric keys
        kv = results["results"][KV]
        assert float(mine[(KV, "value_acc", "", "")]["value"]) == kv["value_acc,none"]
        assert float(mine[(KV, "both_acc", "512", "1.00")]["value"]) == kv["both_acc_len512_depth1.00,none"]
        assert mine[(KV, "both_acc", "512", "1.00")]["position_kind"] == "depth"
        assert mine[(KV, "value_acc", "", "")]["n"] == "20"
        for p in POSITIONS:
            row = mine[("mdqa_sweep", "best_subspan_em", "", str(p))]
            assert float(row["value"]) == results["results"]["mdqa_sweep"][f"best_subspan_em_pos{p},none"]
            assert row["position_kind"] == "doc"
        fl = mine[("flenqa_pir", "acc", "500", "")]
        assert float(fl["value"]) == results["results"]["flenqa_pir"]["acc_ctx500,none"]
        assert mine[("flenqa_pir", "acc", "", "last")]["position_kind"] == "dispersion"
        assert all(r["stderr"] and r["stderr_source"] == "lm-eval" for r in mine.values())
        assert {r["chat_template_sha"] for r in mine.values()} == {results["chat_template_sha"]}
        assert {r["task_hash"] for r in mine.values() if r["task"] == KV} == {results["task_hashes"][KV]}
        assert {r["lm_eval_version"] for r in mine.values()} == {"0.4.13"}
    # re-exporting changes nothing, byte for byte
    before = out.read_bytes()
    assert main(["leaderboard", str(runs["smollm2"]), str(runs["tiny"]), "-o", str(out)]) == 0
    assert out.read_bytes() == before
    # a newer run of the same model and tasks adds rows with its own date (here: the same outputs, re-run later)
    newer = _copy_run(runs["tiny"], tmp_path / "rerun", samples=False)
    data = json.loads(newer.read_text())
    data["date"] += 3600
    newer = newer.rename(newer.with_name("results_2099-01-01T00-00-00.000000.json"))
    newer.write_text(json.dumps(data))
    assert main(["leaderboard", str(newer), "-o", str(out)]) == 0
    rows2 = lb.read_csv(out)
    tiny_rows = [r for r in rows if r["source"] == str(runs["tiny"])]
    assert len(rows2) == len(rows) + len(tiny_rows)
    assert len({r["date"] for r in rows2 if r["model"] == tiny_rows[0]["model"]}) == 2
    # the views show the newest run of each model
    header, body = lb.pivot(rows2)
    assert len(body) == 2 and any(line[2] == lb.run_date(lb.load_run(newer)) for line in body)


def test_na_stderr_is_recomputed_from_the_samples(runs, tmp_path):
    """lm-eval writes "N/A" for some tasks' stderr; the exporter computes it from the per-sample log."""
    path = _copy_run(runs["smollm2"], tmp_path / "na")
    data = json.loads(path.read_text())
    original = dict(data["results"][KV])
    for key in original:
        if "_stderr," in key:
            data["results"][KV][key] = "N/A"
    path.write_text(json.dumps(data))
    rows = [r for r in lb.collect_rows([path]) if r["task"] == KV]
    assert rows and all(r["stderr_source"] == "samples" for r in rows)
    for r in rows:
        suffix = "".join(f"_{p}" for p in lb.breakdown_label(r).split())
        key = f"{r['metric']}{suffix}_stderr,none"
        assert float(r["stderr"]) == pytest.approx(original[key], rel=1e-9, abs=1e-12), key
    assert {r["n"] for r in rows if r["length"] == "512" and r["position"] == "0.00"} == {"5"}


def test_bad_input_names_the_file_and_leaves_the_csv_alone(runs, tmp_path):
    out = tmp_path / "lb.csv"
    assert main(["leaderboard", str(runs["smollm2"]), "-o", str(out)]) == 0
    before = out.read_bytes()
    truncated = tmp_path / "cut" / runs["tiny"].name
    truncated.parent.mkdir()
    truncated.write_text(runs["tiny"].read_text()[:5000])
    proc = needles("leaderboard", str(runs["tiny"]), str(truncated), "-o", str(out))
    assert proc.returncode == 2 and str(truncated) in proc.stderr and "truncated JSON" in proc.stderr
    samples = next(runs["smollm2"].parent.glob("samples_*.jsonl"))
    proc = needles("leaderboard", str(samples), "-o", str(out))
    assert proc.returncode == 2 and str(samples) in proc.stderr and "JSON" in proc.stderr
    assert out.read_bytes() == before  # the good first input was not half-applied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "lb.csv"]


# ------------------------------------------------------------------------------------------ views
def test_html_report_with_plots_in_headless_chromium(runs, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the browser helpers live in test_html.py
    from test_html import Tables, browse

    html, plots = tmp_path / "report.html", tmp_path / "plots"
    refs = Path(__file__).resolve().parents[2] / "leaderboards" / "lost_in_the_middle_mdqa20.csv"
    proc = needles("leaderboard", str(runs["smollm2"]), str(runs["tiny"]), str(refs), "--html", str(html),
                   "--plots-dir", str(plots), "--markdown", str(tmp_path / "report.md"), "--pivot", str(tmp_path / "p.csv"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in plots.iterdir()) == ["flenqa.png", "kv.png", "mdqa.png"]
    column = f"{KV} value_acc"
    shown = browse(html, tmp_path / "profile", "--dump-dom", fragment=f"sort={column}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = Tables()
    dom.feed(shown.stdout)
    assert dom.body.get("data-ready") == "1" and dom.body.get("data-images") == "3/3"
    assert dom.body.get("data-sorted-by") == column
    overall = next(t for t in dom.tables if t["title"] == "Overall")
    header, *body = overall["rows"]
    names = [r[0] for r in body]
    assert "SmolLM2-135M-Instruct" in names and "GPT-3.5-Turbo (0613)" in names
    values = [float(r[header.index(column)].split()[0]) for r in body if r[header.index(column)]]
    assert len(values) == 2 and values == sorted(values, reverse=True)  # sorted by the browser from the URL
    titles = {t["title"] for t in dom.tables}
    assert (
        f"{KV} both_acc by length / position" in titles and "mdqa_sweep best_subspan_em by length / position" in titles
    )


def test_plot_mdqa_by_position_from_real_runs(runs, tmp_path):
    from matplotlib.image import imread

    from harness_ext.reporting.plots import mdqa_series

    png = tmp_path / "mdqa.png"
    proc = needles("plot", "mdqa", str(runs["smollm2"]), str(runs["tiny"]), "-o", str(png))
    assert proc.returncode == 0, proc.stderr
    img = imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 500
    curves, closed, _ = mdqa_series(lb.collect_rows([runs["smollm2"], runs["tiny"]]))
    assert len(curves) == 2 and all(sorted(c) == POSITIONS for c in curves.values())
    assert len(closed) == 2
    smol = json.loads(runs["smollm2"].read_text())["results"]
    assert {setting for _model, setting in curves} == {"mdqa_sweep"}
    label = next(k for k in curves if k[0].startswith("SmolLM2"))
    assert closed[label[0]] == smol["mdqa_closedbook"]["best_subspan_em,none"]
    assert curves[label][5][0] == smol["mdqa_sweep"]["best_subspan_em_pos5,none"]
    # asking for a plot the data cannot support is a clear error
    proc = needles("plot", "kv", str(runs["smollm2"]), "--metric", "no_such_metric", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "nothing to plot" in proc.stderr and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ gate
def test_gate_catches_the_weaker_model(runs, tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    report = tmp_path / "gate.json"
    proc = needles("gate", "--baseline", str(runs["smollm2"].parent), "--candidate", str(runs["tiny"]),
                   "--report", str(report), env={"GITHUB_STEP_SUMMARY": str(summary)})  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["verdict"] == "REGRESSION" and data["exit_code"] == 1
    comps = data["comparisons"]
    assert {c["task"] for c in comps} == set(TASKS)
    assert all(c["method"] == "mcnemar-exact" and c["n"] > 0 for c in comps)
    worst = min(comps, key=lambda c: c["p_adjusted"])
    assert worst["verdict"] == "REGRESSION" and worst["diff"] < 0 and worst["ci_high"] < 0
    assert worst["detail"]["losses"] > worst["detail"]["wins"]
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "needles gate: REGRESSION" in text
    for word in ("baseline", "candidate", "diff", "p (Holm)", "MDE", "verdict"):
        assert word in proc.stdout


def test_gate_passes_the_stronger_model_and_a_run_against_itself(runs, tmp_path):
    proc = needles("gate", "--baseline", str(runs["tiny"]), "--candidate", str(runs["smollm2"]), "--report",
                   str(tmp_path / "up.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "up.json").read_text())["verdict"] == "PASS"
    proc = needles("gate", "--baseline", str(runs["smollm2"]), "--candidate", str(runs["smollm2"]), "--report",
                   str(tmp_path / "same.json"))  # fmt: skip
    assert proc.returncode == 0
    comps = json.loads((tmp_path / "same.json").read_text())["comparisons"]
    assert all(c["diff"] == 0 and c["p_value"] == 1.0 for c in comps)


def test_gate_refuses_runs_that_are_not_comparable(runs, tmp_path):
    base = runs["smollm2"]
    # fewer samples in the candidate (as with another --limit)
    cand = _copy_run(runs["tiny"], tmp_path / "fewer")
    samples = next(cand.parent.glob(f"samples_{KV}_*.jsonl"))
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:-3]))
    proc = needles("gate", "--baseline", str(base), "--candidate", str(cand))
    assert proc.returncode == 2 and "sample sets differ" in proc.stderr
    # another prompt for one document (another template, chat template or system prompt)
    cand = _copy_run(runs["tiny"], tmp_path / "prompt")
    samples = next(cand.parent.glob(f"samples_{KV}_*.jsonl"))
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    lines[2]["prompt_hash"] = "0" * 64
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = needles("gate", "--baseline", str(base), "--candidate", str(cand))
    assert proc.returncode == 2 and "prompts" in proc.stderr and f"doc_id {lines[2]['doc_id']}" in proc.stderr
    # another task version
    cand = _copy_run(runs["tiny"], tmp_path / "version")
    data = json.loads(cand.read_text())
    data["versions"][KV] = 2.0
    cand.write_text(json.dumps(data))
    proc = needles("gate", "--baseline", str(base), "--candidate", str(cand))
    assert proc.returncode == 2 and "task version differs" in proc.stderr
    # different task sets, and a folder with two runs in it
    proc = needles("gate", "--baseline", str(base), "--candidate", str(runs["tiny"]), "--tasks", "no_such_task")
    assert proc.returncode == 2 and "no_such_task" in proc.stderr
    both = tmp_path / "two"
    _copy_run(runs["tiny"], both)
    _copy_run(runs["smollm2"], both)
    proc = needles("gate", "--baseline", str(both), "--candidate", str(runs["tiny"]))
    assert proc.returncode == 2 and "2 results files" in proc.stderr


def test_gate_without_sample_logs_falls_back_to_unpaired_and_says_so(runs, tmp_path):
    base = _copy_run(runs["smollm2"], tmp_path / "b", samples=False)
    cand = _copy_run(runs["tiny"], tmp_path / "c", samples=False)
    proc = needles("gate", "--baseline", str(base), "--candidate", str(cand), "--tasks", "flenqa_pir", "--report",
                   str(tmp_path / "r.json"))  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert "UNPAIRED" in proc.stdout
    comps = json.loads((tmp_path / "r.json").read_text())["comparisons"]
    assert {c["method"] for c in comps} == {"unpaired-z"}
    # the unpaired test is the z-test on lm-eval's own values and standard errors
    results = [json.loads(p.read_text())["results"]["flenqa_pir"] for p in (runs["smollm2"], runs["tiny"])]
    (c,) = comps
    se = math.hypot(results[0]["acc_stderr,none"], results[1]["acc_stderr,none"])
    assert c["diff"] == pytest.approx(results[1]["acc,none"] - results[0]["acc,none"])
    if se > 0:
        assert c["p_value"] == pytest.approx(NormalDist().cdf(c["diff"] / se))
