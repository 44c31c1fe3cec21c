"""Tidy long-format leaderboard: lm-eval runs -> one CSV row per (model, adapter, task, group, length, position,
metric, filter) and run; upsert into an existing CSV; wide pivot, Markdown and HTML views.

The leaderboard's public API, gathered from its parts: leaderboard_rows (run -> rows, run identity),
leaderboard_csv (read, write, upsert, locked export) and leaderboard_views (pivot, Markdown, HTML).
"""

from __future__ import annotations

from harness_ext.reporting.leaderboard_csv import collect_rows, export, read_csv, to_csv_text, upsert
from harness_ext.reporting.leaderboard_rows import COLUMNS, KEY, Row, model_identity, rows_from_run, run_date, run_id
from harness_ext.reporting.leaderboard_views import (
    breakdown_label,
    column_label,
    entity,
    latest,
    pivot,
    pivot_csv_text,
    render_html,
    render_markdown,
    report_model,
)
from harness_ext.reporting.results_io import load_run

__all__ = [
    "COLUMNS",
    "KEY",
    "Row",
    "breakdown_label",
    "collect_rows",
    "column_label",
    "entity",
    "export",
    "latest",
    "load_run",
    "model_identity",
    "pivot",
    "pivot_csv_text",
    "read_csv",
    "render_html",
    "render_markdown",
    "report_model",
    "rows_from_run",
    "run_date",
    "run_id",
    "to_csv_text",
    "upsert",
]
