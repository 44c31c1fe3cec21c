"""Paired per-sample statistics of one suite task between two lm-eval runs: the leaf tasks of a group, the
per-sample values joined on doc_id (the gate's reader), and one task's test (means, delta, interval, p-value).

Every statistic comes from harness_ext.core.stats; the experiment's verdict, the extension experiment and the
study's comparisons against the base model all pair their runs here.
"""

from __future__ import annotations

import numpy as np

from harness_ext.core import stats
from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.gate_pairing import check_task_compatible, load_pairs
from harness_ext.reporting.results_io import Run
from harness_ext.tasklib.breakdowns import lower_is_better
from harness_ext.workflow.suite import ExperimentConfig, SuiteTask


def leaf_tasks(run: Run, task: str) -> list[str]:
    """The leaf tasks lm-eval ran for ``task`` (itself, or its group's subtasks, recursively)."""
    groups = run.data.get("group_subtasks") or {}
    if task not in groups:
        if task not in run.data["results"]:
            raise NeedlesError(f"task {task} is not in {run.path}", fix="check the suite's task names")
        return [task]
    return [leaf for sub in groups[task] for leaf in leaf_tasks(run, sub)]


def paired_values(base: Run, new: Run, entry: SuiteTask) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-sample (base, finetuned) values of ``entry.metric`` over every leaf task, and the leaves."""
    leaves = leaf_tasks(base, entry.task)
    if sorted(leaves) != sorted(leaf_tasks(new, entry.task)):
        raise NeedlesError(f"{entry.task}: the two runs ran different subtasks", fix="evaluate both the same way")
    b_all, n_all = [], []
    for leaf in leaves:
        if base.samples_path(leaf) is None or new.samples_path(leaf) is None:
            raise NeedlesError(f"{leaf}: no per-sample log in one of the runs", fix="run lm_eval with --log_samples")
        check_task_compatible(base, new, leaf)
        pairs = load_pairs(base, new, leaf, [(entry.metric, entry.filter)])[(entry.metric, entry.filter)]
        b_all.append(pairs.baseline)
        n_all.append(pairs.candidate)
    b, n = np.concatenate(b_all), np.concatenate(n_all)
    if len(b) == 0:
        raise NeedlesError(
            f"{entry.task}: no sample carries metric {entry.metric!r} (filter {entry.filter!r})",
            fix="name a per-sample metric of that task in the suite (see its samples_*.jsonl)",
        )
    return b, n, leaves


def compare_entry(entry: SuiteTask, base: np.ndarray, new: np.ndarray, cfg: ExperimentConfig) -> dict:
    """One task's comparison: means, delta (finetuned - base, in the metric's units) with its (1 - 2 alpha)
    interval, the one-sided p-value. For a loss (``lower_is_better``: nll, ppl) the improvement is a decrease and a
    guard's margin bounds a rise; the test runs on the gain, the sign-flipped delta, and continuous values get the
    paired bootstrap."""
    delta = new - base
    sign = -1.0 if lower_is_better(entry.metric) else 1.0
    gain = sign * delta
    binary = sign > 0 and bool(np.isin(base, (0.0, 1.0)).all() and np.isin(new, (0.0, 1.0)).all())
    # core.stats' bootstrap tests "mean < 0"; on -(gain + margin) that is H1: gain > -margin (improvement
    # when the margin is 0, non-inferiority otherwise)
    boot = stats.paired_bootstrap(-(gain + entry.margin), cfg.alpha, cfg.bootstrap_iters, cfg.seed)
    gain_low, gain_high = -boot.ci[1] - entry.margin, -boot.ci[0] - entry.margin
    low, high = sorted((sign * gain_low, sign * gain_high))
    if binary:
        both, base_only, new_only, neither = stats.paired_binary_counts(base, new)
        low, high = stats.newcombe_paired_ci(both, base_only, new_only, neither, level=1 - 2 * cfg.alpha)
    if entry.role == "target" and binary:
        method = "exact McNemar (one-sided: finetuned better)"
        p = stats.mcnemar_one_sided(losses=new_only, wins=base_only)  # "base worse than finetuned"
    elif entry.role == "target":
        better = "finetuned lower" if sign < 0 else "finetuned better"
        method, p = f"paired bootstrap (one-sided: {better})", boot.p_value
    else:
        worse = "rise" if sign < 0 else "drop"
        method, p = f"paired bootstrap non-inferiority ({worse} < {entry.margin:g})", boot.p_value
    out = {
        "task": entry.name,
        "lm_eval_task": entry.task,
        "role": entry.role,
        "metric": entry.metric,
        "margin": entry.margin,
        "n": int(len(base)),
        "base": float(base.mean()),
        "finetuned": float(new.mean()),
        "delta": float(delta.mean()),
        "ci": [float(low), float(high)],
        "ci_level": 1 - 2 * cfg.alpha,
        "p": float(p),
        "method": method,
        "lower_is_better": sign < 0,
    }
    if binary:
        out["discordant"] = {"only_base_right": base_only, "only_finetuned_right": new_only}
    return out
