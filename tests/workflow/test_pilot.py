"""The pilot check: its size, its exact floor/ceiling rule on hand-made pilot results, and `needles experiment` /
`needles study` stopping before the long steps (exit 2, reason and fix) unless --skip-pilot-check. The evaluation
itself is replaced by a planted results file here (tests/workflow/test_pilot_lm_eval.py runs the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from planted import plant_run, values
from study_configs import kv_study

from harness_ext.cli import main
from harness_ext.core.errors import NeedlesError
from harness_ext.workflow import eval_step
from harness_ext.workflow.pilot import (
    EXTENSION,
    GUARD,
    IN_DISTRIBUTION,
    TARGET,
    PilotTask,
    check,
    enforce,
    pilot_argv,
    pilot_limit,
)

KV = "kv_retrieval_simple"


def test_pilot_size_covers_every_cell():
    assert pilot_limit([KV], {"lengths": [256], "depths": None}) == 20  # at least 20 documents
    assert pilot_limit([KV], {"lengths": [256, 512, 1024], "depths": [0.1, 0.5, 0.9]}) == 36  # 4 in each of 9 cells
    assert pilot_limit([KV, "niah_single"], {"niah_lengths": [512] * 2, "niah_depths": [0, 0.5, 1]}, limit=10) == 10
    argv = ["lm_eval", "run", "--tasks", KV, "--output_path", "/o/eval_base", "--limit", "100", "--log_samples"]
    assert pilot_argv(argv, Path("/o/pilot"), 20) == [
        "lm_eval", "run", "--tasks", KV, "--output_path", "/o/pilot", "--log_samples", "--limit", "20"
    ]  # fmt: skip


def _record(tmp_path: Path, vals: list[float], kind: str) -> dict:
    path = plant_run(tmp_path / "p", values(KV, "value_acc", vals))
    return check(path, [PilotTask("kv", KV, "value_acc", kind=kind)], 20)


@pytest.mark.parametrize(
    ("vals", "kind", "stops", "words"),
    [
        ([0.0] * 20, TARGET, True, "the comparison would most likely be two floors"),
        ([1.0] * 20, TARGET, True, "no room to improve"),
        ([0.0] * 20, GUARD, True, "it cannot drop"),
        ([1.0] * 20, GUARD, False, ""),  # a guard at ceiling can still drop
        ([0.0] * 20, EXTENSION, True, "no skill to extend"),
        ([1.0] * 20, EXTENSION, False, ""),  # what an extension target wants inside the window
        ([1.0] * 20, IN_DISTRIBUTION, True, "could not show that it learned its own task"),
        ([0.0] * 20, IN_DISTRIBUTION, False, ""),  # what the finetune is for
        ([1.0] + [0.0] * 19, TARGET, False, ""),  # one right answer: off the floor
        ([0.9] * 20, TARGET, False, ""),
    ],
)
def test_the_rule_stops_only_what_cannot_move(tmp_path, vals, kind, stops, words):
    record = _record(tmp_path, vals, kind)
    assert record["stops"] == stops and record["tasks"][0]["n"] == 20
    logged: list[str] = []
    if not stops:
        enforce(record, False, logged.append)
        assert "pilot check" in logged[0]
        return
    with pytest.raises(NeedlesError) as exc:
        enforce(record, False, logged.append)
    assert words in exc.value.problem and "--skip-pilot-check" in exc.value.fix
    assert "base rate below 0.14" in exc.value.problem or "base rate above 0.86" in exc.value.problem
    enforce(record, True, logged.append)  # skipped: said, not raised
    assert "going on (--skip-pilot-check)" in logged[-1]


def test_a_metric_the_task_does_not_report_is_named_with_those_it_does(tmp_path):
    """A misspelt metric (musique_f1 for MuSiQue's answer_f1) stops at the pilot, not when the report pairs the
    runs hours later."""
    path = plant_run(tmp_path / "p", values(KV, "value_acc", [0.0, 1.0] * 10))
    with pytest.raises(NeedlesError) as exc:
        check(path, [PilotTask("kv", KV, "value_accuracy")], 20)
    assert "no kv_retrieval_simple document carries metric 'value_accuracy'" in exc.value.problem
    assert exc.value.problem.endswith("the task reports: value_acc") and "kv" in exc.value.fix


def test_an_entry_reads_only_its_lengths(tmp_path):
    """A task piloted in two roles (a context extension's target at the window's edge, its guard at 300 tokens)
    scores both lengths in one call; each entry reads the documents of its own lengths (their per-length keys)."""
    docs = [(str(i), n, float(n == 300)) for i, n in enumerate([300, 384] * 10)]
    path = plant_run(tmp_path / "p", {KV: ("value_acc", docs)})
    samples = next((tmp_path / "p").glob("samples_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:  # what lm-eval logs beside the metric: its value under the document's length key
        row[f"value_acc_len{row['doc']['target_tokens']}"] = row["value_acc"]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = [PilotTask("kv_past", KV, "value_acc", kind=EXTENSION, lengths=(384,)),
               PilotTask("kv_in", KV, "value_acc", kind=GUARD, lengths=(300,)),
               PilotTask("kv_all", KV, "value_acc", kind=GUARD)]  # fmt: skip
    past, inside, both = check(path, entries, 20)["tasks"]
    assert (past["n"], past["mean"], past["lengths"]) == (10, 0.0, [384]) and "no skill to extend" in past["problem"]
    assert (inside["n"], inside["mean"], inside["problem"]) == (10, 1.0, None)
    assert (both["n"], both["mean"], both["problem"]) == (20, 0.5, None)


def _fake_eval(calls: list, kv_values: list[float], stop_after: int = 1):
    """run_eval stand-in: the pilot's evaluation writes planted all-zero KV results; a later one raises (it is
    how far the run got)."""

    def run_eval(argv, out, log_file=None, progress=None):
        calls.append(list(argv))
        if len(calls) > stop_after:
            raise NeedlesError(f"reached {out.name}", fix="-")
        return plant_run(Path(out), values(KV, "value_acc", kv_values))

    return run_eval


def test_experiment_stops_after_its_pilot_and_goes_on_with_the_flag(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(eval_step, "run_eval", _fake_eval(calls, [0.0] * 20))
    cfg = {
        "name": "p",
        "model": str(tiny_llama_dir),
        "finetune": {"recipe": "smollm2_kv_lora.yaml", "data": {"num_samples": 8}},
        "metadata": {"lengths": [256], "depths": None, "num_samples": 40},
        "suite": [{"task": KV, "role": "target", "metric": "value_acc"}],
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out), "--dry-run"]) == 0
    assert "# pilot check: the base model on the first 20 documents" in capsys.readouterr().out and not calls
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the pilot check stops the run" in err and "scored 0 on all 20 pilot documents" in err
    assert "--skip-pilot-check" in err and "2/7 pilot" in err
    assert calls[0][calls[0].index("--limit") + 1] == "20" and str(out / "pilot") in calls[0]
    saved = json.loads((out / "pilot.json").read_text())
    assert saved["stops"] and saved["tasks"][0]["bound"] == "floor" and not (out / "steps" / "eval_base.json").exists()
    # the flag: the finished pilot is kept (not rerun), the check says so and the base evaluation starts
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out), "--skip-pilot-check"]) == 2
    err = capsys.readouterr().err
    assert "2/7 pilot: done before, skipped" in err and "going on (--skip-pilot-check)" in err
    assert "reached eval_base" in err and len(calls) == 2 and "--limit" not in calls[1]


def test_study_stops_after_its_pilot(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(eval_step, "run_eval", _fake_eval(calls, [1.0] * 20))
    metadata = {"num_dicts": 4, "num_samples": 30, "lengths": None}
    cfg = kv_study(str(tiny_llama_dir), metadata=metadata, in_distribution=False)
    (tmp_path / "s.yaml").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "-o", str(out), "--dry-run"]) == 0
    assert "pilot check (the base model, first 40 documents per target)" in capsys.readouterr().err and not calls
    assert main(["study", str(tmp_path / "s.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no room to improve" in err and "0/" in err and (out / "pilot.json").is_file()
    assert calls[0][:2] == ["lm_eval", "run"] and "--limit" in calls[0]
    assert not (out / "steps" / "eval:base.json").exists() and not (out / "runs" / "real" / "finetune").exists()


def test_a_study_pilots_the_in_distribution_check(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Each run's held-out task is a row of the study's pilot: at ceiling it stops the study (no finetune could show
    it learned), named apart from the target that reads the same task."""
    calls: list = []
    monkeypatch.setattr(eval_step, "run_eval", _fake_eval(calls, [1.0] * 20))
    metadata = {"num_dicts": 4, "num_samples": 30, "lengths": None}
    cfg = kv_study(str(tiny_llama_dir), metadata=metadata, in_distribution={"documents": 20})
    (tmp_path / "s.yaml").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "in-distribution check in_distribution:kv_retrieval_simple: the base model scored 1 on all" in err
    assert "no room to improve" in err and "in_distribution: false" in err
    rows = {r["task"]: r for r in json.loads((out / "pilot.json").read_text())["tasks"]}
    assert rows[f"in_distribution:{KV}"]["kind"] == IN_DISTRIBUTION and rows[KV]["kind"] == TARGET
    assert len(rows) == 2  # one row per held-out task, not one per run
