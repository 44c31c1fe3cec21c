"""Score-by-length curves from leaderboard rows, and their effective lengths: what results, leaderboard, plots
and gate show (the rules themselves are harness_ext.reporting.effective_length).

A curve is one (model, adapter, task or group, metric, filter) with a score at each measured length: the
rows with a length and no position (``both_acc_len400``, FLenQA's ``acc_ctx500``, lm-eval ruler's ``"4096"``,
babilong runs at ``max_seq_lengths`` "4k", "8k", ...). A group's curve is the unweighted mean of its tasks'
curves at the lengths all of them measured (RULER averages its 13 tasks so), computed from the tasks because
lm-eval's groups do not aggregate per-length keys (ruler's group aggregates only "4096").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.effective_length import (
    Bootstrap,
    EffectiveLength,
    Rule,
    bootstrap,
    effective_length,
    weighted_averages,
)
from harness_ext.reporting.leaderboard_rows import COLUMNS, Row, rows_from_run
from harness_ext.reporting.leaderboard_views import latest
from harness_ext.reporting.results_io import Run, as_number, find_results, iter_samples, load_run
from harness_ext.tasklib import breakdowns as names

# Per task, the metric whose curve is summarised (the first one present); tasks with none of them: every metric.
PRIMARY_METRICS = (names.KV_METRIC, names.NIAH_METRIC, names.PASSKEY_METRIC, names.MDQA_METRIC, names.FLENQA_METRIC,
                   names.BARE_LENGTH_METRIC)  # fmt: skip
DERIVED_METRICS = ("effective_length", "wavg_inc", "wavg_dec")


@dataclass
class Curve:
    model: str
    adapter: str
    task: str  # a task, or a group (then ``members`` lists the tasks averaged)
    group: str
    metric: str
    filter: str
    points: dict[int, float]
    rows: list[Row]  # the rows the points come from (every member's, for a group)
    members: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.model + (f" + {self.adapter}" if self.adapter else "")


def _length_cells(rows: Iterable[Row]) -> dict[tuple[str, ...], list[Row]]:
    """The newest per-length rows (a length, no position), by (model, adapter, task, group, metric, filter)."""
    cells: dict[tuple[str, ...], list[Row]] = {}
    for r in latest(rows):
        if r["length"] and not r["position"] and r["metric"] not in DERIVED_METRICS + names.LOSS_METRICS:
            cells.setdefault((r["model"], r["adapter"], r["task"], r["group"], r["metric"], r["filter"]), []).append(r)
    return cells


def curves(rows: Iterable[Row], metrics: Sequence[str] | None = None) -> list[Curve]:
    """Every task's and group's score-by-length curve (one metric per task: ``metrics`` or PRIMARY_METRICS)."""
    task_curves: dict[tuple[str, ...], Curve] = {}
    for (model, adapter, task, group, metric, filt), cell in _length_cells(rows).items():
        points = {int(r["length"]): float(r["value"]) for r in cell}
        task_curves[(model, adapter, task, metric, filt)] = Curve(
            model, adapter, task, group, metric, filt, points, cell
        )
    chosen = _choose_metrics(task_curves, metrics)
    out = [c for key, c in task_curves.items() if key in chosen]
    groups: dict[tuple[str, ...], list[Curve]] = {}
    for c in out:
        if c.group and c.group != c.task:
            groups.setdefault((c.model, c.adapter, c.group, c.metric, c.filter), []).append(c)
    for (model, adapter, group, metric, filt), members in groups.items():
        common = set.intersection(*(set(m.points) for m in members))
        if len(members) < 2 or not common:
            continue
        out = [
            c for c in out if (c.model, c.adapter, c.task, c.metric, c.filter) != (model, adapter, group, metric, filt)
        ]
        points = {length: sum(m.points[length] for m in members) / len(members) for length in sorted(common)}
        member_rows = [r for m in members for r in m.rows if int(r["length"]) in common]
        names_ = tuple(sorted(m.task for m in members))
        out.append(Curve(model, adapter, group, group, metric, filt, points, member_rows, names_))
    return sorted(out, key=lambda c: (c.model, c.adapter, c.task, c.metric, c.filter))


def _choose_metrics(task_curves: dict[tuple[str, ...], Curve], metrics: Sequence[str] | None) -> set[tuple[str, ...]]:
    by_task: dict[tuple[str, ...], list[str]] = {}
    for model, adapter, task, metric, filt in task_curves:
        by_task.setdefault((model, adapter, task, filt), []).append(metric)
    chosen = set()
    for (model, adapter, task, filt), present in by_task.items():
        wanted = [m for m in (metrics or PRIMARY_METRICS) if m in present]
        for metric in wanted[:1] if not metrics else wanted:
            chosen.add((model, adapter, task, metric, filt))
        if not wanted and not metrics:
            chosen.update((model, adapter, task, m, filt) for m in present)
    return chosen


@dataclass
class Summary:
    curve: Curve
    results: list[EffectiveLength]
    boots: list[Bootstrap | None]  # None where the runs' sample logs (--log_samples) are missing
    averages: tuple[float, float, float]  # avg, wAvg(inc), wAvg(dec)
    documents: int | None = None  # documents behind the curve (from the sample logs)


def summarize(
    rows: Iterable[Row],
    rules: Sequence[Rule],
    runs: Iterable[Run] = (),
    metrics: Sequence[str] | None = None,
    iters: int = 1000,
    seed: int = 0,
) -> list[Summary]:
    """Effective length under each rule, RULER's averages and (where sample logs exist) the bootstrap."""
    by_source = {str(run.path.resolve()): run for run in runs}
    cache: dict[Path, list[dict]] = {}
    out = []
    for curve in curves(rows, metrics):
        docs = document_cells(curve, by_source, cache)
        what = f"{curve.label}, task {curve.task}, metric {curve.metric}"
        results = [effective_length(curve.points, rule, what=what) for rule in rules]
        boots = [bootstrap(docs, rule, iters=iters, seed=seed, what=what) if docs else None for rule in rules]
        n = sum(len(v) for v in docs.values()) if docs else None
        out.append(Summary(curve, results, boots, weighted_averages(curve.points, what), n))
    return out


