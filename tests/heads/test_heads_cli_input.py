"""`needles heads` and `needles heads compare` refuse bad input: `needles: error:` + `  fix:`, exit 2, no
traceback, and no output file. Every case fails before any model generation (most before the model loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness_ext.cli import heads as cli_heads
from harness_ext.cli.app import main
from harness_ext.heads import scorefile
from harness_ext.heads.scores import DEFAULT_THRESHOLD

REPO = Path(__file__).resolve().parents[2]
NEEDLE = {"needle": "The code is 42.", "question": "What is the code?", "real_needle": "The code is 42."}


def _run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `needles heads ARGV`, in-process."""
    try:
        rc = main(["heads", *argv])
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        rc = exc.code
    return rc, capsys.readouterr().err


def _refused(capsys, *argv: str, says: str) -> str:
    rc, err = _run(capsys, *argv)
    assert rc == 2, err
    # The message is the last thing on stderr (transformers may draw a progress bar before it).
    message = err[err.rfind("needles: error:") :]
    assert ("\n" + err).count("\nneedles: error:") == 1 and "\n  fix: " in message and "Traceback" not in err, err
    assert says in err, err
    return err


@pytest.fixture
def needles(tmp_path) -> Path:
    path = tmp_path / "needles.jsonl"
    path.write_text(json.dumps(NEEDLE) + "\n")
    return path


@pytest.fixture
def scores(tmp_path) -> Path:
    report = {"schema": scorefile.SCHEMA, "scores": [[0.9, 0.0], [0.0, 0.3]], "threshold": 0.1, "model": {}}
    scorefile.write_json(tmp_path / "s.json", report)
    return tmp_path / "s.json"


