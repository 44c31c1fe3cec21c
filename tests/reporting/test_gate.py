"""`needles gate` options and input errors, and the GitHub Actions workflow that uses it (no model runs here;
the gate on real runs is in test_leaderboard_e2e.py, its statistics in test_stats.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from harness_ext.cli.app import build_parser, main

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "needles-gate.yml"


def _needles_calls(script: str) -> list[list[str]]:
    """`needles ...` command lines of a shell script, continuation lines joined, $VARS given dummy values."""
    joined = re.sub(r"\\\n\s*", " ", script)
    calls = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("needles ") or " needles " in line and "$(needles" not in line:
            line = line[line.index("needles ") :]
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: "0.02" if m.group(1) == "MAX_DROP" else f"/x/{m.group(1)}", line)
            calls.append(shlex.split(line)[1:])
    return calls


def test_workflow_uses_valid_needles_commands():
    wf = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    steps = wf["jobs"]["gate"]["steps"]
    calls = [c for s in steps if "run" in s for c in _needles_calls(s["run"])]
    subcommands = [c[0] for c in calls]
    assert "gate" in subcommands and "leaderboard" in subcommands
    parser = build_parser()
    for argv in calls:
        args = parser.parse_args(argv)  # an unknown option would exit here
        if argv[0] == "gate":
            assert args.baseline and args.candidate and args.report and args.max_drop == pytest.approx(0.02)
    # both evaluations log per-sample results (the gate needs them to pair) and use the same fixed data
    lm_eval_runs = [s["run"] for s in steps if "run" in s and "lm_eval run" in s["run"]]
    assert len(lm_eval_runs) == 2 and all("--log_samples" in r and '"$METADATA"' in r for r in lm_eval_runs)
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and "leaderboard.csv" in uploads[0]["with"]["path"] and uploads[0]["if"] == "always()"
    assert any(str(s.get("uses", "")).startswith("actions/cache/restore") for s in steps)


def test_gate_refuses_bad_settings_and_missing_inputs(tmp_path, capsys):
    assert main(["gate", "--baseline", "a", "--candidate", "b", "--alpha", "0.7"]) == 2
    assert "alpha" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["gate", "--baseline", str(missing), "--candidate", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["gate", "--baseline", str(empty), "--candidate", str(empty)]) == 2
    assert "no results_" in capsys.readouterr().err
