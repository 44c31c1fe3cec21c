"""Leaderboard views: the newest row per cell, the wide pivot, and the Markdown and HTML reports.

Every string shown comes from results files or CSVs (model names, task names, paths) and is untrusted: the HTML
is rendered by a sandboxed, autoescaping Jinja environment and the Markdown escapes table and HTML syntax.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable, Iterable

from harness_ext.core.paths import templates_dir
from harness_ext.reporting.effective_length import cell_text
from harness_ext.reporting.leaderboard_rows import KEY, Row, length_number
from harness_ext.reporting.markdown_text import md_escape
from harness_ext.tasklib.breakdowns import parse_name


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def breakdown_label(row: Row) -> str:
    """``len1024 depth0.50`` / ``pos10`` / ``disp-first``; empty for an overall metric."""
    parts = []
    if row["length"]:
        parts.append(f"len{row['length']}")
    task_bd = parse_name(row["task"])
    if row["position"] and not (task_bd.position == row["position"] and task_bd.position_kind == row["position_kind"]):
        prefix = {"depth": "depth", "doc": "pos", "dispersion": "disp-"}.get(row["position_kind"], "")
        parts.append(f"{prefix}{row['position']}")
    return " ".join(parts)


def column_label(row: Row) -> str:
    """``<task> <metric> [<filter>] <breakdown>``: a pivot column."""
    label = f"{row['task']} {row['metric']}"
    if row["filter"] not in ("", "none"):
        label += f" [{row['filter']}]"
    bd = breakdown_label(row)
    return f"{label} {bd}" if bd else label


def entity(row: Row) -> tuple[str, str]:
    """What a leaderboard line is about: (model, adapter)."""
    return row["model"], row["adapter"]


def latest(rows: Iterable[Row]) -> list[Row]:
    """Per entity and cell, the row of the newest run (ties broken by run id, so the choice is stable)."""
    best: dict[tuple, Row] = {}
    for r in rows:
        key = (*entity(r), *(r[k] for k in KEY if k != "run_id"))
        if key not in best or (r["date"], r["run_id"]) > (best[key]["date"], best[key]["run_id"]):
            best[key] = r
    return list(best.values())


def _col_order(row: Row) -> tuple:
    pos = _num(row["position"])
    return (
        row["task"],
        row["metric"],
        row["filter"],
        length_number(row["length"]),
        pos if pos is not None else -1.0,
        row["position"],
    )


def pivot(rows: Iterable[Row], breakdowns: bool = True) -> tuple[list[str], list[list[str]]]:
    """Wide table: one line per (model, adapter), one column per task/metric/filter(/length/position)."""
    cells = [r for r in latest(rows) if breakdowns or not breakdown_label(r)]
    columns: dict[str, tuple] = {}
    for r in cells:
        columns.setdefault(column_label(r), _col_order(r))
    ordered = sorted(columns, key=lambda c: columns[c])
    table: dict[tuple[str, str], dict[str, str]] = {}
    for r in cells:
        line = table.setdefault(entity(r), {"source": set(), "date": ""})
        line[column_label(r)] = _cell(r) if r["metric"] == "effective_length" else r["value"]
        line["source"].add(r["source"] if r["run_id"].startswith("ref:") else "run")
        line["date"] = max(line["date"], r["date"])
    header = ["model", "adapter", "date", "source", *ordered]
    body = []
    for (model, adapter), line in sorted(table.items()):
        body.append(
            [model, adapter, line["date"], "; ".join(sorted(line["source"])), *(line.get(c, "") for c in ordered)]
        )
    return header, body


def pivot_csv_text(rows: Iterable[Row]) -> str:
    """The wide pivot as CSV text."""
    header, body = pivot(rows)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row["metric"] == "effective_length":  # a length in tokens, with its outcome (">=800", "<400")
        return cell_text(row["note"], row["value"])
    value, stderr = _num(row["value"]), _num(row["stderr"])
    if value is None:
        return row["value"]
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def report_model(rows: Iterable[Row]) -> dict:
    """What the Markdown and HTML views show: the runs, a summary table, one table per broken-down metric."""
    cells = latest(rows)
    entities = sorted({entity(r) for r in cells})
    ent_label = {e: e[0] + (f" + {e[1]}" if e[1] else "") for e in entities}

    def table(title: str, selected: list[Row], label: Callable[[Row], str]) -> dict:
        cols: dict[str, tuple] = {}
        for r in selected:
            cols.setdefault(label(r), _col_order(r))
        ordered = sorted(cols, key=lambda c: cols[c])
        index = {(entity(r), label(r)): r for r in selected}
        ents = [e for e in entities if any(entity(r) == e for r in selected)]
        body = [[ent_label[e], *(_cell(index.get((e, c))) for c in ordered)] for e in ents]
        return {"title": title, "columns": ["model", *ordered], "rows": body}

    summary = table("Overall", [r for r in cells if not breakdown_label(r)], lambda r: column_label(r))
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in cells:
        if breakdown_label(r):
            groups.setdefault((r["task"], r["metric"], r["filter"]), []).append(r)
    tables = []
    for (task, metric, filt), selected in sorted(groups.items()):
        title = f"{task} {metric}" + (f" [{filt}]" if filt not in ("", "none") else "") + " by length / position"
        tables.append(table(title, selected, breakdown_label))
    runs = sorted({(r["model"], r["adapter"], r["date"], r["source"]) for r in cells})
    return {
        "runs": [dict(zip(("model", "adapter", "date", "source"), r, strict=True)) for r in runs],
        "summary": summary,
        "tables": tables,
    }


def _report_env():  # -> jinja2.sandbox.SandboxedEnvironment (jinja2 is imported only when a report is rendered)
    # Our own sandboxed environment with autoescaping: the page shows user-controlled strings (model names,
    # paths), while harness_ext.core.templating renders prompts and must not escape.
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(templates_dir() / "report")),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.jinja")),
        keep_trailing_newline=True,
    )
    env.filters["md"] = md_escape
    return env


def render_markdown(rows: Iterable[Row], title: str = "Leaderboard") -> str:
    """The Markdown report (runs, overall table, one table per broken-down metric)."""
    return _report_env().get_template("leaderboard.md.jinja").render(title=title, **report_model(rows))


def render_html(rows: Iterable[Row], title: str = "Leaderboard", plots: dict[str, bytes] | None = None) -> str:
    """A self-contained page: data tables, sortable in the browser, and the PNG plots inlined as data URIs."""
    images = [{"name": name, "data": base64.b64encode(png).decode("ascii")} for name, png in (plots or {}).items()]
    return _report_env().get_template("leaderboard.html.jinja").render(title=title, images=images, **report_model(rows))
