"""Tidy long-format leaderboard: lm-eval runs -> one CSV row per (model, adapter, task, group, length, position,
metric, filter) and run; upsert into an existing CSV; wide pivot, Markdown and HTML views.

Rows are kept as ``dict[str, str]`` (exactly what the CSV holds), so a row read back from a file and a row made
from a fresh run compare equal and re-exporting a run changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from harness_ext.atomic_io import write_atomic
from harness_ext.breakdowns import parse_name
from harness_ext.results_io import (
    InvalidInput,
    Run,
    as_number,
    find_results,
    load_run,
    sample_metric_values,
    split_metric_key,
)

COLUMNS = [
    "model", "adapter", "task", "group", "length", "position", "position_kind", "metric", "filter",
    "value", "stderr", "stderr_source", "n", "n_shot", "task_version", "task_hash", "data_sha256",
    "chat_template_sha", "lm_eval_version", "backend", "model_args", "date", "run_id", "source", "note",
]  # fmt: skip
# A row's identity: re-exporting a run replaces its rows with identical ones; a newer run adds its own.
KEY = ("run_id", "model", "adapter", "task", "group", "length", "position", "position_kind", "metric", "filter")

Row = dict[str, str]


# ----------------------------------------------------------------------------------------- run -> rows
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _name_from_path(value: str) -> str:
    """Local folders become their last path component; hub ids stay as they are."""
    text = str(value).rstrip("/")
    if text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().exists():
        return Path(text).name
    return text


def model_identity(run: Run) -> tuple[str, str]:
    """(model, adapter) of a run: model from pretrained/model, adapter from LoRA/PEFT paths."""
    args = run.model_args()
    model = args.get("pretrained") or args.get("model") or run.data.get("model_name") or "unknown"
    adapter = args.get("lora_local_path") or args.get("peft") or ""
    return _name_from_path(model), _name_from_path(adapter) if adapter else ""


def run_date(run: Run) -> str:
    """ISO-8601 UTC start time from lm-eval's ``date`` (unix seconds), else from the file name."""
    ts = as_number(run.data.get("date"))
    if ts is not None:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (run.date_id or "").replace("T", " ")