def summarize_paths(paths: Iterable[str | Path], rules: Sequence[Rule]) -> tuple[list[Summary], list[Row]]:
    """``needles results``: the newest results file of each folder (or the file named), summarised."""
    rows: list[Row] = []
    runs = []
    for path in paths:
        found = find_results([path])
        run = load_run(max(found, key=os.path.getmtime) if Path(path).is_dir() else found[0])
        runs.append(run)
        rows += rows_from_run(run)
    return summarize(rows, rules, runs), rows


def require_curves(summaries: list[Summary], rows: list[Row], what: str) -> list[Summary]:
    """``summaries``, or exit 2 naming what the inputs hold instead of a length breakdown."""
    if not summaries:
        found = sorted({f"{r['task']}:{r['metric']}" for r in rows})
        raise NeedlesError(
            f"{what}: the inputs have no length breakdown (no score at two or more input lengths, nor at one); "
            f"found {found[:10]}{' ...' if len(found) > 10 else ''}",
            fix="pass results of a length sweep: this plugin's KV / NIAH / synth_mdqa tasks with --metadata "
            "'{\"lengths\": [...]}', FLenQA, lm-eval's ruler, or babilong runs at several max_seq_lengths",
        )
    return summaries


def document_cells(
    curve: Curve, runs: dict[str, Run], cache: dict[Path, list[dict]]
) -> dict[tuple[str, int], list[float]] | None:
    """Per (task, length), the per-document scores behind the curve, from the sample logs; None if any is missing."""
    cells: dict[tuple[str, int], list[float]] = {}
    for r in curve.rows:
        run = runs.get(r["source"])
        path = run.samples_path(r["task"]) if run else None
        if path is None:
            return None
        if path not in cache:
            cache[path] = list(iter_samples(path))
        length = int(r["length"])
        values = _doc_values(cache[path], curve.metric, r["filter"], length)
        if not values and names.run_length(run.task_metadata(r["task"])) == length:
            values = _doc_values(cache[path], curve.metric, r["filter"], None)  # babilong: one length per run
        if not values:
            return None
        cells[(r["task"], length)] = values
    return cells


