"""Effective length from lm-eval results files (our KV tasks, lm-eval's ruler and babilong formats) and where it is
shown: `needles results`, leaderboard CSV / pivot / Markdown / HTML, `needles plot length`, `needles gate`.

The runs are written in lm-eval 0.4.13's schema; per-document keys come from the tasks' own breakdown helper
(KV), or are what lm-eval's ruler writes ("4096": score, -1 at the other lengths) and babilong ("acc", the length
only in --metadata max_seq_lengths). The real lm-eval run is in test_effective_length_vllm.py.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from harness_ext.cli import main
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.effective_length import Rule, default_rules, effective_length
from harness_ext.tasklib.breakdowns import key_suffix, run_length, with_breakdowns

REPO = Path(__file__).resolve().parents[2]
DATE_ID = "2026-02-01T00-00-00.000000"


def _write(folder: Path, model: str, per_task: dict[str, list[dict]], groups: dict[str, list[str]],
           metadata: dict | None = None, date: float = 1795240155.0) -> Path:  # fmt: skip
    """A results JSON and one sample log per task; every task's value is lm-eval's mean of the per-doc scores."""
    folder.mkdir(parents=True, exist_ok=True)
    results, configs, samples_n = {}, {}, {}
    for task, docs in per_task.items():
        keys = sorted({k for d in docs for k in d})
        block = {"alias": task}
        for k in keys:
            vals = [d[k] for d in docs if k in d and d[k] != -1]
            block[f"{k},none"] = statistics.fmean(vals) if vals else -1
            block[f"{k}_stderr,none"] = "N/A" if k.isdigit() else 0.05
        results[task] = block
        configs[task] = {"task": task, "metadata": {"version": 1.0, **(metadata or {})}}
        samples_n[task] = {"original": len(docs), "effective": len(docs)}
        lines = [json.dumps({"doc_id": i, "filter": "none", "doc_hash": f"{task}{i}", "prompt_hash": f"p{task}{i}",
                             "target_hash": f"t{i}", **d}) for i, d in enumerate(docs)]  # fmt: skip
        (folder / f"samples_{task}_{DATE_ID}.jsonl").write_text("\n".join(lines) + "\n")
    group_blocks = {}
    for group, tasks in groups.items():
        # lm-eval aggregates only the group's listed metric (ruler: "4096"; KV: both_acc), the mean over its tasks
        key = min((k for k in results[tasks[0]] if k.endswith(",none") and "_stderr" not in k), key=len)
        group_blocks[group] = {"alias": group, key: statistics.fmean(results[t][key] for t in tasks)}
    data = {
        "results": {**results, **group_blocks}, "groups": group_blocks, "group_subtasks": groups,
        "configs": configs, "versions": dict.fromkeys(per_task, 1.0), "n-shot": dict.fromkeys(per_task, 0),
        "higher_is_better": {t: {} for t in per_task}, "n-samples": samples_n,
        "config": {"model": "vllm", "model_args": {"pretrained": f"/models/{model}", "max_model_len": 2048}},
        "date": date, "lm_eval_version": "0.4.13",
    }  # fmt: skip
    path = folder / f"results_{DATE_ID}.json"
    path.write_text(json.dumps(data))
    return path


def _kv_docs(hits: dict[int, list[float]]) -> list[dict]:
    """KV documents: per length, one score per document (two depths alternating), keys as kv.process_results."""
    docs = []
    for length, values in hits.items():
        for i, v in enumerate(values):
            suffixes = [key_suffix("length", length), key_suffix("depth", float(i % 2))]
            docs.append(with_breakdowns({"both_acc": v, "value_acc": v}, suffixes))
    return docs


def kv_run(folder: Path, model: str = "SmolLM2", at_800: int = 10) -> Path:
    simple = _kv_docs({400: [1.0] * 10, 800: [1.0] * at_800 + [0.0] * (10 - at_800)})
    multi = _kv_docs({400: [1.0] * 9 + [0.0], 800: [1.0] * 9 + [0.0]})
    tasks = {"kv_retrieval_simple": simple, "kv_retrieval_multisubkey": multi}
    return _write(folder, model, tasks, {"kv_retrieval": list(tasks)}, {"lengths": [400, 800]})


def ruler_run(folder: Path) -> Path:
    """lm-eval ruler: run at 4096 and 8192 only (-1 at every other length), the group aggregating only 4096."""
    lengths = [4096, 8192, 16384, 32768, 65536, 131072]

    def docs(scores: dict[int, list[float]]) -> list[dict]:
        return [{**{str(x): -1.0 for x in lengths}, str(length): v} for length, vs in scores.items() for v in vs]

    tasks = {"niah_single_1": docs({4096: [1.0] * 4, 8192: [1.0] * 4}),
             "niah_single_2": docs({4096: [1.0] * 4, 8192: [1.0, 1.0, 1.0, 0.0]})}  # fmt: skip
    return _write(folder, "Llama", tasks, {"ruler": list(tasks)})


def test_kv_run_gives_effective_length_rows_with_bootstrap(tmp_path):
    kv_run(tmp_path / "run")
    rows = lb.collect_rows([tmp_path / "run"], rules=default_rules())
    el = {(r["task"], r["filter"]): r for r in rows if r["metric"] == "effective_length"}
    assert set(el) == {(t, f) for t in ("kv_retrieval", "kv_retrieval_simple", "kv_retrieval_multisubkey")
                       for f in ("ruler>85.6", "relative>0.9x")}  # fmt: skip
    assert el[("kv_retrieval_simple", "ruler>85.6")]["value"] == "800"
    assert el[("kv_retrieval_simple", "ruler>85.6")]["note"].startswith(">=800 | RULER rule")
    assert el[("kv_retrieval_multisubkey", "ruler>85.6")]["note"].startswith(">=800")  # 0.9 > 0.856
    group = el[("kv_retrieval", "ruler>85.6")]
    assert group["group"] == "kv_retrieval" and "both_acc of 2 tasks (mean)" in group["note"]
    assert "bootstrap over documents (1000 resamples, seed 0): 90% interval [" in group["note"]
    assert group["n"] == "40" and group["model"] == "SmolLM2" and group["source"].endswith(f"results_{DATE_ID}.json")
    wavg = {r["task"]: float(r["value"]) for r in rows if r["metric"] == "wavg_inc"}
    assert wavg["kv_retrieval_multisubkey"] == 0.9
    # a leaderboard without --effective-length is unchanged: no derived rows
    assert not [r for r in lb.collect_rows([tmp_path / "run"]) if r["metric"] == "effective_length"]


def test_ruler_format_drops_unrun_lengths_and_averages_the_group(tmp_path):
    ruler_run(tmp_path / "r")
    rows = lb.collect_rows([tmp_path / "r"], rules=[Rule("ruler", 85.6)])
    scores = {(r["task"], r["length"]): float(r["value"]) for r in rows if r["metric"] == "score"}
    assert scores == {("niah_single_1", "4096"): 1.0, ("niah_single_1", "8192"): 1.0, ("niah_single_2", "4096"): 1.0,
                      ("niah_single_2", "8192"): 0.75, ("ruler", "4096"): 1.0}  # fmt: skip
    assert all(r["value"] != "-1" for r in rows)
    el = {r["task"]: r for r in rows if r["metric"] == "effective_length"}
    assert el["niah_single_2"]["note"].startswith("4096 |")
    assert el["ruler"]["note"].startswith(">=8192 |")  # (1.0 + 0.75) / 2 = 0.875 > 0.856, as RULER averages tasks
    assert "score of 2 tasks (mean) at lengths 4096, 8192 | bootstrap" in el["ruler"]["note"]
    stderr = {(r["task"], r["length"]): r for r in rows if r["metric"] == "score" and r["task"] == "niah_single_2"}
    assert stderr[("niah_single_2", "8192")]["stderr_source"] == "samples"  # from the 4 documents, -1s left out
    assert float(stderr[("niah_single_2", "8192")]["stderr"]) == 0.25


def test_babilong_runs_one_length_each_combine_into_a_curve(tmp_path):
    for i, (k, hits) in enumerate((("1k", 10), ("2k", 7))):
        docs = [{"acc": 1.0}] * hits + [{"acc": 0.0}] * (10 - hits)
        _write(tmp_path / k, "Qwen", {"babilong_qa1": docs}, {}, {"max_seq_lengths": k}, date=1795240155.0 + i)
    rows = lb.collect_rows([tmp_path / "1k", tmp_path / "2k"], rules=[Rule("ruler", 85.6)])
    acc = {r["length"]: r["value"] for r in rows if r["task"] == "babilong_qa1" and r["metric"] == "acc"}
    assert acc == {"1024": "1.0", "2048": "0.7"}
    (el,) = [r for r in rows if r["metric"] == "effective_length"]
    assert el["note"].startswith("1024 |") and el["run_id"].startswith("combined:")
    assert "interval" in el["note"]  # each length's documents come from that run's sample log


def test_babilong_runs_at_upper_case_and_mega_lengths_join_the_curve(tmp_path):
    """babilong's configs are "4k" ... "128k" and "1M"; --metadata may spell them "4K" too."""
    for i, (k, hits) in enumerate((("4K", 10), ("8k", 10), ("1M", 2))):
        docs = [{"acc": 1.0}] * hits + [{"acc": 0.0}] * (10 - hits)
        _write(tmp_path / k, "Qwen", {"babilong_qa1": docs}, {}, {"max_seq_lengths": k}, date=1795240155.0 + i)
    rows = lb.collect_rows([tmp_path / k for k in ("4K", "8k", "1M")], rules=[Rule("ruler", 85.6)])
    acc = {r["length"]: r["value"] for r in rows if r["task"] == "babilong_qa1" and r["metric"] == "acc"}
    assert acc == {"4096": "1.0", "8192": "1.0", "1048576": "0.2"}
    (el,) = [r for r in rows if r["metric"] == "effective_length"]
    # the doublings between 8K and 1M were not run: the outcome says so
    assert el["note"].startswith("8192 (16384, 32768, 65536, 131072, 262144, 524288 not tested) |")
    assert "at lengths 4096, 8192, 1048576" in el["note"] and "interval" in el["note"]
    cases = {"4K": 4096, "4k": 4096, "1M": 1048576, "2m": 2097152, 8192: 8192, "8192": 8192, "0k": None,
             "0k,1k,2k": None, "4 k": None, True: None, "": None}  # fmt: skip
    assert {k: run_length({"max_seq_lengths": k}) for k in cases} == cases


