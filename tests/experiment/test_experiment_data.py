"""The experiment's data step on real files: fixtures are built and used, every suite task's data is checked
before anything slow runs, optional tasks without data are left out (and said so), others stop the run;
a resumed experiment refuses a changed suite or a changed command instead of mixing runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import FLENQA, LOST_IN_THE_MIDDLE, RETRIEVAL_HEAD
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.verdict import to_markdown
from harness_ext.tasklib.data_needs import data_needs
from harness_ext.tasklib.mdqa import ORACLE_FILE, official_path
from harness_ext.workflow.data_step import prepare_data
from harness_ext.workflow.steps import Step, StepRunner


def cfg(suite: list[dict], metadata: dict | None = None, fixtures: dict | None = None):
    return experiment_from_dict(
        {"name": "d", "model": "smollm2", "suite": suite, "metadata": metadata or {}, "fixtures": fixtures or {}}
    )


KV = {"task": "kv_retrieval_simple", "role": "target", "metric": "value_acc"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No mirror, an empty cache and an unreachable download address: what a machine without network has."""
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    for source in (LOST_IN_THE_MIDDLE, FLENQA, RETRIEVAL_HEAD):
        monkeypatch.delenv(source.mirror_env, raising=False)
        monkeypatch.setenv(source.base_url_env, "http://127.0.0.1:9")  # the discard port: connection refused


def test_data_needs_name_the_files_each_family_reads():
    assert data_needs("kv_retrieval_simple", {}) == []
    assert data_needs("mdqa_closedbook", {}) == [(LOST_IN_THE_MIDDLE, ORACLE_FILE)]
    assert data_needs("mdqa20_pos5", {}) == [(LOST_IN_THE_MIDDLE, official_path(20, 4))]
    sweep = data_needs("mdqa_sweep", {"mdqa_num_documents": 10, "mdqa_positions": [1, 3]})
    assert sweep == [(LOST_IN_THE_MIDDLE, official_path(10, 0))]  # position 3 is derived from gold_at_0
    assert {s.name for s, _ in data_needs("niah_single", {})} == {"retrieval-head"}
    assert len(data_needs("niah_single", {})) == 4  # the needles and three haystack parts
    assert data_needs("synth_mdqa_symbolic_kv", {}) == [(LOST_IN_THE_MIDDLE, ORACLE_FILE)]
    assert len(data_needs("synth_mdqa_natural_in_prose", {"synth_reference_needles": True})) == 2
    assert data_needs("flenqa", {})[0][0] is FLENQA


def test_flenqa_fixture_is_built_and_becomes_the_mirror(tmp_path, offline):
    c = cfg(
        [KV, {"task": "flenqa", "role": "target", "metric": "acc"}],
        fixtures={"flenqa": {"ctx_sizes": [250], "instances": 1}},
    )
    record = prepare_data(c, tmp_path / "fixtures", lambda m: None)
    folder = tmp_path / "fixtures" / "flenqa"
    assert record["metadata"]["flenqa_mirror"] == str(folder) and record["metadata"]["allow_unofficial_data"]
    assert record["suite"] == ["kv_retrieval_simple", "flenqa"] and record["skipped"] == []
    assert json.loads((folder / "NEEDLES_FIXTURE.json").read_text())["label"].startswith("FLenQA FIXTURE")


