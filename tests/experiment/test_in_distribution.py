"""The experiment's in-distribution check: the held-out task of each training family joins both planned
evaluations (and the finetune's leakage check), and the comparison reports it first, outside the claim's Holm
family, with the sentence its two-sided paired test calls for (planted lm-eval results and sample logs)."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from scipy.stats import binomtest
from test_experiment_verdict import write_run

from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.in_distribution import with_in_distribution
from harness_ext.experiment.run import _plain, describe_plan
from harness_ext.experiment.verdict import compare_runs, to_markdown
from harness_ext.workflow.in_distribution import NOT_LEARNED, ROLE

KV, HELD = "kv_retrieval_simple", "synth_mdqa_templated_entities"
SYNTH = {"family": "synth_mdqa", "cell": "templated_entities", "num_samples": 4}


def values(data: dict, suite: list[dict] | None = None, **extra) -> dict:
    return {
        "name": "indist",
        "model": "smollm2",
        "finetune": {"data": data, "max_steps": 1},
        "metadata": {"lengths": [256], "depths": None, "num_samples": 60},
        "suite": suite or [{"task": KV, "role": "target", "metric": "value_acc"}],
        **extra,
    }


# (training data, held-out task, --metadata keys the check adds)
FAMILIES = [
    ({"variant": "simple", "lengths": [512]}, KV, {}),  # the suite scores it already: its settings govern
    (SYNTH, HELD, {"synth_num_samples": 20, "synth_num_documents": 10, "synth_positions": [1, 5, 10]}),
    (
        {"family": "synth_mdqa", "cell": "real", "lengths": [1024], "positions": [1, 5]},
        "synth_mdqa_real",
        {"synth_num_samples": 30, "synth_lengths": [1024], "synth_positions": [1, 5]},
    ),
    (
        {"family": "musique", "cell": "real", "lengths": [512], "placements": ["early", "late"]},
        "musique",
        {"musique_num_questions": 30, "musique_lengths": [512], "musique_placements": ["early", "late"]},
    ),
    ({"family": "summhay", "cell": "real"}, "summhay_citation", {"summhay_num_insights": 20, "summhay_num_gold": 2}),
    (
        {"family": "passkey", "lengths": [512, 1024], "depths": [0.25, 0.75]},
        "needles_passkey",
        {"passkey_num_samples": 15, "passkey_lengths": [512, 1024], "passkey_depths": [0.25, 0.75]},
    ),
]


@pytest.mark.parametrize("data,task,added", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_planned_evaluations_score_the_held_out_task_of_the_training_family(tmp_path, data, task, added):
    cfg = experiment_from_dict(values(data))
    text = describe_plan(cfg, tmp_path / "out")
    evals = [shlex.split(line) for line in text.splitlines() if line.startswith("lm_eval")]
    assert len(evals) == 2  # base and finetuned: the same tasks, the same documents
    for argv in evals:
        assert argv[argv.index("--tasks") + 1].split(",") == list(dict.fromkeys([task, KV]))
        metadata = json.loads(argv[argv.index("--metadata") + 1])
        assert metadata.items() >= added.items()
        assert metadata["lengths"] == [256]  # the target's own documents are untouched
    checked, ft = with_in_distribution(cfg, tmp_path / "out")
    assert checked.suite[0].role == ROLE and checked.suite[0].task == task
    assert checked.in_distribution["task"] == task and checked.in_distribution["disjoint"]
    assert task in ft.eval_tasks  # the finetune's leakage check covers the held-out documents


def test_shape_scored_otherwise_than_trained_is_recorded(tmp_path):
    checked, _ = with_in_distribution(experiment_from_dict(values({"variant": "simple", "lengths": [512]})), tmp_path)
    assert checked.in_distribution["differs"] == {"lengths": {"trained": [512], "scored": [256]}}


def test_size_option_off_switch_and_a_cell_without_held_out_task(tmp_path):
    small, _ = with_in_distribution(experiment_from_dict(values(SYNTH, in_distribution={"documents": 30})), tmp_path)
    assert small.metadata["synth_num_samples"] == 10  # 10 samples x 3 gold positions
    off, _ = with_in_distribution(experiment_from_dict(values(SYNTH, in_distribution=False)), tmp_path)
    assert [e.role for e in off.suite] == ["target"] and HELD not in off.tasks
    qa, _ = with_in_distribution(experiment_from_dict(values({"family": "musique", "cell": "symbolic"})), tmp_path)
    assert [e.role for e in qa.suite] == ["target"] and qa.in_distribution["task"] is None
    assert "no lm-eval task scores held-out rows of the musique:symbolic cell" in qa.in_distribution["missing"]
    with pytest.raises(NeedlesError, match=r"in_distribution.documents 0 is not a whole number >= 1"):
        experiment_from_dict(values(SYNTH, in_distribution={"documents": 0}))
    with pytest.raises(NeedlesError, match=r"in_distribution has unknown key\(s\) \['size'\]"):
        experiment_from_dict(values(SYNTH, in_distribution={"size": 3}))


def test_experiment_yaml_round_trips_without_adding_the_check_twice(tmp_path):
    checked, _ = with_in_distribution(experiment_from_dict(values(SYNTH)), tmp_path)
    saved = yaml.safe_load(yaml.safe_dump(_plain(checked)))
    assert [e["role"] for e in saved["suite"]] == ["target"]
    again, _ = with_in_distribution(experiment_from_dict(saved), tmp_path)
    assert again.suite == checked.suite and again.metadata == checked.metadata


BASE = [1.0] * 10 + [0.0] * 50
CASES = [  # (finetuned values on the held-out task, status, words the report must say)
    ([1.0] * 40 + [0.0] * 20, "learned", "The finetune learned its own task."),
    ([1.0] * 2 + [0.0] * 58, "not_learned", f"**{NOT_LEARNED[0].upper()}{NOT_LEARNED[1:]}.**"),
    ([1.0] * 9 + [0.0] * 51, "not_shown", "The finetune was not shown to learn its own task (MDE "),
]


@pytest.mark.parametrize("after,status,words", CASES, ids=[c[1] for c in CASES])
def test_comparison_reports_the_check_first_and_outside_the_claim(tmp_path, smollm2_dir, after, status, words):
    cfg, _ = with_in_distribution(experiment_from_dict(values(SYNTH)), tmp_path)
    kv_base, kv_new = [1.0] * 10 + [0.0] * 50, [1.0] * 40 + [0.0] * 20
    base = write_run(tmp_path / "b", {KV: ("value_acc", kv_base), HELD: ("best_subspan_em", BASE)}, str(smollm2_dir))
    new = write_run(tmp_path / "n", {KV: ("value_acc", kv_new), HELD: ("best_subspan_em", after)}, str(smollm2_dir))
    comparison = compare_runs(base, new, cfg)
    check = comparison["in_distribution"]
    assert list(comparison)[:2] == ["name", "in_distribution"]
    assert check["status"] == status and check["task"] == HELD and check["family"] == "synth_mdqa:templated_entities"
    up = sum(a > b for a, b in zip(after, BASE, strict=True))
    down = sum(a < b for a, b in zip(after, BASE, strict=True))
    assert check["delta"] == pytest.approx((up - down) / 60)
    assert check["p"] == pytest.approx(binomtest(up, up + down, 0.5).pvalue, rel=1e-9)  # exact McNemar, two-sided
    assert check["ci_level"] == pytest.approx(0.95) and check["ci"][0] <= check["delta"] <= check["ci"][1]
    assert ("mde" in check) == (status == "not_shown")
    # the claim's family is the suite the user wrote: one target, Holm p = p
    assert [r["task"] for r in comparison["tasks"]] == [KV]
    assert comparison["tasks"][0]["p_holm"] == comparison["tasks"][0]["p"] and comparison["claim_holds"]
    md = to_markdown(comparison)
    assert words in md
    assert md.index("## In-distribution check") < md.index(words) < md.index("| task | role | metric |")
    assert f"| {HELD} | synth_mdqa:templated_entities | best_subspan_em | 60 | 0.167 |" in md


def test_a_check_that_cannot_be_paired_or_has_no_task_says_why(tmp_path, smollm2_dir):
    cfg, _ = with_in_distribution(experiment_from_dict(values(SYNTH)), tmp_path)
    runs = [write_run(tmp_path / d, {KV: ("value_acc", BASE)}, str(smollm2_dir)) for d in ("b", "n")]
    check = compare_runs(*runs, cfg)["in_distribution"]
    assert check["status"] == "error" and f"task {HELD} is not in" in check["verdict"]
    qa, _ = with_in_distribution(experiment_from_dict(values({"family": "musique", "cell": "symbolic"})), tmp_path)
    comparison = compare_runs(*runs, qa)
    assert comparison["in_distribution"]["status"] == "unavailable"
    assert "No in-distribution check: no lm-eval task scores held-out rows" in to_markdown(comparison)
