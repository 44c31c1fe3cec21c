"""The experiment's paired comparison and verdict: every suite task of the base run against the finetuned run.

Pairs come from the gate's reader (same documents, prompts and targets, joined on doc_id, per leaf task of a
group); every statistic comes from harness_ext.core.stats. Targets: a one-sided test that the finetuned model
is better (exact McNemar on 0/1 metrics, paired bootstrap otherwise). Guards: a non-inferiority test that the
drop is smaller than the margin (paired bootstrap on finetuned - base + margin; exact McNemar has no margin
form). Holm across the whole family. The claim holds when every target improved and every guard held; a row whose
two sides are both at floor or both at ceiling is uninformative, neither (harness_ext.workflow.informative).
"""

from __future__ import annotations

from pathlib import Path

from harness_ext.core import stats
from harness_ext.experiment.in_distribution import in_distribution_result
from harness_ext.experiment.in_distribution import markdown as in_distribution_markdown
from harness_ext.reporting.gate_pairing import load_one_run
from harness_ext.workflow.in_distribution import ROLE
from harness_ext.workflow.informative import claim_note, mark_row
from harness_ext.workflow.mde import beside
from harness_ext.workflow.paired import compare_entry, paired_values
from harness_ext.workflow.suite import ExperimentConfig


def compare_runs(
    base_path: str | Path, new_path: str | Path, cfg: ExperimentConfig, skipped: list[dict] | None = None
) -> dict:
    """The whole comparison: per-task tests, Holm across them, per-task verdicts and the claim's verdict.
    ``skipped``: optional suite tasks left out for want of data; the verdict then says it is partial."""
    base, new = load_one_run(base_path, "baseline"), load_one_run(new_path, "candidate")
    rows, values = [], []
    for entry in [e for e in cfg.suite if e.role != ROLE]:  # the in-distribution check is not part of the claim
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
        mark_row(row, b, n)  # both sides at floor or at ceiling: neither improved nor held
    holds = all(r["pass"] for r in rows)
    skipped = list(skipped or [])
    verdict = ("CLAIM HOLDS" if holds else "CLAIM NOT SHOWN") + claim_note(rows)
    if skipped:
        verdict += f" (on the tasks run; {len(skipped)} optional task(s) not run: no data)"
    return {
        "name": cfg.name,
        "in_distribution": in_distribution_result(base, new, cfg, skipped),  # reported first
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
        *in_distribution_markdown(comparison),
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
