"""Rows whose two sides are both at floor or both at ceiling read "uninformative" in the experiment, the
context-extension experiment and the study's "vs base", never "held" or "improved", and the claim is not shown."""

from __future__ import annotations

from planted import plant_run, values

from harness_ext.experiment.config import experiment_from_dict
from harness_ext.experiment.extension.report import compare_variants
from harness_ext.experiment.extension.report import to_markdown as extension_markdown
from harness_ext.experiment.verdict import compare_runs, to_markdown
from harness_ext.study.vs_base import cell
from harness_ext.workflow.informative import at_bound, both_at_bound

KV, GUARD = "kv_retrieval_simple", "niah_single"


def _cfg(**extra) -> object:
    return experiment_from_dict(
        {
            "name": "planted",
            "model": "smollm2",
            "bootstrap_iters": 500,
            "in_distribution": False,
            "suite": [
                {"task": KV, "role": "target", "metric": "value_acc"},
                {"task": GUARD, "role": "guard", "metric": "niah_acc", "margin": 0.05},
            ],
            **extra,
        }
    )


def test_bounds_are_exact():
    assert at_bound([0, 0, 0]) == "floor" and at_bound([1.0, 1.0]) == "ceiling"
    assert at_bound([0, 0, 1]) is None and at_bound([]) is None and at_bound([0.5]) is None
    assert both_at_bound([0, 0], [0, 0]) == "floor" and both_at_bound([0, 0], [0, 1]) is None
    assert both_at_bound([1, 1], [1, 1]) == "ceiling" and both_at_bound([0, 0], [1, 1]) is None


def test_a_guard_at_floor_on_both_sides_is_uninformative_not_held(tmp_path):
    improved = [1.0] * 30 + [0.0] * 10
    base = plant_run(tmp_path / "a", {**values(KV, "value_acc", [0.0] * 40), **values(GUARD, "niah_acc", [0.0] * 40)})
    new = plant_run(tmp_path / "b", {**values(KV, "value_acc", improved), **values(GUARD, "niah_acc", [0.0] * 40)})
    comparison = compare_runs(base, new, _cfg())
    kv, guard = comparison["tasks"]
    assert kv["verdict"] == "improved" and kv["pass"]
    # two zeros "hold" a 5-point margin with a tiny p: an empty pass the report must not call "held"
    assert guard["p_holm"] < 0.05
    assert (
        guard["verdict"] == "uninformative (both at floor)" and not guard["pass"] and guard["uninformative"] == "floor"
    )
    assert not comparison["claim_holds"] and comparison["verdict"].startswith("CLAIM NOT SHOWN")
    assert "uninformative row(s)" in comparison["verdict"] and GUARD in comparison["verdict"]
    md = to_markdown(comparison)
    assert "uninformative (both at floor)" in md and "held (non-inferior)" not in md


def test_a_target_at_ceiling_on_both_sides_is_uninformative(tmp_path):
    base = plant_run(tmp_path / "a", {**values(KV, "value_acc", [1.0] * 20), **values(GUARD, "niah_acc", [0.5] * 20)})
    new = plant_run(tmp_path / "b", {**values(KV, "value_acc", [1.0] * 20), **values(GUARD, "niah_acc", [0.5] * 20)})
    kv, guard = compare_runs(base, new, _cfg())["tasks"]
    assert kv["verdict"] == "uninformative (both at ceiling)" and "mde_text" not in kv
    assert guard["verdict"] == "held (non-inferior)"  # a guard off the bounds is tested as before


def _plan() -> dict:
    return {"native": 512, "target": 1024, "past": {"lengths": [800]}, "inside": {"lengths": [300]},
            "base_tasks": [KV, "kv_in"], "rope": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
            "hf_overrides": {}}  # fmt: skip


def test_the_extension_guard_held_on_two_zeros_reads_uninformative(tmp_path):
    """The measured SmolLM2 8K -> 16K run: every variant at 0, the guard 'held' with p 0.0001: an empty pass."""
    inside = [(str(i), 300, 0.0) for i in range(8)]
    past = [(str(8 + i), 800, 0.0) for i in range(8)]
    results = {
        "base": plant_run(tmp_path / "base", {KV: ("value_acc", inside)}),
        "training_free": plant_run(tmp_path / "free", {KV: ("value_acc", inside + past)}),
        "finetuned": plant_run(tmp_path / "tuned", {KV: ("value_acc", inside + past)}),
    }
    cfg = experiment_from_dict(
        {
            "name": "ext",
            "model": "smollm2",
            "bootstrap_iters": 500,
            "suite": [
                {"task": KV, "role": "target", "metric": "value_acc"},
                {"task": KV, "role": "guard", "metric": "value_acc", "margin": 0.05, "label": "kv_in"},
            ],
        }
    )
    comparison = compare_variants({k: {"chat": str(v)} for k, v in results.items()}, cfg, _plan(), [])
    target, guard = comparison["tasks"]
    assert guard["p"] < 0.01  # what the test alone would call "held"
    assert guard["verdict"] == "uninformative (both at floor)" and target["verdict"] == "uninformative (both at floor)"
    assert not comparison["claim_holds"] and "uninformative row(s)" in comparison["verdict"]
    assert "held (non-inferior)" not in extension_markdown(comparison)


def test_study_vs_base_marks_a_pair_at_one_bound_uninformative(tmp_path):
    from harness_ext.study.config import study_from_dict
    from harness_ext.study.steps import Study, make_runs
    from harness_ext.study.vs_base import vs_base

    cfg = study_from_dict(
        {"name": "s", "model": "smollm2", "reference_variant": "real", "variants": [{"name": "real"}, {"name": "up"}],
         "targets": [{"task": KV, "metric": "value_acc"}], "bootstrap_iters": 200}
    )  # fmt: skip
    study = Study(cfg, tmp_path, "/models/tiny", make_runs(cfg), {}, lambda argv: 0, print)
    done = {}
    for run, vals in (("base", [0.0] * 30), ("real", [0.0] * 30), ("up", [1.0] * 20 + [0.0] * 10)):
        path = plant_run(tmp_path / run / "eval", values(KV, "value_acc", vals))
        done[f"eval:{run}"] = {"results": str(path.relative_to(tmp_path))}
    tests = vs_base(study, done)
    assert (
        tests["real"][KV]["uninformative"] == "floor" and tests["real"][KV]["note"] == "uninformative (both at floor)"
    )
    assert cell(tests["real"][KV]).endswith("uninformative (both at floor)")
    assert "uninformative" not in tests["up"][KV] and "uninformative" not in cell(tests["up"][KV])
