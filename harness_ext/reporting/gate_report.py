"""The gate's result and its three renderings: aligned text (stdout), Markdown (CI summary) and JSON (--report).

Model names and paths come from the (untrusted) results files: the Markdown escapes what would break the table
or be taken as HTML.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from harness_ext.reporting.gate_compare import Comparison
from harness_ext.reporting.gate_length import SHRANK_RULE, LengthCheck, length_lines
from harness_ext.reporting.gate_pairing import GateConfig
from harness_ext.reporting.markdown_text import md_code, md_escape


@dataclass
class GateReport:
    baseline: str
    candidate: str
    baseline_model: str
    candidate_model: str
    config: GateConfig
    comparisons: list[Comparison]
    notes: list[str]
    lengths: list[LengthCheck] = field(default_factory=list)  # --effective-length

    @property
    def regressions(self) -> list[Comparison | LengthCheck]:
        return [c for c in self.comparisons if c.verdict == "REGRESSION"] + [
            c for c in self.lengths if c.verdict == "SHRANK"
        ]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    @property
    def verdict(self) -> str:
        return "REGRESSION" if self.regressions else "PASS"

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "baseline": {"path": self.baseline, "model": self.baseline_model},
            "candidate": {"path": self.candidate, "model": self.candidate_model},
            "config": asdict(self.config),
            "ci_level": 1 - 2 * self.config.alpha,
            "notes": self.notes,
            "comparisons": [asdict(c) for c in self.comparisons],
            "effective_length": [asdict(c) for c in self.lengths],
        }


def _f(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}"


def _p(x: float) -> str:
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _rows(report: GateReport) -> tuple[list[str], list[list[str]]]:
    level = round(100 * (1 - 2 * report.config.alpha))
    header = [
        "task",
        "metric",
        "method",
        "n",
        "baseline",
        "candidate",
        f"diff [{level}% CI]",
        "p",
        "p (Holm)",
        f"MDE @{report.config.power:.0%}",
        "verdict",
    ]
    body = []
    for c in report.comparisons:
        metric = c.metric if c.filter in ("none", "") else f"{c.metric} [{c.filter}]"
        body.append(
            [
                c.task,
                metric,
                c.method,
                str(c.n),
                _f(c.baseline),
                _f(c.candidate),
                f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]",
                _p(c.p_value),
                _p(c.p_adjusted),
                _f(c.mde),
                c.verdict,
            ]
        )
    return header, body


def _settings(report: GateReport) -> str:
    c = report.config
    return (
        f"alpha={c.alpha:g} (one-sided, Holm across {len(report.comparisons)} metrics), max_drop={c.max_drop:g}, "
        f"power={c.power:g}; MDE = smallest drop caught with that power at this n"
    )


def to_text(report: GateReport) -> str:
    """The table printed on stdout."""
    header, body = _rows(report)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        f"needles gate: {report.verdict}",
        f"baseline:  {report.baseline_model}  ({report.baseline})",
        f"candidate: {report.candidate_model}  ({report.candidate})",
        _settings(report),
        "",
    ]
    for r in [header, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if report.lengths:
        table = length_lines(report.lengths)
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += ["", "effective context length (must not shrink):", SHRANK_RULE]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def to_markdown(report: GateReport) -> str:
    """The summary for ``--summary`` and $GITHUB_STEP_SUMMARY."""
    header, body = _rows(report)
    icon = "FAILED: regression" if report.regressions else "passed"
    lines = [
        f"## needles gate: {report.verdict} ({icon})",
        "",
        f"- baseline: `{md_code(report.baseline_model)}` ({md_escape(report.baseline)})",
        f"- candidate: `{md_code(report.candidate_model)}` ({md_escape(report.candidate)})",
        f"- {_settings(report)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(md_escape(cell) for cell in r) + " |" for r in body]
    if report.lengths:
        head, *rest = length_lines(report.lengths)
        lines += ["", "Effective context length (must not shrink):", "", md_escape(SHRANK_RULE), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        lines += ["| " + " | ".join(md_escape(cell) for cell in r) + " |" for r in rest]
    if report.notes:
        lines += ["", *(f"> {md_escape(n)}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def to_json_text(report: GateReport) -> str:
    """The ``--report`` file."""
    return json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n"
