"""The minimal detectable effect of the experiment's and the study's targets: printed before they run, and the
words put beside every "no significant" verdict of their reports. The statistics are ``harness_ext.core.power``.

Before a run the n of a target comes from its ``--metadata`` (the cost estimator's counts for KV and NIAH, questions
x positions for MDQA and the synthetic MDQA cells; other tasks read their data at run time: n unknown, said so),
and the base rate is the base model's measured score when a resumed run already has it, else 0.5 (the largest
spread, so the MDE is not under-stated). After a run: the observed n and discordance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harness_ext.core import power
from harness_ext.workflow.in_distribution import ROLE as IN_DISTRIBUTION
from harness_ext.workflow.in_distribution import label


def target_n(task: str, metadata: dict, limit: int | None = None) -> int | None:
    """How many documents a target scores with this ``--metadata`` (None when only the run can tell)."""
    from harness_ext.workflow.cost import eval_rows

    rows, _ = eval_rows([task], metadata, limit)
    if rows:
        return rows[0]["documents"]
    n = None
    if task.startswith("synth_mdqa"):
        lengths = metadata.get("synth_lengths") or [None]
        n = int(metadata.get("synth_num_samples", 20)) * len(metadata.get("synth_positions", [1, 5, 10])) * len(lengths)
    elif task == "mdqa_sweep" and metadata.get("mdqa_num_questions"):
        n = int(metadata["mdqa_num_questions"]) * len(metadata.get("mdqa_positions", [1]))
    elif task.startswith("mdqa") and metadata.get("mdqa_num_questions"):
        n = int(metadata["mdqa_num_questions"])
    if n is not None and limit:
        n = min(n, limit)
    return n


def plan_targets(
    targets: Sequence[tuple[str, str]],
    metadata: dict,
    level: float,
    limit: int | None = None,
    effect: float = power.DEFAULT_EFFECT,
    base_rates: dict[str, float] | None = None,
    discordances: dict[str, float] | None = None,
) -> list[power.Planned]:
    """One planned MDE per (name, lm-eval task) at one-sided ``level`` (the caller's Holm first step); at a pilot's
    discordance where ``discordances`` has one, else at independent errors around the base rate."""
    rates, psis = base_rates or {}, discordances or {}
    return [power.plan(name, target_n(task, metadata, limit), level, effect=effect, p_base=rates.get(name),
                       psi=psis.get(name)) for name, task in targets]  # fmt: skip


def beside(base: np.ndarray, new: np.ndarray, level: float) -> dict:
    """{"mde", "text"}: the MDE at the observed n and discordance (0/1 values), or at the paired spread (others)."""
    from harness_ext.core import stats

    base, new = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    n = len(base)
    if np.isin(base, (0.0, 1.0)).all() and np.isin(new, (0.0, 1.0)).all():
        _, base_only, new_only, _ = stats.paired_binary_counts(base, new)
        planned = power.plan("", n, level, psi=(base_only + new_only) / max(n, 1) or None, p_base=float(base.mean()))
        return {"mde": planned.mde, "text": planned.text()}
    mde = stats.normal_mde(stats.paired_diff_stderr(base, new) or 0.0, level)
    return {
        "mde": mde,
        "text": f"MDE {power.shown(mde)} at n {n} (power 80%, one-sided alpha {level:.3g}; normal approximation)",
    }


def experiment_plan_blocks(cfg, base_results: str | None = None) -> list[str]:
    """The blocks ``needles experiment`` prints before its evaluations: each target's MDE at one-sided alpha / m
    (Holm's first step over the m suite tasks; base rates from the base model's results when a resumed run has
    them, else 0.5), then the in-distribution check's."""
    targets = [e for e in cfg.suite if e.role == "target"]
    rates: dict[str, float] = {}
    if base_results:
        import json
        from pathlib import Path

        results = json.loads(Path(base_results).read_text(encoding="utf-8")).get("results", {})
        for e in targets:
            value = (results.get(e.task) or {}).get(f"{e.metric},{e.filter}")
            if isinstance(value, (int, float)) and 0 <= value <= 1:
                rates[e.name] = float(value)
    # Holm's family: the claim's tasks (the in-distribution check is tested on its own)
    level = cfg.alpha / max(len([e for e in cfg.suite if e.role != IN_DISTRIBUTION]), 1)
    planned = plan_targets([(e.name, e.task) for e in targets], cfg.metadata, level, cfg.limit, base_rates=rates)
    # the check is two-sided at alpha
    checks = [(e.name, e.task) for e in cfg.suite if e.role == IN_DISTRIBUTION]
    own = in_distribution_plan_block(checks, cfg.metadata, cfg.alpha / 2, cfg.limit)
    return [power.format_plan(planned, "", power.DEFAULT_EFFECT).lstrip(), *own]


def study_plan_blocks(cfg, runs: int, checks: dict | None = None) -> list[str]:
    """The blocks ``needles study`` prints before its steps: each target's MDE against the base model at Holm's first
    step over the runs x targets two-sided tests of "vs base" (one-sided alpha 0.05 / 2m), then each held-out task
    of the in-distribution checks (``checks``: run -> check) at Holm's first step over the runs' checks."""
    level = 0.05 / (2 * max(runs * len(cfg.targets), 1))
    psis = {t.name: t.discordance for t in cfg.targets if t.discordance is not None}
    planned = plan_targets([(t.name, t.task) for t in cfg.targets], cfg.metadata, level, cfg.limit, discordances=psis)
    tested = [c["task"] for c in (checks or {}).values() if c.get("task")]
    tasks = [(label(task), task) for task in dict.fromkeys(tested)]
    own = in_distribution_plan_block(tasks, cfg.metadata, 0.05 / (2 * max(len(tested), 1)), cfg.limit)
    return [power.format_plan(planned, "", power.DEFAULT_EFFECT).lstrip(), *own]


def in_distribution_plan_block(
    checks: Sequence[tuple[str, str]], metadata: dict, level: float, limit: int | None = None
) -> list[str]:
    """The block planning the in-distribution check (name, held-out task) at one-sided ``level``: none without one.
    A check that cannot detect a change reads "not shown" whatever the finetune did to its own task."""
    if not checks:
        return []
    planned = plan_targets(checks, metadata, level, limit)
    return [power.format_plan(planned, "", power.DEFAULT_EFFECT, what="in-distribution check").lstrip()]
