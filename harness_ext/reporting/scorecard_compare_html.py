"""The comparison page of ``needles scorecard --compare A B``: both models' curves and grids in one self-contained
page, the effective length of each side, and the paired tests with the MDE beside every "no significant change".
Rendered like the scorecard (``scorecard_html``: sandboxed, autoescaping, plots inlined)."""

from __future__ import annotations

from typing import Any

from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.leaderboard_rows import rows_from_run
from harness_ext.reporting.scorecard_html import plot_images, report_env


def render_compare(result: dict, a: Any, b: Any, rule: Rule) -> str:
    """``a`` / ``b``: the two ``scorecard_compare.Side`` objects (their runs are drawn under their labels)."""
    rows = [r for side in (a, b) for run in side.runs for r in rows_from_run(run, model=side.label, adapter="")]
    return (
        report_env()
        .get_template("scorecard_compare.html.jinja")
        .render(result=result, images=plot_images(rows, rule), rule=rule.label)
    )
