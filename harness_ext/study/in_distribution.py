"""``needles study``'s in-distribution check (harness_ext.workflow.in_distribution): every run is scored on
held-out documents of its own training family, and the base model on those of every run, in the same eval
steps as the targets; the report shows each run's paired test against base before any transfer result.

The test is the one of "vs base" (harness_ext.study.vs_base.paired_test: exact McNemar with Newcombe's
interval on 0/1 metrics, paired bootstrap otherwise, two-sided), with Holm across the runs' checks (a family
of its own: the targets' Holm family is unchanged) and the MDE of the pair beside a non-significant result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.study.config import BASE, StudyConfig
from harness_ext.workflow.in_distribution import held_out_for, label, merged_metadata, modal_reply, options, verdict

LEVEL = 0.95


def plan_checks(cfg: StudyConfig, runs: dict, fts: dict, out: Path) -> tuple[StudyConfig, dict, dict]:
    """(the config with the checks' ``--metadata``, {run: check}, the runs' FinetuneConfigs whose leakage check
    covers the held-out documents too). A check whose data files cannot be had stops the study here."""
    from harness_ext.study.steps import merged_finetune
    from harness_ext.workflow.data_step import unavailable
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask
    from harness_ext.workflow.training import finetune_config

    opts = options(cfg.in_distribution, "study config: in_distribution")
    if not opts["enabled"]:
        return cfg, {}, fts
    metadata, checks, targets = dict(cfg.metadata), {}, [t.task for t in cfg.targets]
    for name, ft in fts.items():
        check = held_out_for(ft.data, opts["documents"])
        entry = {"family": check.family, "task": check.task, "metric": check.metric, "disjoint": check.disjoint}
        if check.task is None:
            checks[name] = {**entry, "missing": check.missing}
            continue
        metadata, differs = merged_metadata(metadata, check, targets)
        checks[name] = {**entry, "differs": differs}
    cfg = dataclasses.replace(cfg, metadata=metadata)
    suite = [SuiteTask(t.task, "target", t.metric, filter=t.filter, label=t.name) for t in cfg.targets]
    out_fts = {}
    for name, r in runs.items():
        c = checks[name]
        extra = [SuiteTask(c["task"], "target", c["metric"], label=label(c["task"]))] if c["task"] else []
        if c["task"] and (problem := unavailable(c["task"], metadata, {})) is not None:
            raise NeedlesError(
                f"study config: variant {r.variant.name} (in-distribution check {c['task']}): {problem.problem}",
                fix=problem.fix,
            )
        exp = ExperimentConfig(name, cfg.model, suite + extra, merged_finetune(cfg, r), metadata)
        try:
            out_fts[name] = finetune_config(exp, out / "runs" / name)
        except NeedlesError as exc:
            raise NeedlesError(
                f"study config: variant {r.variant.name} (finetune): {exc.problem}", fix=exc.fix
            ) from None
    return cfg, checks, out_fts


def report_section(study, done: dict[str, dict]) -> dict:
    """{run: check} for report.json: family, task, paired test against base, status and sentence."""
    from harness_ext.core import stats
    from harness_ext.reporting.gate_pairing import load_one_run
    from harness_ext.study.vs_base import paired_test, relative, rounded
    from harness_ext.workflow.mde import beside
    from harness_ext.workflow.paired import paired_values
    from harness_ext.workflow.suite import SuiteTask

    checks: dict = study.in_distribution
    if not checks:
        return {}

    def load(run: str):
        return load_one_run(study.out / done[f"eval:{run}"]["results"], "baseline" if run == BASE else "candidate")

    out: dict[str, dict] = {}
    tested = [n for n in study.runs if checks[n]["task"]]
    level = (1 - LEVEL) / (2 * max(len(tested), 1))  # Holm's first step over the checks, one side of two
    for name in study.runs:
        c = checks[name]
        head = {k: c[k] for k in ("family", "task", "metric", "disjoint") if c.get(k)}
        if not c["task"]:
            out[name] = {**head, "status": "unavailable", "verdict": f"no in-distribution check: {c['missing']}"}
            continue
        entry = SuiteTask(c["task"], "target", c["metric"])
        try:
            b, r, _ = paired_values(load(BASE), load(name), entry)
        except NeedlesError as exc:
            why = relative(study, exc)
            out[name] = {**head, "status": "error", "verdict": f"in-distribution check not compared: {why}"}
            continue
        found = beside(b, r, level)
        out[name] = {**head, **paired_test(b, r, study.cfg.bootstrap_iters), "mde": found["mde"]}
        out[name] |= {"mde_text": found["text"], "differs": c.get("differs") or {}}
        out[name]["modal"] = modal_reply(load(name), c["task"])
    family = [n for n in out if "p" in out[n]]
    for name, p_holm in zip(family, stats.holm([out[n]["p"] for n in family]), strict=True):
        t = out[name]
        t["p_holm"] = p_holm
        t["status"], t["verdict"] = verdict(t["delta"], p_holm, 1 - LEVEL, t["mde_text"], t.pop("modal"))
        if t["status"] != "not_shown":
            del t["mde"], t["mde_text"]
    return {name: rounded(t) for name, t in out.items()}


STATUS_WORD = {"learned": "learned", "not_learned": "worse", "not_shown": "n.s.", "constant": "one reply"}


def table_cell(rep: dict, run: str) -> str:
    """The run's in-distribution result for the transfer table, beside its targets: score (delta vs base, verdict)."""
    t = (rep.get("in_distribution") or {}).get(run) or {}
    if "delta" not in t:
        return "—"
    return f"{t['run']:.3f} ({t['delta']:+.3f}, {STATUS_WORD[t['status']]})"


def markdown(rep: dict) -> list[str]:
    """The report's first section: one row per run and, under it, every run whose finetune did not learn."""
    checks = rep.get("in_distribution") or {}
    if not checks:
        return []
    lines = [
        "## In-distribution check",
        "",
        "Each run against base on held-out documents of its own training family (paired, two-sided; Holm across "
        "the runs' checks). A run that did not learn its own task cannot show transfer.",
        "",
        "| run | trained on | task (metric) | n | base | run | delta [95% CI] | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, t in checks.items():
        if "delta" not in t:
            lines.append(f"| {run} | {t.get('family', '')} | {t.get('task') or '—'} | | | | | | {t['verdict']} |")
            continue
        low, high = t["ci95"]
        lines.append(
            f"| {run} | {t['family']} | {t['task']} ({t['metric']}) | {t['n']} | {t['base']:.3f} | {t['run']:.3f} | "
            f"{t['delta']:+.3f} [{low:+.3f}, {high:+.3f}] | {t['p']:.3g} ({t['p_holm']:.3g}) | {t['verdict']} |"
        )
    lines.append("")
    for run, t in checks.items():
        if t["status"] in ("not_learned", "constant"):
            lines.append(f"**{run}: {t['verdict']}.**")
        for key, d in (t.get("differs") or {}).items():
            lines.append(f"- {run}: {key} trained {d['trained']}, scored {d['scored']}.")
    held = dict.fromkeys(f"- held-out {t['family']}: {t['disjoint']}." for t in checks.values() if t.get("disjoint"))
    lines += list(held)
    return [*lines, ""]
