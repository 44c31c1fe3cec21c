"""Leaderboard rows: one lm-eval run -> tidy rows, one per (model, adapter, task, group, length, position, metric,
filter); plus a run's identity (model, adapter, date, run id).

Rows are kept as ``dict[str, str]`` (exactly what the CSV holds), so a row read back from a file and a row made
from a fresh run compare equal and re-exporting a run changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from harness_ext.core.stats import mean_stderr
from harness_ext.reporting.results_io import Run, as_number, sample_metric_values, split_metric_key
from harness_ext.tasklib.breakdowns import is_length, not_run, parse_name, run_length

COLUMNS = [
    "model", "adapter", "task", "group", "length", "position", "position_kind", "metric", "filter",
    "value", "stderr", "stderr_source", "n", "n_shot", "task_version", "task_hash", "data_sha256",
    "chat_template_sha", "lm_eval_version", "backend", "model_args", "date", "run_id", "source", "note",
]  # fmt: skip
# A row's identity: re-exporting a run replaces its rows with identical ones; a newer run adds its own.
KEY = ("run_id", "model", "adapter", "task", "group", "length", "position", "position_kind", "metric", "filter")

Row = dict[str, str]


def length_number(text: str) -> int:
    """The ``length`` column as a number for ordering (-1 when empty or not a plain number)."""
    return int(text) if is_length(text) else -1


def _fmt(value: object) -> str:
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
    if text.startswith(("/", "./", "../", "~")) or _exists(text):
        return Path(text).name
    return text


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # name too long, unknown ~user, NUL byte: not a local folder
        return False


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
        try:
            return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):  # a timestamp no calendar date has (hostile or damaged file)
            pass
    return (run.date_id or "").replace("T", " ")


def run_id(run: Run) -> str:
    """A stable 12-hex id of one run: the same results file always gets the same id."""
    payload = [run.data.get("date"), run.data.get("model_name"), run.model_args(), run.path.name]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _task_groups(data: dict) -> dict[str, str]:
    """task -> the group it belongs to (the first one listed)."""
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
        "chat_template_sha": _fmt(data.get("chat_template_sha") or ""),
        "lm_eval_version": _fmt(data.get("lm_eval_version") or ""),
        "backend": _fmt((data.get("config") or {}).get("model") or data.get("model_source") or ""),
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
            rows.extend(_task_rows(run, task, group, block, common, _run_length(run, task)))
    return rows


def _run_length(run: Run, task: str) -> int | None:
    """The length a task (or every subtask of a group) was run at when only its metadata says it (babilong)."""
    subtasks = (run.data.get("group_subtasks") or {}).get(task)
    found = {run_length(run.task_metadata(t)) for t in (subtasks if subtasks else [task])}
    return found.pop() if len(found) == 1 else None


def _task_rows(run: Run, task: str, group: str, block: dict, common: Row, length_of_run: int | None) -> list[Row]:
    """Rows of one task (or group) block: each numeric metric with its stderr, n and breakdown columns."""
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
        elif as_number(raw) is not None and not not_run(metric, as_number(raw)):  # ruler's -1: length not run
            values[(metric, filt)] = as_number(raw)
    if not values:
        return []
    # lm-eval writes "N/A" for some stderrs (e.g. ruler-style tasks): recompute them from the sample log.
    from_samples = _stderr_from_samples(run, task, [k for k in values if stderrs.get(k) is None])
    task_bd = parse_name(task)
    n_task = run.section("n-samples", task).get("effective")
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
        length = next((x for x in (bd.length, task_bd.length, length_of_run) if x is not None), None)
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
            task_hash=_fmt((data.get("task_hashes") or {}).get(task, "")),
            data_sha256=_fmt(meta.get("needles_data_sha256", "")),
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
        stderr = mean_stderr(vals)
        if stderr is not None:
            out[key] = (stderr, len(vals))
    return out