def test_optional_tasks_without_data_are_left_out_and_said_so(tmp_path, offline):
    logged: list[str] = []
    c = cfg(
        [
            KV,
            {"task": "niah_single", "role": "target", "metric": "niah_success", "optional": True},
            {"task": "mdqa_closedbook", "role": "guard", "metric": "best_subspan_em", "margin": 0.05, "optional": True},
        ]
    )
    record = prepare_data(c, tmp_path / "fixtures", logged.append)
    assert record["suite"] == ["kv_retrieval_simple"]
    assert [(s["task"], s["role"]) for s in record["skipped"]] == [
        ("niah_single", "target"),
        ("mdqa_closedbook", "guard"),
    ]
    assert all(s["reason"] and s["fix"] for s in record["skipped"])
    assert any("niah_single" in m and "left out" in m for m in logged)
    # the comparison says which tasks were not run and why
    comparison = {
        "name": "d", "verdict": "CLAIM HOLDS (on the tasks run; 2 optional task(s) not run: no data)",
        "alpha": 0.05, "correction": "Holm", "base_results": "a", "finetuned_results": "b",
        "tasks": [{"task": KV["task"], "role": "target", "metric": "value_acc", "n": 3, "base": 0.0, "finetuned": 1.0,
                   "delta": 1.0, "ci": [0.5, 1.0], "ci_level": 0.95, "p": 0.01, "p_holm": 0.01, "verdict": "improved"}],
        "skipped": record["skipped"],
    }  # fmt: skip
    md = to_markdown(comparison)
    assert md.count("| not run:") == 2 and "mdqa_closedbook was not run" in md


def test_missing_data_of_a_required_task_stops_before_anything_runs(tmp_path, offline):
    c = cfg([KV, {"task": "mdqa_closedbook", "role": "guard", "metric": "best_subspan_em", "margin": 0.05}])
    with pytest.raises(NeedlesError) as err:
        prepare_data(c, tmp_path / "fixtures", lambda m: None)
    assert ORACLE_FILE in str(err.value) or "download" in str(err.value).lower()
    only_optional = cfg([{**KV, "task": "niah_single", "metric": "niah_success", "optional": True}])
    with pytest.raises(NeedlesError, match="no target task has its data"):
        prepare_data(only_optional, tmp_path / "fixtures2", lambda m: None)


