"""``needles experiment``'s in-distribution check (harness_ext.workflow.in_distribution): the held-out task of
the training family joins the suite as one entry of role ``in_distribution``, scored in the same ``lm_eval``
runs as the suite (the base and the finetuned model, the same documents), checked by the finetune's leakage
check like every suite task, left out of the claim's Holm family, and reported first.

Its test is the suite's paired test made two-sided: exact McNemar on 0/1 metrics, paired bootstrap otherwise
(``workflow.paired.compare_entry`` in both directions at alpha / 2 each), with the (1 - alpha) interval.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.results_io import Run
from harness_ext.workflow.in_distribution import ROLE, held_out_for, merged_metadata, modal_reply, options, verdict
from harness_ext.workflow.suite import ExperimentConfig, SuiteTask


def with_in_distribution(cfg: ExperimentConfig, out: Path) -> tuple[ExperimentConfig, object]:
    """(the config with the check in its suite and ``--metadata``, its FinetuneConfig). ``cfg.in_distribution``
    then records the check (family, task, why held out, shape keys scored otherwise than trained)."""
    from harness_ext.workflow.training import finetune_config

    ft = finetune_config(cfg, out)
    opts = options(cfg.in_distribution, "in_distribution")
    if not opts["enabled"] or "family" in cfg.in_distribution:  # off, or already added
        return dataclasses.replace(cfg, in_distribution=opts), ft
    check = held_out_for(ft.data, opts["documents"])
    info = {**opts, "family": check.family, "task": check.task, "disjoint": check.disjoint, "missing": check.missing}
    if check.task is None:
        return dataclasses.replace(cfg, in_distribution=info), ft
    metadata, differs = merged_metadata(cfg.metadata, check, cfg.tasks)
    entry = SuiteTask(check.task, ROLE, check.metric, label=check.label)
    cfg = dataclasses.replace(
        cfg, suite=[entry, *cfg.suite], metadata=metadata, in_distribution={**info, "differs": differs}
    )
    return cfg, finetune_config(cfg, out)  # the leakage check now covers the held-out documents too


def plain(d: dict) -> dict:
    """An ``experiment.yaml`` mapping without what :func:`with_in_distribution` added to the suite and the options
    (it adds them again, the same, when the experiment resumes from that file)."""
    d["suite"] = [e for e in d["suite"] if e.get("role") != ROLE]
    opts = d.get("in_distribution") or {}
    d["in_distribution"] = {k: v for k, v in opts.items() if k in ("enabled", "documents")}
    return d


def in_distribution_result(base: Run, new: Run, cfg: ExperimentConfig, skipped: list[dict]) -> dict:
    """The check's row for comparison.json: delta (finetuned - base), interval, two-sided p, status and the
    sentence the report leads with."""
    from harness_ext.workflow.mde import beside
    from harness_ext.workflow.paired import compare_entry, paired_values

    info = dict(cfg.in_distribution)
    head = {k: info.get(k) for k in ("family", "task", "disjoint") if info.get(k)}
    if not info.get("enabled", True):
        return {"status": "off", "verdict": "in-distribution check turned off (in_distribution: false)"}
    if info.get("family") and info.get("task") is None:
        return {**head, "status": "unavailable", "verdict": f"no in-distribution check: {info['missing']}"}
    entry = next((e for e in cfg.suite if e.role == ROLE), None)
    if entry is None:
        why = next((s["reason"] for s in skipped if s["role"] == ROLE), f"the suite has no entry of role {ROLE}")
        return {**head, "status": "error", "verdict": f"in-distribution check not run: {why}"}
    try:
        b, n, _ = paired_values(base, new, entry)
    except NeedlesError as exc:
        return {**head, "status": "error", "verdict": f"in-distribution check not compared: {exc.problem}"}
    half = dataclasses.replace(cfg, alpha=cfg.alpha / 2)  # two one-sided tests at alpha / 2: two-sided at alpha
    target = dataclasses.replace(entry, role="target")
    better, worse = compare_entry(target, b, n, half), compare_entry(target, n, b, half)
    p = min(1.0, 2 * min(better["p"], worse["p"]))
    found = beside(b, n, cfg.alpha / 2)
    status, sentence = verdict(better["delta"], p, cfg.alpha, found["text"], modal_reply(new, entry.task, entry.filter))
    row = {k: better[k] for k in ("metric", "n", "base", "finetuned", "delta", "ci", "ci_level")}
    row |= {"p": p, "method": better["method"].replace("one-sided: finetuned better", "two-sided")}
    if "discordant" in better:
        row["discordant"] = better["discordant"]
    if status == "not_shown":
        row |= {"mde": found["mde"], "mde_text": found["text"]}
    return {**head, "label": entry.name, **row, "differs": info.get("differs") or {}, "status": status,
            "verdict": sentence}  # fmt: skip


def markdown(comparison: dict) -> list[str]:
    """The report's first section: the check's table row and its sentence (bold when the finetune failed)."""
    r = comparison.get("in_distribution")
    if not r:
        return []
    lines = ["## In-distribution check", ""]
    sentence = f"{r['verdict'][0].upper()}{r['verdict'][1:]}."
    if "delta" not in r:
        return [*lines, sentence, ""]
    lines += [
        "| task | trained on | metric | n | base | finetuned | delta | CI | p (two-sided) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['task']} | {r['family']} | {r['metric']} | {r['n']} | {r['base']:.3f} | {r['finetuned']:.3f} | "
        f"{r['delta']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['p']:.3g} | {r['status']} |",
        "",
        f"**{sentence}**" if r["status"] in ("not_learned", "constant") else sentence,
        "",
        f"Held-out documents: {r['disjoint']}. Not part of the claim's Holm family; CI = {r['ci_level']:.0%} paired "
        "interval of finetuned - base.",
    ]
    for key, d in (r.get("differs") or {}).items():
        lines.append(f"Scored otherwise than trained: {key} trained {d['trained']}, scored {d['scored']}.")
    return [*lines, ""]