def _doc_values(samples: list[dict], metric: str, filt: str, length: int | None) -> list[float]:
    out = []
    for row in samples:
        if row.get("filter", "none") != filt:
            continue
        for key, raw in row.items():
            value = as_number(raw)
            if value is None or names.not_run(key, value):
                continue
            bd = names.parse_name(key)
            if bd.base == metric and bd.position is None and bd.length == length:
                out.append(value)
    return out


def _run_id(rows: list[Row]) -> str:
    ids = sorted({r["run_id"] for r in rows})
    if len(ids) == 1:
        return ids[0]
    return "combined:" + hashlib.sha256(" ".join(ids).encode()).hexdigest()[:12]


def leaderboard_rows(summaries: Iterable[Summary], averages: bool = True) -> list[Row]:
    """Tidy rows: ``effective_length`` per rule (the rule label in ``filter``, the outcome and bootstrap in
    ``note``; value L, the longest length for ">=", 0 for "<"), and ``wavg_inc`` / ``wavg_dec``."""
    out = []
    for s in summaries:
        c = s.curve
        newest = max(c.rows, key=lambda r: (r["date"], r["run_id"]))
        base = {k: newest.get(k, "") for k in COLUMNS}
        base.update(task=c.task, group=c.group, length="", position="", position_kind="", stderr="",
                    stderr_source="", n="" if s.documents is None else str(s.documents), n_shot="",
                    task_version="", task_hash="", data_sha256="", run_id=_run_id(c.rows),
                    source="; ".join(sorted({r["source"] for r in c.rows})))  # fmt: skip
        grid = ", ".join(str(x) for x in sorted(c.points))
        of = f"{c.metric}" + (f" [{c.filter}]" if c.filter not in ("", "none") else "")
        of += f" of {len(c.members)} tasks (mean)" if c.members else ""
        for result, boot in zip(s.results, s.boots, strict=True):
            note = [result.display(), result.rule.describe(), f"{of} at lengths {grid}"]
            if boot is not None:
                note.append(f"bootstrap over documents ({boot.iters} resamples, seed {boot.seed}): "
                            f"{boot.level:.0%} interval {boot.interval_text()}; {boot.support_text()}")  # fmt: skip
            filt = result.rule.label + (f" {c.filter}" if c.filter not in ("", "none") else "")
            out.append({**base, "metric": "effective_length", "filter": filt, "value": str(result.value),
                        "note": " | ".join(note)})  # fmt: skip
        if averages and len(c.points) > 1:
            for metric, value in (("wavg_inc", s.averages[1]), ("wavg_dec", s.averages[2])):
                note = f"RULER's weighted average of {of}: weights 1..n by length rank ({metric[-3:]}reasing)"
                out.append({**base, "metric": metric, "filter": c.filter, "value": repr(value), "note": note})
    return out


def format_summaries(summaries: Sequence[Summary]) -> str:
    """The effective-length table of ``needles results`` (aligned text)."""
    header = ("model", "task", "metric", "lengths", "rule", "effective length", "bootstrap 90%", "wAvg(inc)",
              "wAvg(dec)")  # fmt: skip
    body = []
    for s in summaries:
        c = s.curve
        task = c.task + (f" ({len(c.members)} tasks)" if c.members else "")
        metric = c.metric + (f" [{c.filter}]" if c.filter not in ("", "none") else "")
        grid = f"{min(c.points)}-{max(c.points)} ({len(c.points)})" if len(c.points) > 1 else str(min(c.points))
        for result, boot in zip(s.results, s.boots, strict=True):
            body.append((c.label, task, metric, grid, result.rule.label, result.display(),
                         boot.interval_text() if boot else "n/a (no sample logs)",
                         f"{s.averages[1]:.3f}", f"{s.averages[2]:.3f}"))  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