def run_id(run: Run) -> str:
    payload = [run.data.get("date"), run.data.get("model_name"), run.model_args(), run.path.name]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _task_groups(data: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for group, subtasks in (data.get("group_subtasks") or {}).items():
        for task in subtasks or []:
            out.setdefault(task, group)
    return out


def rows_from_run(run: Run, model: str | None = None, adapter: str | None = None) -> list[Row]:
    """Tidy rows for every numeric metric of every task and group in one run."""
    data = run.data
    auto_model, auto_adapter = model_identity(run)
    common = {
        "model": model or auto_model,
        "adapter": auto_adapter if adapter is None else adapter,
        "chat_template_sha": data.get("chat_template_sha") or "",
        "lm_eval_version": data.get("lm_eval_version") or "",
        "backend": (data.get("config") or {}).get("model") or data.get("model_source") or "",
        "model_args": json.dumps(run.model_args(), sort_keys=True, default=str),
        "date": run_date(run),
        "run_id": run_id(run),
        "source": str(run.path.resolve()),
        "note": "",
    }
    groups_of = _task_groups(data)
    rows: list[Row] = []
    for section in ("results", "groups"):
        for task, block in (data.get(section) or {}).items():
            if section == "results" and task in (data.get("groups") or {}):
                continue  # lm-eval repeats group aggregates under results; keep one copy
            group = task if section == "groups" else groups_of.get(task, "")
            rows.extend(_task_rows(run, task, group, block, common))
    return rows


def _task_rows(run: Run, task: str, group: str, block: dict, common: Row) -> list[Row]:
    data = run.data
    values: dict[tuple[str, str], float] = {}
    stderrs: dict[tuple[str, str], float | None] = {}
    for key, raw in block.items():
        parsed = split_metric_key(key)
        if parsed is None:
            continue
        metric, filt, is_stderr = parsed
        if is_stderr:
            stderrs[(metric, filt)] = as_number(raw)
        elif as_number(raw) is not None:
            values[(metric, filt)] = as_number(raw)
    if not values:
        return []
    # lm-eval writes "N/A" for some stderrs (e.g. ruler-style tasks): recompute them from the sample log.
    from_samples = _stderr_from_samples(run, task, [k for k in values if stderrs.get(k) is None])
    task_bd = parse_name(task)
    n_task = ((data.get("n-samples") or {}).get(task) or {}).get("effective")
    counts = block.get("sample_count") or {}
    meta = run.task_metadata(task)
    out = []
    for (metric, filt), value in values.items():
        bd = parse_name(metric)
        stderr, src = stderrs.get((metric, filt)), "lm-eval"
        n = counts.get(f"{metric},{filt}") or (None if bd.is_breakdown else n_task or block.get("sample_len"))
        if stderr is None:
            stderr, n_s = from_samples.get((metric, filt), (None, None))
            src = "samples" if stderr is not None else ""
            n = n or n_s
        position, kind = (
            (bd.position, bd.position_kind) if bd.position is not None else (task_bd.position, task_bd.position_kind)
        )
        length = bd.length if bd.length is not None else task_bd.length
        row = dict(common)
        row.update(
            task=task,
            group=group,
            length=_fmt(length),
            position=position or "",
            position_kind=kind or "",
            metric=bd.base,
            filter=filt,
            value=_fmt(value),
            stderr=_fmt(stderr),
            stderr_source=src,
            n=_fmt(n),
            n_shot=_fmt((data.get("n-shot") or {}).get(task)),
            task_version=_fmt((data.get("versions") or {}).get(task)),
            task_hash=(data.get("task_hashes") or {}).get(task, ""),
            data_sha256=meta.get("needles_data_sha256", ""),
        )
        out.append({c: row.get(c, "") for c in COLUMNS})
    return out


def _stderr_from_samples(run: Run, task: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, int]]:
    """Standard error of the mean (sample sd / sqrt n, as lm-eval's mean_stderr) from the per-sample log."""
    path = run.samples_path(task) if keys else None
    if path is None:
        return {}
    per = sample_metric_values(path, {m for m, _ in keys})
    out = {}
    for key in keys:
        vals = per.get(key, [])
        if len(vals) >= 2:
            out[key] = (statistics.stdev(vals) / math.sqrt(len(vals)), len(vals))
    return out


# ----------------------------------------------------------------------------------------- CSV
def read_csv(path: Path) -> list[Row]:
    """A leaderboard CSV in exactly our schema; anything else is an error naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a UTF-8 text CSV") from None
    if not text.strip():
        return []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if header != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        raise InvalidInput(
            f"{path}: mixed schema: CSV header differs from the leaderboard schema "
            f"(missing {missing}, unexpected {extra})",
            fix="export into a new file, or convert the old one to the current columns",
        )
    rows = []
    for lineno, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) != len(COLUMNS):
            raise InvalidInput(
                f"{path}: line {lineno} has {len(fields)} fields, expected {len(COLUMNS)} (damaged or hand-edited file)"
            )
        rows.append(dict(zip(COLUMNS, fields, strict=True)))
    return rows


def _sort_key(row: Row):
    length = int(row["length"]) if row["length"].isdigit() else -1
    try:
        pos = (0, float(row["position"]), "")
    except ValueError:
        pos = (1, 0.0, row["position"])
    return (
        row["model"],
        row["adapter"],
        row["task"],
        row["group"],
        row["metric"],
        row["filter"],
        length,
        pos,
        row["position_kind"],
        row["date"],
        row["run_id"],
    )


def to_csv_text(rows: Iterable[Row]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=_sort_key):
        writer.writerow([row.get(c, "") for c in COLUMNS])
    return buf.getvalue()


def upsert(existing: list[Row], new: list[Row]) -> list[Row]:
    """Merge by KEY: the same run replaces its own rows; other runs' rows stay."""
    merged = {tuple(r[k] for k in KEY): r for r in existing}
    for r in new:
        merged[tuple(r[k] for k in KEY)] = r
    return list(merged.values())


