"""Leaderboard CSV: schema, reference leaderboards, upsert, atomic writes, errors, breakdown names (no model runs).

The end-to-end path from real lm_eval runs is in test_leaderboard_e2e.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from harness_ext.cli import main
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.results_io import InvalidInput, load_run
from harness_ext.tasklib.breakdowns import is_overall, parse_name

REPO = Path(__file__).resolve().parents[2]
LITM = REPO / "leaderboards" / "lost_in_the_middle_mdqa20.csv"
TABLE2 = REPO / "leaderboards" / "artificial_needles_table2.csv"


# ------------------------------------------------------------------------------------------ breakdown names
@pytest.mark.parametrize(
    "name,base,length,position,kind",
    [
        ("both_acc", "both_acc", None, None, None),
        ("both_acc_len1024", "both_acc", 1024, None, None),
        ("both_acc_depth0.5", "both_acc", None, "0.50", "depth"),
        ("value_acc_len1024_depth0.50", "value_acc", 1024, "0.50", "depth"),
        ("value_acc_depth1.00_len4096", "value_acc", 4096, "1.00", "depth"),
        ("best_subspan_em_pos10", "best_subspan_em", None, "10", "doc"),
        ("mdqa20_pos15", "mdqa20", None, "15", "doc"),
        ("acc_ctx500", "acc", 500, None, None),
        ("acc_ctx_size3000_disp_middle", "acc", 3000, "middle", "dispersion"),
        ("acc_norm", "acc_norm", None, None, None),
        ("exact_match", "exact_match", None, None, None),
        ("len1024", "len1024", None, None, None),  # a bare suffix is a name, not a breakdown
    ],
)
def test_parse_name(name, base, length, position, kind):
    bd = parse_name(name)
    assert (bd.base, bd.length, bd.position, bd.position_kind) == (base, length, position, kind)


@pytest.mark.parametrize(
    "name,overall",
    [("acc", True), ("acc_norm", True), ("acc_ctx500", False), ("acc_pad_identity", False), ("acc_disp_first", False),
     ("best_subspan_em_pos10", False), ("both_acc", True)],
)  # fmt: skip
def test_overall_metrics_are_the_ones_the_gate_gates_by_default(name, overall):
    assert is_overall(name) is overall


# ------------------------------------------------------------------------------------------ reference leaderboards
def _papers_table(papers: Path, section_title: str) -> list[list[str]]:
    """The Markdown table following a heading of PAPERS.md (the spec the reference CSVs transcribe)."""
    lines = papers.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("###") and section_title in line)
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    return [r for r in table[2:]]  # drop header and separator


def test_litm_reference_matches_the_published_table(papers_md):
    rows = lb.read_csv(LITM)
    by = {(r["model"], r["task"]): float(r["value"]) for r in rows}
    table = _papers_table(papers_md, "2.4 Reference numbers")
    assert len(table) == 4
    tasks = [
        "mdqa20_pos1",
        "mdqa20_pos5",
        "mdqa20_pos10",
        "mdqa20_pos15",
        "mdqa20_pos20",
        "mdqa_closedbook",
        "mdqa_oracle",
    ]
    for model, *values in table:
        for task, text in zip(tasks, values, strict=True):
            assert by[(model, task)] == pytest.approx(float(text) / 100, abs=1e-9)
    assert len(rows) == 4 * 7
    assert {r["run_id"] for r in rows} == {"ref:arXiv:2307.03172"} and all("2307.03172" in r["source"] for r in rows)


def test_table2_reference_matches_the_published_table(papers_md):
    rows = lb.read_csv(TABLE2)
    mistral = {(r["adapter"], r["task"]): float(r["value"]) for r in rows if r["model"] == "Mistral-7B-Instruct-v0.1"}
    adapters = {"none (original)": "", "KV with template": "kv-with-template", "MultidocQA": "multidocqa",
                "IN2": "in2", "Needle-in-a-haystack": "needle-in-a-haystack"}  # fmt: skip
    table = _papers_table(papers_md, "1.5 Reference numbers")
    assert len(table) == 5
    for label, *values in table:
        for task, text in zip(["mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open"], values, strict=True):
            assert mistral[(adapters[label], task)] == pytest.approx(float(text) / 100, abs=1e-9)
    gpt = {(r["adapter"], r["task"]): float(r["value"]) for r in rows if r["model"].startswith("gpt-3.5")}
    assert gpt == pytest.approx({("", "mmlu"): 0.6807, ("kv-with-template", "mmlu"): 0.6775,
                                 ("", "gsm8k"): 0.7233, ("kv-with-template", "gsm8k"): 0.7165})  # fmt: skip


@pytest.mark.parametrize("path", [LITM, TABLE2])
def test_reference_files_are_canonical_leaderboards(path):
    """Same schema, and exactly what the exporter would write (so an upsert into them changes nothing else)."""
    text = path.read_text(encoding="utf-8")
    rows = lb.read_csv(path)
    assert lb.to_csv_text(rows) == text
    assert all(r["source"] and r["run_id"].startswith("ref:") for r in rows)


# ------------------------------------------------------------------------------------------ CSV, upsert, atomicity
def test_upsert_is_idempotent_and_keeps_other_runs(tmp_path):
    out = tmp_path / "lb.csv"
    assert main(["leaderboard", str(LITM), "-o", str(out)]) == 0
    first = out.read_bytes()
    assert main(["leaderboard", str(LITM), "-o", str(out)]) == 0
    assert out.read_bytes() == first
    assert main(["leaderboard", str(TABLE2), "-o", str(out)]) == 0
    rows = lb.read_csv(out)
    assert len(rows) == len(lb.read_csv(LITM)) + len(lb.read_csv(TABLE2))
    # a row of the same run with a new value replaces the old one, nothing is duplicated
    changed = [dict(r) for r in lb.read_csv(LITM)]
    changed[0]["value"] = "0.123"
    merged = lb.upsert(rows, changed)
    assert len(merged) == len(rows)
    assert sum(r["value"] == "0.123" for r in merged) == 1


def test_csv_with_another_schema_is_refused_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "old.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["model", "task", "acc"], ["x", "y", "0.5"]])
    out = tmp_path / "lb.csv"
    assert main(["leaderboard", str(LITM), "-o", str(out)]) == 0
    before = out.read_bytes()
    assert main(["leaderboard", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "mixed schema" in err
    assert out.read_bytes() == before
    # the existing output itself damaged: refused, not overwritten
    out.write_text(before.decode().rsplit("\n", 2)[0][:-40] + "\n")  # cut the last row short
    damaged = out.read_bytes()
    assert main(["leaderboard", str(TABLE2), "-o", str(out)]) == 2
    assert "fields" in capsys.readouterr().err and out.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb.csv", "old.csv"]  # no temp files left behind


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"results": {"t": {"acc,none": 0.5}}, "configs": {}, "vers', "truncated JSON"),
        ('{"hello": "world"}', "not lm-eval output"),
        ("[1, 2, 3]", "not lm-eval output"),
        ('{"results": {"t": {"acc": 0.5}}, "configs": {}, "versions": {}}', "mixed schema"),
        ('{"results": {"t": [0.5]}, "configs": {}, "versions": {}}', "mixed schema"),
    ],
)
def test_bad_results_files_are_refused_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "results_2026-01-01T00-00-00.000000.json"
    path.write_text(content)
    with pytest.raises(InvalidInput) as exc:
        lb.collect_rows([path])
    assert str(path) in exc.value.problem and expected in exc.value.problem


def test_folder_without_results_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="no results_"):
        lb.collect_rows([tmp_path])


def test_crash_during_write_leaves_the_old_file(tmp_path):
    """A write that dies half-way (here: the data cannot be encoded) must not touch the target."""
    from harness_ext.core.atomic_io import write_atomic

    target = tmp_path / "lb.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "half\ud800")  # lone surrogate: fails inside the write, after the temp file exists
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lb.csv"]
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640


# ------------------------------------------------------------------------------------------ views
def test_pivot_and_markdown_views_of_reference_rows(tmp_path):
    rows = lb.read_csv(LITM) + lb.read_csv(TABLE2)
    header, body = lb.pivot(rows)
    assert header[:4] == ["model", "adapter", "date", "source"]
    assert "mdqa20_pos10 best_subspan_em" in header and "mmlu acc" in header
    line = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in body}
    assert float(line[("GPT-3.5-Turbo (0613)", "")]["mdqa20_pos10 best_subspan_em"]) == pytest.approx(0.538)
    assert float(line[("Mistral-7B-Instruct-v0.1", "in2")]["hellaswag acc"]) == pytest.approx(0.5644)
    md = lb.render_markdown(rows, title="Reference")
    assert md.startswith("# Reference\n")
    assert "| Claude-1.3 |" in md and "0.599" in md
    # Markdown tables are well formed: every row of a table has as many cells as its header
    for block in md.split("\n\n"):
        table = [ln for ln in block.splitlines() if ln.startswith("|")]
        if table:
            assert len({ln.count("|") for ln in table}) == 1, block


def test_html_escapes_user_strings():
    row = dict(lb.read_csv(LITM)[0], model="<script>alert(1)</script>")
    html = lb.render_html([row])
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_results_json_model_identity_from_real_lm_eval_config(tmp_path):
    """model_args as lm-eval 0.4.13 writes them (a dict) and as older releases do (a string)."""
    base = {"results": {}, "configs": {}, "versions": {}, "date": 1795240155.5}
    for args in ({"pretrained": "/x/models/SmolLM2", "lora_local_path": "/y/adapters/kv-lora"},
                 "pretrained=/x/models/SmolLM2,peft=/y/adapters/kv-lora,dtype=float32"):  # fmt: skip
        path = tmp_path / "results_2026-01-01T00-00-00.json"
        path.write_text(json.dumps({**base, "config": {"model": "vllm", "model_args": args}}))
        assert lb.model_identity(load_run(path)) == ("SmolLM2", "kv-lora")
