"""The planning MDE (harness_ext.core.power) against known values and a brute-force simulation of McNemar's test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness_ext.core import power, stats


def test_known_value_and_connor_sample_size_round_trip():
    # the project's statistics notes: paired, n 500, 10% discordant, alpha 0.05 one-sided, power 0.8 -> ~3.5 points
    mde = power.mde_paired_binary(500, 0.05, 0.8, psi=0.10)
    assert mde == pytest.approx(0.0351, abs=5e-4)
    # Connor's sample-size formula, solved for n at that delta, gives back n = 500
    za, zb = stats.z(0.95), stats.z(0.8)
    n = (za * math.sqrt(0.10) + zb * math.sqrt(0.10 - mde**2)) ** 2 / mde**2
    assert n == pytest.approx(500, rel=1e-6)
    # close to the gate's exact MDE (the exact test is discrete, hence a little larger)
    assert stats.mcnemar_mde(500, 0.10, 0.05) == pytest.approx(mde, abs=0.003)


def _simulated_power(n: int, p10: float, p01: float, alpha: float, trials: int, seed: int) -> tuple[float, float]:
    """(asymptotic McNemar, exact McNemar) rejection rates of "second model better" over simulated paired data."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=trials)
    b, c = counts[:, 0], counts[:, 1]
    zstat = np.where(b + c > 0, (c - b) / np.sqrt(np.maximum(b + c, 1)), 0.0)
    asym = float(np.mean(zstat > stats.z(1 - alpha)))
    exact = float(np.mean([stats.mcnemar_one_sided(losses=int(ci), wins=int(bi)) <= alpha for bi, ci in zip(b, c)]))
    return asym, exact


@pytest.mark.parametrize(("n", "psi"), [(500, 0.10), (120, 0.30)])
def test_power_at_the_mde_is_the_stated_power_in_simulation(n, psi):
    alpha = 0.05
    mde = power.mde_paired_binary(n, alpha, 0.8, psi=psi)
    p01, p10 = (psi + mde) / 2, (psi - mde) / 2
    asym, exact = _simulated_power(n, p10, p01, alpha, trials=4000, seed=1)
    assert asym == pytest.approx(0.8, abs=0.03), (asym, mde)
    assert 0.70 <= exact <= 0.82, exact  # the exact test is conservative: at most a little below
    # half the MDE is detected far less often: the number is not an artefact of a loose test
    half, _ = _simulated_power(n, (psi - mde / 2) / 2, (psi + mde / 2) / 2, alpha, trials=2000, seed=2)
    assert half < 0.45


def test_independence_assumption_and_plan_marks():
    # independence at base rate 0.5 is the largest discordance: a larger MDE than any smaller stated psi
    assert power.independent_discordance(0.5, 0.1) == pytest.approx(0.5 * 0.4 + 0.6 * 0.5)
    indep = power.mde_paired_binary(60, 0.05, 0.8, p_base=0.5)
    assert indep > power.mde_paired_binary(60, 0.05, 0.8, psi=0.2)
    # n 24 at Holm's alpha / 3 cannot detect 10 points; n 2000 can
    small, large = power.plan("flenqa", 24, 0.05 / 3, effect=0.10), power.plan("kv", 2000, 0.05 / 3, effect=0.10)
    assert small.can_detect is False and large.can_detect is True
    unknown = power.plan("mdqa", None, 0.05)
    assert unknown.can_detect is None and "unknown" in unknown.text()
    text = power.format_plan([small, large, unknown], "[x]", 0.10)
    assert "flenqa: MDE 0." in text and "CANNOT DETECT" in text.splitlines()[1] and "[ok]" in text.splitlines()[2]
    # a base rate of 1 leaves no room to improve: nothing is detectable
    assert power.mde_paired_binary(100, 0.05, 0.8, p_base=1.0) is None
    assert power.power_paired_binary(100, 0.0, 0.2, 0.05) == 0.0


def test_tiny_n_detects_nothing():
    # 4 pairs all one way give p = 1/16: never below alpha 0.01, whatever the normal approximation says
    assert power.power_paired_binary(4, 1.0, 1.0, 0.01) == 0.0
    assert power.mde_paired_binary(4, 0.01, 0.8, psi=0.5) is None