def test_mdqa_fixture_from_the_real_oracle_file(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    c = cfg(
        [KV, {"task": "mdqa_sweep", "role": "target", "metric": "best_subspan_em"}],
        metadata={"mdqa_mirror": str(shared_data / "lost-in-the-middle"), "mdqa_num_documents": 10},
        fixtures={"mdqa": {"documents": [10], "num_questions": 40}},
    )
    record = prepare_data(c, tmp_path / "fixtures", lambda m: None)
    assert record["metadata"]["mdqa_mirror"] == str(tmp_path / "fixtures" / "mdqa")
    assert record["suite"] == ["kv_retrieval_simple", "mdqa_sweep"]
    assert (tmp_path / "fixtures" / "mdqa" / official_path(10, 0)).is_file()


def test_a_fixture_that_cannot_be_built_skips_its_optional_tasks(tmp_path, offline):
    c = cfg(
        [KV, {"task": "mdqa_sweep", "role": "target", "metric": "best_subspan_em", "optional": True}],
        fixtures={"mdqa": {"documents": [10]}},
    )
    record = prepare_data(c, tmp_path / "fixtures", lambda m: None)
    assert record["suite"] == ["kv_retrieval_simple"] and record["skipped"][0]["task"] == "mdqa_sweep"
    assert "mdqa_mirror" not in record["metadata"]  # never the official files in place of the fixture asked for


@pytest.mark.parametrize(
    "change,message",
    [
        ({"fixtures": {"ruler": {}}}, "unknown fixture 'ruler'"),
        ({"fixtures": {"flenqa": {"sizes": [1]}}}, "fixtures.flenqa has unknown options"),
        ({"suite": [{**KV, "optional": "yes"}]}, "optional 'yes' is not true or false"),
    ],
)
def test_bad_data_settings_are_refused_by_name(change, message):
    with pytest.raises(NeedlesError, match=message):
        experiment_from_dict({"name": "d", "model": "smollm2", "suite": [KV], **change})


def test_a_finished_step_of_another_command_is_refused(tmp_path):
    runner = StepRunner(tmp_path, lambda m: None)
    runs = []
    runner.run([Step("a", ["echo", "1"], lambda: runs.append(1) or {"x": 1})])
    assert runner.run([Step("a", ["echo", "1"], lambda: runs.append(2) or {"x": 2})]) == {"a": {"x": 1}}
    with pytest.raises(NeedlesError, match="finished with another command") as err:
        runner.run([Step("a", ["echo", "2"], lambda: runs.append(3) or {"x": 3})])
    assert shlex.join(["echo", "1"]) in str(err.value) and str(runner.marker("a")) in err.value.fix
    assert runs == [1]
    assert runner.run([Step("a", ["echo", "2"], lambda: {"x": 3}, same_command=False)]) == {"a": {"x": 1}}


def test_a_resumed_experiment_refuses_a_changed_suite(tmp_path, shared_data, capsys):
    import yaml

    from harness_ext.cli import main

    litm = str(shared_data / "lost-in-the-middle")
    first = {"name": "d", "model": "smollm2", "metadata": {"mdqa_mirror": litm}, "suite": [KV]}
    out = tmp_path / "out"
    out.mkdir()
    record = prepare_data(experiment_from_dict(first), out / "fixtures", lambda m: None)
    (out / "steps").mkdir()
    (out / "steps" / "data.json").write_text(json.dumps({"name": "data", "command": "x", "outputs": record}))
    changed = {**first, "suite": [KV, {"task": "mdqa_closedbook", "role": "guard", "metric": "best_subspan_em"}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(changed))
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another suite (kv_retrieval_simple)" in err and "fix:" in err
    assert not (out / "eval_base").exists()


def test_the_packaged_demo_experiment_is_the_example(tmp_path):
    from harness_ext.experiment.config import load_experiment, packaged_experiment

    repo = Path(__file__).resolve().parents[2]
    shipped = packaged_experiment("smollm2_cpu.yaml")
    assert shipped.read_bytes() == (repo / "examples" / "experiments" / "smollm2_cpu.yaml").read_bytes()
    demo = load_experiment(shipped)
    offline_ready = [e.task for e in demo.suite if not e.optional]
    assert all(not data_needs(t, demo.metadata) or t.startswith("flenqa") for t in offline_ready)
    assert "flenqa" in demo.fixtures  # FLenQA's only offline form is the fixture


def test_training_data_that_leaks_stops_in_the_data_step(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """The finetune's training documents are generated and checked against the scored ones in the data step: a
    leak (passkey training documents drawn with the task's own seed) stops the run before any evaluation."""
    import yaml

    from harness_ext.cli import main
    from harness_ext.workflow import eval_step

    calls: list = []
    monkeypatch.setattr(eval_step, "run_eval", lambda argv, out, **kw: calls.append(argv))
    meta = {"passkey_lengths": [256], "passkey_depths": [0.5], "passkey_num_samples": 2}
    passkey = {"task": "needles_passkey", "role": "target", "metric": "passkey_acc"}
    data = {"family": "passkey", "lengths": [256], "depths": [0.5], "num_samples": 2, "seed": 0}
    experiment = {"name": "leak", "model": str(tiny_llama_dir), "metadata": meta, "suite": [passkey],
                  "finetune": {"data": data, "max_steps": 1}}  # fmt: skip
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(experiment))
    out = tmp_path / "out"
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1/7 data" in err and "also appear in the evaluation set needles_passkey" in err and "fix:" in err
    assert not calls and not (out / "steps" / "data.json").exists() and not (out / "pilot").exists()
    # without the leak, the data step's marker records what was checked; the run goes on to the evaluations
    experiment["finetune"]["data"]["seed"] = 1
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(experiment))
    monkeypatch.setattr(eval_step, "run_eval", _stop_at_first_eval)
    assert main(["experiment", str(tmp_path / "e.yaml"), "-o", str(out), "--skip-pilot-check"]) == 2
    assert "reached eval_base" in capsys.readouterr().err
    training = json.loads((out / "steps" / "data.json").read_text())["outputs"]["training"]
    assert training == {"documents": 2, "eval_tasks": ["needles_passkey"], "eval_docs": 2}


def _stop_at_first_eval(argv, out, **kw):
    raise NeedlesError(f"reached {Path(out).name}", fix="-")
