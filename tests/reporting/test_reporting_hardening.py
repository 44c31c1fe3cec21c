"""Hostile and broken inputs and impossible outputs for `needles results / leaderboard / plot / gate`.

Every case must end in exit 2 with `needles: error:` naming the file (never a traceback), must not let
strings from a results file escape the HTML or Markdown, and must not write outside the output folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs_fixture import DATE_ID, write_run

from harness_ext.cli.app import main
from harness_ext.core.errors import NeedlesError
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.results_io import InvalidInput, load_run
from harness_ext.reporting.results_table import rows_from_paths
from harness_ext.tasklib.breakdowns import format_depth, key_suffix, parse_name, with_breakdowns

REPO = Path(__file__).resolve().parents[2]
LITM = REPO / "leaderboards" / "lost_in_the_middle_mdqa20.csv"
SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'


def _needles(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process: what a user sees, traceback or not."""
    code = "import sys; from harness_ext.cli.app import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "needles: error:" in proc.stderr, proc.stderr
    for text in needles:
        assert text in proc.stderr, (text, proc.stderr)


# ------------------------------------------------------------------------------------------ `needles results`
def test_results_of_a_missing_path_is_a_user_error():
    proc = _needles("results", "/nonexistent/results.json")
    _assert_user_error(proc, "/nonexistent/results.json", "fix:")


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"results": {"t": {"acc,none": 0.5}}, "vers', "truncated JSON"),
        ("not json at all", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not lm-eval output"),
        ('{"results": {"t": {"acc,none": ' + "9" * 5000 + "}}}", "not lm-eval output"),
        ('{"hello": 1}', "no 'results' object"),
    ],
)
def test_results_of_a_broken_file_names_it(tmp_path, content, expected):
    path = tmp_path / f"results_{DATE_ID}.json"
    path.write_text(content)
    with pytest.raises(InvalidInput) as exc:
        rows_from_paths([path])
    assert str(path) in exc.value.problem and expected in exc.value.problem
    _assert_user_error(_needles("results", str(tmp_path)), str(path))