def test_an_untested_middle_length_is_named_in_the_cell(tmp_path, capsys):
    docs = _kv_docs({4096: [1.0] * 10, 16384: [1.0] * 10})
    _write(tmp_path / "run", "M", {"kv_retrieval_simple": docs}, {}, {"lengths": [4096, 16384]})
    pivot = tmp_path / "p.csv"
    argv = ["leaderboard", str(tmp_path / "run"), "--effective-length", "-o", str(tmp_path / "lb.csv"),
            "--pivot", str(pivot)]  # fmt: skip
    assert main(argv) == 0
    header, line = list(csv.reader(pivot.read_text().splitlines()))
    cell = line[header.index("kv_retrieval_simple effective_length [ruler>85.6]")]
    assert cell == ">=16384 (8192 not tested)"
    assert main(["results", str(tmp_path / "run")]) == 0
    assert ">=16384 (8192 not tested)" in capsys.readouterr().out


def test_results_command_shows_effective_length(tmp_path, capsys):
    kv_run(tmp_path / "run", at_800=8)
    assert main(["results", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Effective context length" in out
    line = next(x for x in out.splitlines() if x.startswith("SmolLM2  kv_retrieval_simple ") and "ruler>85.6" in x)
    assert " 400 " in line and "[" in line  # 0.8 at 800 is below 85.6; the bootstrap interval follows
    assert main(["results", "--effective-length", str(tmp_path / "run")]) == 0
    assert "score ± stderr" not in capsys.readouterr().out


def test_bad_inputs_exit_2_with_the_fix(tmp_path, capsys):
    docs = [{"acc": 1.0}, {"acc": 0.0}]
    _write(tmp_path / "flat", "M", {"mmlu": docs}, {})
    kv_run(tmp_path / "run")
    cases = [
        (["results", "--effective-length", str(tmp_path / "flat")], "no length breakdown"),
        (["results", "--threshold", "0.856", str(tmp_path / "run")], "0-100 scale"),
        (["leaderboard", "--effective-length", str(tmp_path / "flat")], "no length breakdown"),
        (["plot", "length", str(tmp_path / "flat"), "-o", str(tmp_path / "x.png")], "no length breakdown"),
        (["plot", "length", str(tmp_path / "run"), "--threshold", "120", "-o", str(tmp_path / "x.png")], "0-100"),
        (["gate", "--effective-length", "--baseline", str(tmp_path / "flat"), "--candidate", str(tmp_path / "flat")],
         "no length breakdown"),
    ]  # fmt: skip
    for argv, problem in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert problem in err and "fix:" in err, (argv, err)
    assert not (tmp_path / "x.png").exists()


def test_leaderboard_views_and_plot_show_it(tmp_path, capsys):
    kv_run(tmp_path / "run", at_800=8)
    ref = REPO / "leaderboards" / "ruler_main_results.csv"
    out = {k: tmp_path / n for k, n in (("csv", "lb.csv"), ("pivot", "p.csv"), ("md", "r.md"), ("html", "r.html"))}
    argv = ["leaderboard", str(tmp_path / "run"), str(ref), "--effective-length", "-o", str(out["csv"]), "--pivot",
            str(out["pivot"]), "--markdown", str(out["md"]), "--html", str(out["html"]), "--plots-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rows = lb.read_csv(out["csv"])
    assert {r["filter"] for r in rows if r["metric"] == "effective_length"} == {"ruler>85.6", "relative>0.9x"}
    header, *body = out["pivot"].read_text().splitlines()
    column = header.split(",").index("kv_retrieval_simple effective_length [ruler>85.6]")
    smol = next(line for line in body if line.startswith("SmolLM2,"))
    assert smol.split(",")[column] == "400"
    gemini = next(line for line in body if line.startswith("Gemini-1.5-pro,"))
    assert ">=131072" in gemini
    markdown = out["md"].read_text()
    assert "kv_retrieval_simple effective_length [relative&gt;0.9x]" in markdown and "| &gt;=131072 |" in markdown
    html = out["html"].read_text()
    assert "&gt;=131072" in html and "effective_length [ruler&gt;85.6]" in html
    assert (tmp_path / "length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "len.png"
    assert main(["plot", "length", str(tmp_path / "run"), str(ref), "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_gate_decides_shrank_on_the_candidates_bootstrap_interval(tmp_path, capsys):
    base = kv_run(tmp_path / "base")
    noisy, worse = kv_run(tmp_path / "noisy", at_800=8), kv_run(tmp_path / "worse", at_800=2)
    # 8 of 10 at 800: the point estimate drops to 400, but a resample of those 10 documents passes 800 in ~38%
    # of draws, so the candidate's 90% interval still reaches >=800: within noise, the gate holds
    report = tmp_path / "noisy.json"
    argv = ["gate", "--effective-length", "--baseline", str(base), "--candidate", str(noisy), "--report", str(report)]
    assert main(argv) == 0
    check = next(c for c in json.loads(report.read_text())["effective_length"]
                 if (c["task"], c["rule"]) == ("kv_retrieval_simple", "ruler>85.6"))  # fmt: skip
    assert (check["baseline"], check["candidate"], check["verdict"]) == (">=800", "400", "held")
    assert check["candidate_interval"] == "[400, >=800]" and "within noise" in check["reason"]
    out = capsys.readouterr().out
    assert "effective context length (must not shrink)" in out and "top of its 90% bootstrap interval" in out
    # 2 of 10 at 800: even the top of the candidate's interval is 400, below the baseline's >=800
    report = tmp_path / "worse.json"
    argv = ["gate", "--effective-length", "--baseline", str(base), "--candidate", str(worse), "--report", str(report)]
    assert main(argv) == 1
    checks = {(c["task"], c["rule"]): c for c in json.loads(report.read_text())["effective_length"]}
    simple = checks[("kv_retrieval_simple", "ruler>85.6")]
    assert (simple["candidate"], simple["candidate_interval"], simple["verdict"]) == ("400", "400", "SHRANK")
    assert {k for k, c in checks.items() if c["verdict"] == "SHRANK"} == {
        ("kv_retrieval", "ruler>85.6"),
        ("kv_retrieval_simple", "ruler>85.6"),
    }
    assert main(["gate", "--effective-length", "--baseline", str(worse), "--candidate", str(base)]) == 0
    capsys.readouterr()


def test_gate_without_sample_logs_decides_on_the_point_estimate(tmp_path, capsys):
    base, noisy = kv_run(tmp_path / "base"), kv_run(tmp_path / "noisy", at_800=8)
    for samples in (tmp_path / "noisy").glob("samples_*.jsonl"):
        samples.unlink()
    report = tmp_path / "gate.json"
    argv = ["gate", "--effective-length", "--baseline", str(base), "--candidate", str(noisy), "--report", str(report)]
    assert main(argv) == 1  # no interval to say the drop is noise: the shorter point estimate decides
    checks = {(c["task"], c["rule"]): c for c in json.loads(report.read_text())["effective_length"]}
    simple = checks[("kv_retrieval_simple", "ruler>85.6")]
    assert (simple["candidate_interval"], simple["verdict"]) == ("n/a", "SHRANK")
    assert "point estimate" in simple["reason"]
    assert "no sample logs for an interval, decided on the point estimate" in capsys.readouterr().out


def test_effective_length_of_the_written_run_matches_the_rule(tmp_path):
    """The rows' numbers are the module's, on the means lm-eval reports."""
    kv_run(tmp_path / "run", at_800=9)
    rows = lb.collect_rows([tmp_path / "run"], rules=[Rule("ruler", 85.6)])
    points = {int(r["length"]): float(r["value"]) for r in rows
              if r["task"] == "kv_retrieval_simple" and r["metric"] == "both_acc" and r["length"] and not r["position"]}  # fmt: skip
    assert points == {400: 1.0, 800: 0.9}
    assert effective_length(points, Rule("ruler", 85.6)).display() == ">=800"
