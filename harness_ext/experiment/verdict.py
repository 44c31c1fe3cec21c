"""The experiment's paired comparison and verdict: every suite task of the base run against the finetuned run.

Pairs come from the gate's reader (same documents, prompts and targets, joined on doc_id, per leaf task of a
group); every statistic comes from harness_ext.core.stats. Targets: a one-sided test that the finetuned model
is better (exact McNemar on 0/1 metrics, paired bootstrap otherwise). Guards: a non-inferiority test that the
drop is smaller than the margin (paired bootstrap on finetuned - base + margin; exact McNemar has no margin
form). Holm across the whole family. The claim holds when every target improved and every guard held.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness_ext.core import stats
from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.config import ExperimentConfig, SuiteTask
from harness_ext.experiment.mde import beside
from harness_ext.reporting.gate_pairing import check_task_compatible, load_one_run, load_pairs
from harness_ext.reporting.results_io import Run


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
    """One task's comparison: means, delta with its (1 - 2 alpha) interval, the one-sided p-value."""
    delta = new - base
    binary = bool(np.isin(base, (0.0, 1.0)).all() and np.isin(new, (0.0, 1.0)).all())
    # core.stats' bootstrap tests "mean < 0"; on -(delta + margin) that is H1: delta > -margin (improvement
    # when the margin is 0, non-inferiority otherwise)
    boot = stats.paired_bootstrap(-(delta + entry.margin), cfg.alpha, cfg.bootstrap_iters, cfg.seed)
    low, high = -boot.ci[1] - entry.margin, -boot.ci[0] - entry.margin
    if binary:
        both, base_only, new_only, neither = stats.paired_binary_counts(base, new)
        low, high = stats.newcombe_paired_ci(both, base_only, new_only, neither, level=1 - 2 * cfg.alpha)
    if entry.role == "target" and binary:
        method = "exact McNemar (one-sided: finetuned better)"
        p = stats.mcnemar_one_sided(losses=new_only, wins=base_only)  # "base worse than finetuned"
    elif entry.role == "target":
        method, p = "paired bootstrap (one-sided: finetuned better)", boot.p_value
    else:
        method, p = f"paired bootstrap non-inferiority (drop < {entry.margin:g})", boot.p_value
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
    }
    if binary:
        out["discordant"] = {"only_base_right": base_only, "only_finetuned_right": new_only}
    return out


def compare_runs(
    base_path: str | Path, new_path: str | Path, cfg: ExperimentConfig, skipped: list[dict] | None = None
) -> dict:
    """The whole comparison: per-task tests, Holm across them, per-task verdicts and the claim's verdict.
    ``skipped``: optional suite tasks left out for want of data; the verdict then says it is partial."""
    base, new = load_one_run(base_path, "baseline"), load_one_run(new_path, "candidate")
    rows, values = [], []
    for entry in cfg.suite:
        b, n, leaves = paired_values(base, new, entry)
        rows.append({**compare_entry(entry, b, n, cfg), "leaf_tasks": leaves})
        values.append((b, n))
    for row, (b, n), p_holm in zip(rows, values, stats.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        shown = p_holm < cfg.alpha
        row["verdict"] = (
            ("improved" if shown else "no significant improvement")
            if row["role"] == "target"
            else ("held (non-inferior)" if shown else "not shown to hold (possible regression)")
        )
        row["pass"] = shown
        if row["role"] == "target" and not shown:
            # what this n could have detected (at Holm's first step), so "no significant" is not read as "no effect"
            found = beside(b, n, cfg.alpha / len(rows))
            row["mde"], row["mde_text"] = found["mde"], found["text"]
    holds = all(r["pass"] for r in rows)
    skipped = list(skipped or [])
    verdict = "CLAIM HOLDS" if holds else "CLAIM NOT SHOWN"
    if skipped:
        verdict += f" (on the tasks run; {len(skipped)} optional task(s) not run: no data)"
    return {
        "name": cfg.name,
        "alpha": cfg.alpha,
        "correction": "Holm over all suite tasks run",
        "claim_holds": holds,
        "verdict": verdict,
        "tasks": rows,
        "skipped": skipped,
        "base_results": str(base.path),
        "finetuned_results": str(new.path),
    }


def to_markdown(comparison: dict, reference: dict | None = None) -> str:
    """The comparison table (and the published numbers beside ours when a reference is given)."""
    ref = reference or {}
    head = "| task | role | metric | n | base | finetuned | delta | CI | p | Holm p | verdict |"
    if ref:
        head += " published (paper) |"
    lines = [
        f"# Experiment {comparison['name']}: {comparison['verdict']}",
        "",
        f"alpha = {comparison['alpha']}, {comparison['correction']}; CI = {comparison['tasks'][0]['ci_level']:.0%} "
        "paired interval of the delta (finetuned - base).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in comparison["tasks"]:
        role = r["role"] + (f" (margin {r['margin']:g})" if r["role"] == "guard" else "")
        line = (
            f"| {r['task']} | {role} | {r['metric']} | {r['n']} | {r['base']:.3f} | {r['finetuned']:.3f} | "
            f"{r['delta']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['p']:.3g} | {r['p_holm']:.3g} | "
            f"{r['verdict']}{' (' + r['mde_text'] + ')' if r.get('mde_text') else ''} |"
        )
        if ref:
            line += f" {ref.get(r['task'], '')} |"
        lines.append(line)
    for r in comparison.get("skipped", []):
        reason = str(r["reason"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['task']} | {r['role']} | | | | | | | | | not run: {reason} |" + (" |" if ref else ""))
    lines += ["", f"Base: {comparison['base_results']}", f"Finetuned: {comparison['finetuned_results']}"]
    for r in comparison.get("skipped", []):
        lines.append(f"{r['task']} was not run: {r['reason']}" + (f" Fix: {r['fix']}" if r.get("fix") else ""))
    return "\n".join(lines) + "\n"
