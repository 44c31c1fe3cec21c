"""The gate's effective-length check (``needles gate --effective-length``): the candidate's effective length must
not shrink, per task or group and rule, on the same length grid. The rules, curves and bootstrap are
harness_ext.reporting.effective_length / length_curves; this module only pairs the two runs' outcomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.gate_pairing import IncomparableRuns
from harness_ext.reporting.leaderboard_rows import rows_from_run
from harness_ext.reporting.length_curves import Summary, require_curves, summarize
from harness_ext.reporting.results_io import Run


@dataclass
class LengthCheck:
    task: str
    metric: str
    rule: str
    lengths: list[int]
    baseline: str  # outcome text: "800", ">=800", "<400"
    candidate: str
    baseline_interval: str  # bootstrap interval over documents ("n/a" without sample logs)
    candidate_interval: str
    verdict: str  # "SHRANK" or "held"


def _by_key(summaries: list[Summary]) -> dict[tuple[str, str, str], Summary]:
    return {(s.curve.task, s.curve.metric, s.curve.filter): s for s in summaries}


def check_lengths(
    base: Run, cand: Run, rules: Sequence[Rule], tasks: Sequence[str] | None, seed: int
) -> list[LengthCheck]:
    """One check per (task or group, rule) both runs measured; a shrink is a lower outcome on the same grid."""
    found = {}
    for role, run in (("baseline", base), ("candidate", cand)):
        # both runs under one name: the model differs, the curves are paired by task
        rows = rows_from_run(run, model=role, adapter="")
        summaries = summarize(rows, rules, [run], seed=seed)
        if tasks:
            summaries = [s for s in summaries if s.curve.task in tasks or set(s.curve.members) & set(tasks)]
        found[role] = _by_key(require_curves(summaries, rows, f"--effective-length ({role} {run.path})"))
    common = sorted(set(found["baseline"]) & set(found["candidate"]))
    if not common:
        raise IncomparableRuns(
            f"--effective-length: no task has a length breakdown in both runs (baseline {sorted(found['baseline'])}, "
            f"candidate {sorted(found['candidate'])})",
            fix="evaluate the same length sweep in both runs",
        )
    checks = []
    for key in common:
        b, c = found["baseline"][key], found["candidate"][key]
        if sorted(b.curve.points) != sorted(c.curve.points):
            raise IncomparableRuns(
                f"--effective-length: {key[0]} was measured at lengths {sorted(b.curve.points)} in the baseline and "
                f"{sorted(c.curve.points)} in the candidate",
                fix="evaluate both runs at the same lengths (the same --metadata)",
            )
        for i, rule in enumerate(rules):
            rb, rc = b.results[i], c.results[i]
            bb, bc = b.boots[i], c.boots[i]
            checks.append(
                LengthCheck(
                    key[0],
                    key[1] + (f" [{key[2]}]" if key[2] not in ("", "none") else ""),
                    rule.label,
                    sorted(b.curve.points),
                    rb.display(),
                    rc.display(),
                    bb.interval_text() if bb else "n/a",
                    bc.interval_text() if bc else "n/a",
                    "SHRANK" if rc.rank < rb.rank else "held",
                )
            )
    return checks


def length_lines(checks: Sequence[LengthCheck]) -> list[list[str]]:
    """Header and rows of the effective-length table (text and Markdown)."""
    header = ["task", "metric", "rule", "baseline [90% bootstrap]", "candidate [90% bootstrap]", "verdict"]
    body = [
        [
            c.task,
            c.metric,
            c.rule,
            f"{c.baseline} {c.baseline_interval}",
            f"{c.candidate} {c.candidate_interval}",
            c.verdict,
        ]  # fmt: skip
        for c in checks
    ]
    return [header, *body]