# ------------------------------------------------------------------------------ numbers and choices
@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lengths", "0"], "--lengths 0 is below 1"),
        (["--kv-lengths", "512", "-5"], "--kv-lengths -5 is below 1"),
        (["--eval-lengths", "0"], "--eval-lengths 0 is below 1"),
        (["--depths", "0.5", "1.5"], "--depths 1.5 is outside [0, 1]"),
        (["--kv-depths", "-0.1"], "--kv-depths -0.1 is outside [0, 1]"),
        (["--eval-depths", "nan"], "--eval-depths nan is outside [0, 1]"),
        (["--kv-samples", "0"], "--kv-samples 0 is below 1"),
        (["--eval-samples", "0"], "--eval-samples 0 is below 1"),
        (["--draws", "0"], "--draws 0 is below 1"),
        (["--batch-size", "-1"], "--batch-size -1 is below 1"),
        (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens 0 is below 1"),
        (["--extra-tokens", "-1"], "--extra-tokens -1 is below 0"),
        (["--seed", "-3"], "--seed -3 is below 0"),
        (["--kv-seed", "-1"], "--kv-seed -1 is below 0"),
        (["--eval-seed", "-1"], "--eval-seed -1 is below 0"),
        (["--threshold", "-0.1"], "--threshold -0.1 is not a score"),
        (["--threshold", "inf"], "--threshold inf is not a score"),
        (["--mdqa-metadata", "{not json"], "--mdqa-metadata is not valid JSON"),
        (["--mdqa-metadata", "[1, 2]"], "--mdqa-metadata is not a JSON object"),
        (["--knockout", "top:0"], "is not top:K or random:K"),
        (["--knockout", "best:3"], "is not top:K or random:K"),
        (["--dtype", "float64"], "invalid choice: 'float64'"),
        (["--probes", "niah", "haystack"], "invalid choice: 'haystack'"),
        (["--knockout-task", "mdqa"], "invalid choice: 'mdqa'"),
        (["--lengths", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_numbers_and_choices_are_refused_before_anything_runs(capsys, tmp_path, needles, flags, says):
    out = tmp_path / "out"
    _refused(capsys, "--needles", str(needles), "--model", "/no/such/model", "-o", str(out), *flags, says=says)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--top-k", "0"], "--top-k 0 is below 1"),
        (["--threshold", "-1"], "--threshold -1.0 is not a score"),
        (["--top-k", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_compare_bad_numbers(capsys, tmp_path, scores, flags, says):
    _refused(capsys, "compare", str(scores), str(scores), "-o", str(tmp_path / "c.json"), *flags, says=says)
    assert not (tmp_path / "c.json").exists()


# ------------------------------------------------------------------------------ paths
def test_compare_paths(capsys, tmp_path, scores):
    _refused(capsys, "compare", str(tmp_path / "missing.json"), str(scores), says="does not exist")
    _refused(capsys, "compare", str(scores), str(tmp_path), says="is a folder, not a head scores file")
    (tmp_path / "half.json").write_text(scores.read_text()[:40])
    _refused(capsys, "compare", str(scores), str(tmp_path / "half.json"), says="not valid JSON")
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    _refused(capsys, "compare", str(tmp_path / "bin.json"), str(scores), says="not valid JSON")
    _refused(capsys, "compare", str(scores), str(scores), "-o", str(tmp_path), says="--output")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(capsys, "compare", str(scores), str(scores), "-o", str(blocker / "c.json"), says="is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.json", "file", "half.json", "s.json"]


def test_run_paths_are_checked_before_the_model_loads(capsys, tmp_path, needles, scores, tiny_llama_dir):
    out = tmp_path / "out"
    base = ["--needles", str(needles), "-o", str(out)]
    model = ["--model", str(tiny_llama_dir)]
    _refused(capsys, *base, "--model", str(tmp_path / "nope"), says="does not exist")
    _refused(capsys, *base, "--model", str(needles), says="is a file, not a model folder")
    _refused(capsys, *base, "--model", str(tmp_path), says="no config.json")
    _refused(capsys, *base, *model, "--adapter", str(tmp_path / "nope"), says="adapter folder")
    _refused(capsys, *base, *model, "--adapter", str(needles), says="is a file, not an adapter folder")
    _refused(capsys, *base, *model, "--adapter", str(tmp_path), says="no adapter_config.json")
    _refused(capsys, *model, "--needles", str(tmp_path / "none.jsonl"), "-o", str(out), says="does not exist")
    _refused(capsys, *model, "--needles", str(tmp_path), "-o", str(out), says="is a folder")
    (tmp_path / "bad.jsonl").write_text('["a list"]\n')
    _refused(capsys, *model, "--needles", str(tmp_path / "bad.jsonl"), "-o", str(out), says="lacks needle")
    _refused(capsys, *base, *model, "-o", str(needles), says="--output-dir")
    ko = [*base, *model, "--knockout", "top:1"]
    _refused(capsys, *ko, "--scores", str(tmp_path / "none.json"), says="does not exist")
    _refused(capsys, *ko, "--scores", str(tmp_path), says="is a folder")
    (tmp_path / "cut.json").write_text(scores.read_text()[:30])
    _refused(capsys, *ko, "--scores", str(tmp_path / "cut.json"), says="not valid JSON")
    _refused(capsys, *base, *model, "--scores", str(scores), says="--scores without --knockout")
    assert not out.exists()


def test_knockouts_the_model_cannot_satisfy_leave_no_output(capsys, tmp_path, needles, scores, tiny_llama_dir):
    """Checked after the (tiny) model loads and before detection: no heads.json from a doomed run."""
    out = tmp_path / "out"
    base = ["--needles", str(needles), "--model", str(tiny_llama_dir), "-o", str(out), "--quiet"]
    _refused(capsys, *base, "--knockout", "top:5", says="top:5 asks for more heads than the model has (4)")
    _refused(capsys, *base, "--knockout", "random:3", says="random:3: only 1 heads lie outside the top-3 set")
    big = tmp_path / "big.json"
    scorefile.write_json(big, {"schema": scorefile.SCHEMA, "scores": [[0.1] * 3] * 3, "threshold": 0.1})
    _refused(capsys, *base, "--scores", str(big), "--knockout", "top:1", says="3x3 head grid, the model 2x2")
    assert not out.exists()


def test_entry_point_prints_no_traceback(tmp_path):
    """The real console script, end to end: exit 2 and the two-line message."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("needles")), "heads", "compare", str(tmp_path / "a.json"), "b.json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"needles: error: head scores file {tmp_path / 'a.json'} does not exist\n  fix: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_default_threshold_is_the_library_default():
    """The CLI keeps its own copy (so `needles --help` imports no numpy); it must not drift."""
    assert cli_heads.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD == 0.1