def collect_rows(inputs: Iterable[str | Path], model: str | None = None, adapter: str | None = None) -> list[Row]:
    """Rows from a mix of lm-eval outputs (folders, results JSON) and leaderboard CSVs. Validates all first."""
    rows: list[Row] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".csv":
            rows = upsert(rows, read_csv(path))
            continue
        for results in find_results([path]):
            rows = upsert(rows, rows_from_run(load_run(results), model, adapter))
    return rows


def export(
    inputs: Iterable[str | Path], output: Path, model: str | None = None, adapter: str | None = None
) -> tuple[list[Row], int]:
    """Upsert the inputs into ``output`` atomically; returns (all rows, number of rows added or changed)."""
    new = collect_rows(inputs, model, adapter)  # every input is parsed before anything is written
    existing = read_csv(output) if Path(output).is_file() else []
    before = {tuple(r[k] for k in KEY): r for r in existing}
    changed = sum(1 for r in new if before.get(tuple(r[k] for k in KEY)) != r)
    merged = upsert(existing, new)
    text = to_csv_text(merged)
    if not Path(output).is_file() or Path(output).read_text(encoding="utf-8") != text:
        write_atomic(Path(output), text)
    return merged, changed


# ----------------------------------------------------------------------------------------- views
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
    label = f"{row['task']} {row['metric']}"
    if row["filter"] not in ("", "none"):
        label += f" [{row['filter']}]"
    bd = breakdown_label(row)
    return f"{label} {bd}" if bd else label


def entity(row: Row) -> tuple[str, str]:
    return row["model"], row["adapter"]


def latest(rows: Iterable[Row]) -> list[Row]:
    """Per entity and cell, the row of the newest run (ties broken by run id, so the choice is stable)."""
    best: dict[tuple, Row] = {}
    for r in rows:
        key = (*entity(r), *(r[k] for k in KEY if k != "run_id"))
        if key not in best or (r["date"], r["run_id"]) > (best[key]["date"], best[key]["run_id"]):
            best[key] = r
    return list(best.values())


def _col_order(row: Row):
    length = int(row["length"]) if row["length"].isdigit() else -1
    pos = _num(row["position"])
    return (row["task"], row["metric"], row["filter"], length, pos if pos is not None else -1.0, row["position"])


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
        line[column_label(r)] = r["value"]
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
    header, body = pivot(rows)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    value, stderr = _num(row["value"]), _num(row["stderr"])
    if value is None:
        return row["value"]
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def report_model(rows: Iterable[Row]) -> dict:
    """What the Markdown and HTML views show: the runs, a summary table, one table per broken-down metric."""
    cells = latest(rows)
    entities = sorted({entity(r) for r in cells})
    ent_label = {e: e[0] + (f" + {e[1]}" if e[1] else "") for e in entities}

    def table(title: str, selected: list[Row], label) -> dict:
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


def _report_env():
    # Our own sandboxed environment with autoescaping: the page shows user-controlled strings (model names,
    # paths), while harness_ext.templating renders prompts and must not escape.
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from harness_ext.paths import templates_dir

    return SandboxedEnvironment(
        loader=FileSystemLoader(str(templates_dir() / "report")),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.jinja")),
        keep_trailing_newline=True,
    )


def render_markdown(rows: Iterable[Row], title: str = "Leaderboard") -> str:
    return _report_env().get_template("leaderboard.md.jinja").render(title=title, **report_model(rows))


def render_html(rows: Iterable[Row], title: str = "Leaderboard", plots: dict[str, bytes] | None = None) -> str:
    """A self-contained page: data tables, sortable in the browser, and the PNG plots inlined as data URIs."""
    import base64

    images = [{"name": name, "data": base64.b64encode(png).decode("ascii")} for name, png in (plots or {}).items()]
    return _report_env().get_template("leaderboard.html.jinja").render(title=title, images=images, **report_model(rows))
