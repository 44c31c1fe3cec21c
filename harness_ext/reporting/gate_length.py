"""The gate's effective-length check (``needles gate --effective-length``): the candidate's effective length must
not shrink, per task or group and rule, on the same length grid. The rules, curves and bootstrap are
harness_ext.reporting.effective_length / length_curves; this module only pairs the two runs' outcomes.

The verdict is decided on the bootstrap interval, not on the point estimate: SHRANK when the candidate's effective
length is shorter than the baseline's AND so is the top of the candidate's 90% bootstrap interval over documents
(a one-sided 95% bound, as the gate's metric tests are one-sided at 5%); a shorter point estimate whose interval
still reaches the baseline's length is within the documents' noise and holds. Without the candidate's sample logs
(--log_samples) there is no interval, and the point estimate decides; the reason column says which applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness_ext.reporting.effective_length import Bootstrap, EffectiveLength, Rule
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
    reason: str = ""  # what decided the verdict: the candidate's interval, or the point estimate (no sample logs)


SHRANK_RULE = (
    "SHRANK: the candidate's effective length and the top of its 90% bootstrap interval are both shorter than the "
    "baseline's (without the candidate's sample logs: its effective length alone)"
)


def _verdict(base: EffectiveLength, cand: EffectiveLength, boot: Bootstrap | None) -> tuple[str, str]:
    """(verdict, reason): see the module docstring."""
    if cand.rank >= base.rank:
        return "held", "not shorter"
    if boot is None:
        return "SHRANK", "shorter; no sample logs for an interval, decided on the point estimate"
    if boot.ranks[1] < base.rank:
        return "SHRANK", f"shorter, and the candidate's {boot.level:.0%} interval ends at {boot.high}"
    return "held", f"shorter, but within noise: the candidate's {boot.level:.0%} interval reaches {boot.high}"


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
                    *_verdict(rb, rc, bc),
                )
            )
    return checks


def length_lines(checks: Sequence[LengthCheck]) -> list[list[str]]:
    """Header and rows of the effective-length table (text and Markdown)."""
    header = ["task", "metric", "rule", "baseline [90% bootstrap]", "candidate [90% bootstrap]", "verdict", "why"]
    body = [
        [
            c.task,
            c.metric,
            c.rule,
            f"{c.baseline} {c.baseline_interval}",
            f"{c.candidate} {c.candidate_interval}",
            c.verdict,
            c.reason,
        ]  # fmt: skip
        for c in checks
    ]
    return [header, *body]