def test_mde_beside_no_significant_in_the_experiment_report(tmp_path):
    """The experiment's comparison (real verdict code on lm-eval-schema runs) names the MDE beside "no significant"."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reporting"))
    from runs_fixture import write_run

    from harness_ext.experiment.verdict import compare_runs, to_markdown
    from harness_ext.workflow.mde import experiment_plan_blocks
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask

    base = [1.0] * 10 + [0.0] * 14
    new = [1.0] * 12 + [0.0] * 12  # +2 of 24: not significant
    b, n = write_run(tmp_path / "b", base), write_run(tmp_path / "n", new)
    cfg = ExperimentConfig("x", "m", [SuiteTask("kv_retrieval", "target", "value_acc")], metadata={"num_samples": 8})
    row = compare_runs(b, n, cfg)["tasks"][0]
    assert row["verdict"] == "no significant improvement" and row["mde"] > 0.2 and "at n 24" in row["mde_text"]
    assert f"no significant improvement ({row['mde_text']})" in to_markdown(compare_runs(b, n, cfg))
    # before the run: n from the metadata (3 KV subtasks x 8 samples x 2 lengths x 5 depths), marked
    text = "\n".join(experiment_plan_blocks(cfg))
    assert "kv_retrieval: MDE 0.1" in text and "at n 240" in text and "CANNOT DETECT" in text  # 0.5 assumed: ~13 points


def test_mde_beside_no_significant_in_the_study_report():
    from harness_ext.study.vs_base import cell, paired_test, with_holm

    test = paired_test(np.array([1.0] * 10 + [0.0] * 14), np.array([1.0] * 11 + [0.0] * 13), iters=100)
    found = with_holm({"run": {"mdqa": {**test, "mde": 0.41, "mde_text": "MDE 0.410 at n 24"}}})["run"]["mdqa"]
    assert found["note"] == "no significant change; MDE 0.410 at n 24" and cell(found).endswith("n.s.: MDE 0.410")


def test_the_in_distribution_check_is_planned_apart_from_the_targets():
    """The check's MDE is printed before the run, at its own level: two-sided alpha in an experiment (not in the
    claim's Holm family), Holm over the runs' checks in a study, one line per held-out task."""
    from harness_ext.study.config import study_from_dict
    from harness_ext.workflow.mde import experiment_plan_blocks, study_plan_blocks
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask

    own = SuiteTask("synth_mdqa_real", "in_distribution", "best_subspan_em", label="in_distribution:synth_mdqa_real")
    target = SuiteTask("kv_retrieval", "target", "value_acc")
    cfg = ExperimentConfig("x", "m", [own, target], metadata={"num_samples": 8, "synth_num_samples": 20})
    targets, check = experiment_plan_blocks(cfg)
    assert "kv_retrieval: MDE" in targets and "one-sided alpha 0.05;" in targets and "synth_mdqa" not in targets
    assert check.startswith("minimal detectable effect per in-distribution check")
    assert "in_distribution:synth_mdqa_real: MDE 0.2" in check and "at n 60 (power 80%, one-sided alpha 0.025;" in check
    assert len(experiment_plan_blocks(ExperimentConfig("x", "m", [target], metadata={"num_samples": 8}))) == 1

    study = study_from_dict(
        {"name": "s", "model": "smollm2", "reference_variant": "a", "variants": [{"name": n} for n in "abc"],
         "targets": [{"task": "kv_retrieval", "metric": "value_acc"}], "metadata": {"synth_num_samples": 40}}
    )  # fmt: skip
    checks = {"a": {"task": "synth_mdqa_real"}, "b": {"task": "synth_mdqa_real"}, "c": {"task": None}}
    targets, check = study_plan_blocks(study, 3, checks)
    assert "one-sided alpha 0.00833;" in targets  # 0.05 / (2 x 3 runs x 1 target)
    assert (
        check.count("in_distribution:synth_mdqa_real: MDE") == 1
        and "at n 120 (power 80%, one-sided alpha 0.0125;" in check
    )
    assert len(study_plan_blocks(study, 3, {})) == 1