def test_results_table_reads_breakdowns_with_the_shared_parser(tmp_path):
    extra = {"value_acc_len1024_depth0.5,none": 1.0, "value_acc_len1024_depth0.5_stderr,none": 0.1,
             "acc_ctx500,none": 0.25, "acc_disp_first,none": 0.75, "value_acc_len2048,none": "N/A"}  # fmt: skip
    write_run(tmp_path, [1.0, 0.0], extra_results=extra)
    table = {(r.metric, r.length, r.position): (r.value, r.stderr) for r in rows_from_paths([tmp_path])}
    assert table == {
        ("value_acc", "all", "all"): (0.5, 0.05),
        ("value_acc", "1024", "0.50"): (1.0, 0.1),
        ("acc", "500", "all"): (0.25, None),
        ("acc", "all", "first"): (0.75, None),
    }
    proc = _needles("results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "1024" in proc.stdout and "0.50" in proc.stdout and "SmolLM2" in proc.stdout


def test_format_depth_is_what_parse_name_reads_back():
    assert format_depth(0.5) == "0.50" and format_depth("1") == "1.00" and format_depth(None) == "random"
    for depth in (0.0, 0.25, 1 / 3, 1.0):
        bd = parse_name(f"both_acc_len4096_depth{format_depth(depth)}")
        assert (bd.base, bd.length, bd.position, bd.position_kind) == ("both_acc", 4096, format_depth(depth), "depth")
    # absurd numbers from an untrusted file are not breakdowns (and do not crash int())
    assert not parse_name("acc_len" + "9" * 5000).is_breakdown


def test_breakdown_keys_are_written_as_they_are_parsed():
    cases = [
        (("length", 1024), (1024, None, None)),
        (("ctx", 500), (500, None, None)),
        (("depth", 0.5), (None, "0.50", "depth")),
        (("doc", 10), (None, "10", "doc")),
        (("dispersion", "first"), (None, "first", "dispersion")),
    ]
    for (kind, value), (length, position, position_kind) in cases:
        bd = parse_name("both_acc" + key_suffix(kind, value))
        assert (bd.base, bd.length, bd.position, bd.position_kind) == ("both_acc", length, position, position_kind)
    out = with_breakdowns({"acc": 1.0, "f1": 0.5}, [key_suffix("length", 64), key_suffix("depth", 0.25)])
    assert out == {"acc": 1.0, "f1": 0.5, "acc_len64": 1.0, "f1_len64": 0.5, "acc_depth0.25": 1.0,
                   "f1_depth0.25": 0.5, "acc_len64_depth0.25": 1.0, "f1_len64_depth0.25": 0.5}  # fmt: skip
    assert with_breakdowns({"acc": 1.0}, [key_suffix("doc", 3)]) == {"acc": 1.0, "acc_pos3": 1.0}
    with pytest.raises(ValueError, match="unknown breakdown kind"):
        key_suffix("position", 1)


# ------------------------------------------------------------------------------------------ impossible outputs
@pytest.mark.parametrize(
    "flag,what",
    [("-o", "leaderboard CSV"), ("--pivot", "pivot CSV"), ("--markdown", "Markdown report"), ("--html", "HTML report")],
)
def test_leaderboard_output_under_a_file_is_a_user_error(tmp_path, flag, what):
    proc = _needles("leaderboard", str(LITM), flag, "/etc/passwd/x.out")
    _assert_user_error(proc, f"cannot write the {what} /etc/passwd/x.out", "/etc/passwd is a file, not a folder")


def test_unwritable_outputs_are_user_errors(tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (["leaderboard", str(LITM), "-o", str(folder)], f"{folder} is a folder"),
        (["leaderboard", str(LITM), "--plots-dir", "/etc/passwd/plots"], "/etc/passwd is a file"),
        (["plot", "mdqa", str(LITM), "-o", "/etc/passwd/p.png"], "/etc/passwd is a file"),
        (["plot", "mdqa", str(LITM), "-o", str(folder)], "is a folder"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "needles: error: cannot write" in err and expected in err, err
    assert list(folder.iterdir()) == []
    # a path that looks writable but is not (procfs refuses new files, even to root): caught at write time
    with pytest.raises(NeedlesError) as exc:
        lb.export([LITM], Path("/proc/needles-leaderboard.csv"))
    assert "cannot write the leaderboard CSV /proc/needles-leaderboard.csv" in str(exc.value)


def test_gate_outputs_that_cannot_be_written_fail_before_the_gate_runs(tmp_path, capsys, monkeypatch):
    base = write_run(tmp_path / "base", [1.0] * 20)
    cand = write_run(tmp_path / "cand", [1.0] * 20)
    for flag in ("--report", "--summary"):
        assert main(["gate", "--baseline", str(base), "--candidate", str(cand), flag, "/etc/passwd/r"]) == 2
        captured = capsys.readouterr()
        assert "/etc/passwd is a file" in captured.err and captured.out == ""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "a-file" / "summary"))
    summary = tmp_path / "new-dir" / "summary.md"
    assert main(["gate", "--baseline", str(base), "--candidate", str(cand), "--summary", str(summary)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the $GITHUB_STEP_SUMMARY file" in err and "a-file is a file" in err
    assert summary.read_text().startswith("## needles gate: PASS")  # written before the failing append


# ------------------------------------------------------------------------------------------ untrusted results
def _hostile_run(folder: Path, values: list[float]) -> Path:
    task = "kv_retrieval"
    path = write_run(folder, values, model=f"{SCRIPT}|x", task=task, extra_results={"big,none": 1e308})
    data = json.loads(path.read_text())
    block = data["results"][task]
    block["alias"] = IMG
    block["nan,none"] = float("nan")  # written as NaN, which Python's json reads
    data["results"]["../../../escape"] = {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": IMG}
    data["results"][f"{SCRIPT}_len10"] = {"acc,none": 0.5, "acc_stderr,none": 0.1}
    for section in ("configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        data[section]["../../../escape"] = data[section][task]
        data[section][f"{SCRIPT}_len10"] = data[section][task]
    data["date"] = 1e300  # no calendar date: falls back to the file name's date
    path.write_text(json.dumps(data))
    (folder.parent / "escape").mkdir(exist_ok=True)
    return path


def test_hostile_strings_do_not_escape_the_reports(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    _hostile_run(run_dir, [1.0, 0.0, 1.0])
    out = tmp_path / "out"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    html, md = out / "lb.html", out / "lb.md"
    argv = ["leaderboard", str(run_dir), "-o", str(out / "lb.csv"), "--html", str(html), "--markdown", str(md),
            "--pivot", str(out / "pivot.csv"), "--plots-dir", str(out / "plots"), "--title", SCRIPT]  # fmt: skip
    proc = _needles(*argv)
    assert proc.returncode == 0, proc.stderr
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    written = [p for p in after if p not in before]
    assert all(p.parts[0] == "out" for p in written), written
    page = html.read_text(encoding="utf-8")
    assert SCRIPT not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own sorting script
    text = md.read_text(encoding="utf-8")
    assert "<script" not in text and "&lt;script&gt;" in text
    for block in text.split("\n\n"):  # a | in a model name does not add a table cell
        table = [ln for ln in block.splitlines() if ln.startswith("|")]
        if table:
            assert len({ln.replace("\\|", "").count("|") for ln in table}) == 1, block
    rows = lb.read_csv(out / "lb.csv")
    assert {r["model"] for r in rows} == {f"{SCRIPT}|x"}
    assert {r["metric"] for r in rows} >= {"value_acc", "big", "acc"} and "nan" not in {r["metric"] for r in rows}
    assert {r["date"] for r in rows} == {DATE_ID.replace("T", " ")}


def test_task_names_with_path_parts_never_read_outside_the_run(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    path = _hostile_run(run_dir, [1.0, 0.0])
    # a sample log where "../../../escape" would point if the task name were joined to the folder unchecked
    (run_dir / "samples_..").mkdir()
    outside = tmp_path / "runs" / f"escape_{DATE_ID}.jsonl"
    outside.write_text('{"doc_id": 0, "acc": 1.0}\n')
    assert (run_dir / f"samples_../../../escape_{DATE_ID}.jsonl").resolve() == outside.resolve()
    run = load_run(path)
    assert run.samples_path("../../../escape") is None and run.samples_path("kv_retrieval") is not None


def test_gate_on_hostile_runs_reports_without_crashing(tmp_path):
    base = _hostile_run(tmp_path / "base", [1.0] * 30)
    cand = _hostile_run(tmp_path / "cand", [0.0] * 30)
    summary = tmp_path / "summary.md"
    proc = _needles("gate", "--baseline", str(base), "--candidate", str(cand), "--summary", str(summary),
                    "--report", str(tmp_path / "r.json"), "--metrics", "value_acc", "acc")  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # value_acc dropped from 1 to 0 on 30 paired documents
    assert "REGRESSION" in proc.stdout
    text = summary.read_text(encoding="utf-8")
    assert f"`{SCRIPT}|x`" in text  # the model, in a code span, which shows HTML literally
    outside_code = re.sub(r"`[^`]*`", "", text)
    assert "<" not in outside_code and "&lt;script&gt;" in outside_code  # the hostile task name, escaped
    assert "../../../escape" in text  # named as a task, not used as a path
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 5 and len({ln.replace("\\|", "").count("|") for ln in table}) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "REGRESSION"
    assert {(c["task"], c["method"]) for c in report["comparisons"]} == {
        ("kv_retrieval", "mcnemar-exact"),
        ("../../../escape", "unpaired-z"),
        (f"{SCRIPT}_len10", "unpaired-z"),
    }


def _deep_json(levels: int) -> str:
    return '{"results": {"t": {"acc,none": 0.5}}, "configs": ' + "[" * levels + "]" * levels + ', "versions": {}}'


@pytest.mark.parametrize("levels", [100_000, 500])
def test_deeply_nested_results_are_refused_naming_the_file(tmp_path, levels):
    path = tmp_path / "deep" / f"results_{DATE_ID}.json"
    path.parent.mkdir()
    path.write_text(_deep_json(levels))
    _assert_user_error(_needles("leaderboard", str(path)), str(path), "not lm-eval output")
    ok = write_run(tmp_path / "ok", [1.0, 0.0])
    _assert_user_error(_needles("gate", "--baseline", str(ok), "--candidate", str(path)), str(path))
    _assert_user_error(_needles("plot", "kv", str(path), "-o", str(tmp_path / "p.png")), str(path))


@pytest.mark.parametrize(
    "line,expected",
    [
        ('{"doc_id": 1, "value_acc": 1.0', "line 2 is not valid JSON"),
        ('{"doc_id": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2 is not an lm-eval sample"),
        ('{"doc_id": "1", "value_acc": 1.0}', "doc_id must be an integer"),
        ('{"doc_id": [1], "value_acc": 1.0}', "doc_id must be an integer"),
        ("\udcff", "not UTF-8"),
    ],
)
def test_damaged_sample_logs_fail_the_gate_naming_file_and_line(tmp_path, line, expected):
    base = write_run(tmp_path / "base", [1.0, 0.0, 1.0])
    cand = write_run(tmp_path / "cand", [1.0, 0.0, 1.0])
    samples = cand.parent / f"samples_kv_retrieval_{DATE_ID}.jsonl"
    first = samples.read_text().splitlines()[0]
    samples.write_bytes((first + "\n" + line + "\n").encode("utf-8", "surrogateescape"))
    _assert_user_error(_needles("gate", "--baseline", str(base), "--candidate", str(cand)), str(samples), expected)


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda t: t[:-50], "fields"),  # cut mid-row
        (lambda t: t[:-1] + "9", "truncated"),  # cut mid-field: the last line has no newline
        (lambda t: t.replace(",0.538,", ",nan,", 1), "not a finite number"),
        (lambda t: t.replace(",doc,", ",dispersion,", 1), "does not fit position_kind"),
        (lambda t: t.replace(",doc,", ",elsewhere,", 1), "position_kind 'elsewhere' is not one of"),
        (lambda t: t.replace("\n", "\n" + "x" * 200_000 + ",", 1), "not valid CSV"),
        (lambda t: t + "a,\0\n", "NUL"),
    ],
)
def test_damaged_leaderboard_csvs_are_refused_naming_the_file(tmp_path, edit, expected):
    text = LITM.read_text(encoding="utf-8")
    assert ",0.538," in text and ",doc," in text
    bad = tmp_path / "bad.csv"
    bad.write_text(edit(text), encoding="utf-8")
    with pytest.raises(InvalidInput) as exc:
        lb.read_csv(bad)
    assert str(bad) in exc.value.problem and expected in exc.value.problem
    _assert_user_error(_needles("plot", "mdqa", str(bad), "-o", str(tmp_path / "p.png")), str(bad))


def test_plot_labels_are_drawn_literally(tmp_path):
    """A model name with unbalanced mathtext ($) would crash matplotlib if it were parsed."""
    rows = [dict(r, model=r"$\frac{$ x") for r in lb.read_csv(LITM)]
    hostile = tmp_path / "hostile.csv"
    hostile.write_text(lb.to_csv_text(rows), encoding="utf-8")
    assert main(["plot", "mdqa", str(hostile), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
