"""MuSiQue and SummHay as `needles experiment` and `needles study` targets: the experiment builds their fixtures
offline and keeps both tasks; a study names them as targets and finds their data before anything slow runs;
without data an optional target is left out with the source's fix."""

from __future__ import annotations

import json

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.data.qa_sources import MUSIQUE, SUMMHAY
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.study.config import study_from_dict
from harness_ext.study.plan import check_data
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture
from harness_ext.workflow.data_step import prepare_data

TARGETS = [
    {"task": "musique", "role": "target", "metric": "answer_f1"},
    {"task": "summhay_citation", "role": "target", "metric": "citation_f1", "optional": True},
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    for source in (MUSIQUE, SUMMHAY):
        monkeypatch.delenv(source.mirror_env, raising=False)
        monkeypatch.setenv(source.base_url_env, "http://127.0.0.1:9")  # the discard port: connection refused


def test_experiment_builds_both_fixtures_and_keeps_both_targets(tmp_path, offline):
    c = experiment_from_dict(
        {
            "name": "qa",
            "model": "smollm2",
            "suite": TARGETS,
            "fixtures": {"musique": {"num_questions": 4}, "summhay": {"num_documents": 8, "seed": 1}},
            "metadata": {"summhay_haystacks": ["news1"]},
        }
    )
    record = prepare_data(c, tmp_path / "fx", lambda m: None)
    assert record["suite"] == ["musique", "summhay_citation"] and record["skipped"] == []
    meta = record["metadata"]
    assert meta["musique_mirror"] == str(tmp_path / "fx" / "musique") and meta["allow_unofficial_data"] is True
    marker = json.loads((tmp_path / "fx" / "summhay" / "NEEDLES_FIXTURE.json").read_text())
    assert marker["num_documents"] == 8 and marker["seed"] == 1


def test_without_data_the_optional_target_is_left_out_with_the_fix(tmp_path, offline):
    c = experiment_from_dict({"name": "qa", "model": "smollm2", "suite": TARGETS, "fixtures": {"musique": {}}})
    logged: list[str] = []
    record = prepare_data(c, tmp_path / "fx", logged.append)
    assert record["suite"] == ["musique"]
    (skip,) = record["skipped"]
    assert skip["task"] == "summhay_citation" and "offline mirror" in skip["fix"]
    assert any("summhay_citation" in line for line in logged)


def test_study_names_both_tasks_as_targets(tmp_path, offline):
    write_musique_fixture(tmp_path / "m", num_questions=3)
    write_summhay_fixture(tmp_path / "s", num_documents=6)
    values = {
        "name": "qa_study",
        "model": "smollm2",
        "reference_variant": "real",
        "variants": [
            {"name": "real", "finetune": {"data": {"family": "synth_mdqa", "cell": "real"}}},
            {"name": "symbolic_kv", "finetune": {"data": {"family": "synth_mdqa", "cell": "symbolic_kv"}}},
        ],
        "targets": [{"task": "musique", "metric": "answer_f1"}, {"task": "summhay_citation", "metric": "citation_f1"}],
        "metadata": {
            "musique_mirror": str(tmp_path / "m"),
            "summhay_mirror": str(tmp_path / "s"),
            "allow_unofficial_data": True,
        },
        "heads": {"probes": ["kv"]},
        "knockout": {"task": "kv"},
        "patching": {"task": "kv"},
    }
    cfg = study_from_dict(values)
    assert [t.task for t in cfg.targets] == ["musique", "summhay_citation"]
    check_data(cfg)  # the fixtures are found (opted into as non-official data)
    values["metadata"] = {"musique_mirror": str(tmp_path / "nowhere")}
    with pytest.raises(NeedlesError, match="target musique"):
        check_data(study_from_dict(values))
