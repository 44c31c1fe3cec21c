"""Regression gate: is the candidate run significantly worse than the baseline on the same documents?

``run_gate`` ties the parts together: gate_pairing (load, check comparability, pair per-sample results on
(task, doc_id, filter)), gate_compare (one-sided test per gated metric, Holm, verdict) and gate_report (text,
Markdown and JSON). This module is the gate's public API and re-exports what callers use.
"""

from __future__ import annotations

from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.effective_length import default_rules
from harness_ext.reporting.gate_compare import Comparison, compare_paired, compare_unpaired, decide
from harness_ext.reporting.gate_length import check_lengths
from harness_ext.reporting.gate_pairing import (
    GateConfig,
    IncomparableRuns,
    check_task_compatible,
    gated_metrics,
    load_one_run,
    load_pairs,
    task_list,
)
from harness_ext.reporting.gate_report import GateReport, to_json_text, to_markdown, to_text
from harness_ext.reporting.leaderboard_rows import model_identity

__all__ = [
    "Comparison",
    "GateConfig",
    "GateReport",
    "IncomparableRuns",
    "compare_paired",
    "decide",
    "run_gate",
    "to_json_text",
    "to_markdown",
    "to_text",
]


def _check_config(config: GateConfig) -> None:
    """Refuse settings no test can use, naming the flag (a gate must never pass on a meaningless alpha)."""
    checks = (
        ("--alpha", config.alpha, 0 < config.alpha < 0.5, "a significance level between 0 and 0.5, e.g. 0.05"),
        ("--power", config.power, 0 < config.power < 1, "a power between 0 and 1, e.g. 0.8"),
        ("--max-drop", config.max_drop, config.max_drop >= 0, "a tolerated drop of 0 or more, e.g. 0.02"),
        ("--bootstrap-iters", config.bootstrap_iters, config.bootstrap_iters >= 100, "at least 100, e.g. 10000"),
        ("--seed", config.seed, config.seed >= 0, "a seed of 0 or more"),
    )
    for flag, value, ok, fix in checks:
        if not ok:
            raise NeedlesError(f"{flag} {value} is out of range", fix=f"use {fix}")
    if config.effective_length:
        default_rules(config.threshold, config.relative)  # exit 2 on a threshold outside the 0-100 scale


def run_gate(baseline: str | Path, candidate: str | Path, config: GateConfig | None = None) -> GateReport:
    """Compare two lm-eval runs; raises NeedlesError / IncomparableRuns for invalid or incomparable input."""
    config = config or GateConfig()
    _check_config(config)
    base, cand = load_one_run(baseline, "baseline"), load_one_run(candidate, "candidate")
    notes: list[str] = []
    plan = []
    for task in task_list(base, cand, config):
        check_task_compatible(base, cand, task)
        metrics = gated_metrics(base, cand, task, config)
        if not metrics:
            continue
        paired = config.paired and base.samples_path(task) is not None and cand.samples_path(task) is not None
        if not paired:
            why = "--unpaired was given" if not config.paired else "per-sample logs (--log_samples) are missing"
            notes.append(
                f"{task}: UNPAIRED fallback (z-test from value and stderr) because {why}; "
                "it needs a larger effect than a paired test to detect a drop"
            )
        plan.append((task, metrics, paired))
    if not plan:
        raise NeedlesError("no metric to gate", fix="check --metrics / --tasks against the results")
    m = sum(len(metrics) for _, metrics, _ in plan)
    alpha_mde = config.alpha / m  # Holm's first step: the level a single metric faces in the worst case
    comparisons: list[Comparison] = []
    for task, metrics, paired in plan:
        hib_map = base.section("higher_is_better", task)
        pairs = load_pairs(base, cand, task, metrics) if paired else {}
        for metric, filt in metrics:
            hib = hib_map.get(metric)
            if hib is None:
                hib = True
                notes.append(f"{task}: {metric} has no higher_is_better; assuming higher is better")
            if not paired:
                comparisons.append(
                    compare_unpaired(base, cand, task, metric, filt, hib, config.alpha, config, alpha_mde)
                )
                continue
            values = pairs[(metric, filt)]
            if len(values.baseline) == 0:
                raise IncomparableRuns(f"{task}: no samples scored {metric}")
            comparisons.append(
                compare_paired(task, metric, filt, values.baseline, values.candidate, hib, config, alpha_mde)
            )
    decide(comparisons, config)
    lengths = []
    if config.effective_length:
        rules = default_rules(config.threshold, config.relative)
        lengths = check_lengths(base, cand, rules, config.tasks, config.seed)
    b_model, c_model = (" + ".join(x for x in model_identity(r) if x) for r in (base, cand))
    return GateReport(str(base.path), str(cand.path), b_model, c_model, config, comparisons, notes, lengths)
