"""The scorecard's data: from the family runs' lm-eval results to ``scorecard.json`` / ``scorecard.csv`` (and the page,
``harness_ext.reporting.scorecard_html``).

Everything is read from lm-eval's own output through the project's readers (``results_io``, ``leaderboard_rows``)
and summarised by the one effective-length implementation (``length_curves`` / ``effective_length``); this module
only arranges it: effective length per family up front, curves, length x depth grids, the MDQA position curve,
the continuation loss by context length, the reference leaderboards beside, the commands and data hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic, write_json_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.core.paths import templates_dir
from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.leaderboard_csv import read_csv, to_csv_text
from harness_ext.reporting.leaderboard_rows import Row, rows_from_run
from harness_ext.reporting.leaderboard_views import latest
from harness_ext.reporting.length_curves import Summary, leaderboard_rows, require_curves, summarize
from harness_ext.reporting.results_io import Run, load_run
from harness_ext.tasklib import breakdowns as names

SCHEMA = "needles.scorecard/1"
RULER_CSV = "ruler_main_results.csv"
LITM_CSV = "lost_in_the_middle_mdqa20.csv"
MDQA_TASK = "synth_mdqa_real"


def reference_path(name: str) -> Path | None:
    """A reference leaderboard shipped with the package (``leaderboards/``), or None when absent."""
    path = templates_dir().parent / "leaderboards" / name
    return path if path.is_file() else None


def load_runs(families: Sequence[dict], root: Path) -> list[Run]:
    """The family runs' results files (paths relative to the scorecard folder ``root``)."""
    return [load_run(root / f["results"]) for f in families if f.get("results")]


def curve_entries(summaries: Sequence[Summary]) -> list[dict]:
    """Per task or group: its score-by-length points, and each rule's outcome with its bootstrap interval."""
    out = []
    for s in summaries:
        c = s.curve
        out.append({
            "task": c.task, "metric": c.metric, "filter": c.filter, "members": list(c.members),
            "model": c.label, "points": {str(k): v for k, v in sorted(c.points.items())}, "documents": s.documents,
            "avg": s.averages[0], "wavg_inc": s.averages[1], "wavg_dec": s.averages[2],
            "rules": [
                {"rule": r.rule.label, "describe": r.rule.describe(), "kind": r.kind, "length": r.length,
                 "outcome": r.display(), "cutoff": r.cutoff,
                 "bootstrap": b.interval_text() if b else None, "support": b.support_text() if b else None}
                for r, b in zip(s.results, s.boots, strict=True)
            ],
        })  # fmt: skip
    return out


def grids(rows: Sequence[Row]) -> list[dict]:
    """Length x depth grids of the tasks that record a depth (KV, NIAH, passkey): {task, metric, lengths, depths,
    values}."""
    from harness_ext.reporting.plots import kv_cells

    out = []
    for metric, pattern in names.DEPTH_GRIDS:
        for (label, task), cells in sorted(kv_cells(rows, metric, task=pattern).items()):
            lengths = sorted({k[0] for k in cells})
            depths = sorted({k[1] for k in cells})
            values = [[cells.get((length, d)) for d in depths] for length in lengths]
            out.append({"model": label, "task": task, "metric": metric, "lengths": lengths, "depths": depths,
                        "values": values})  # fmt: skip
    return out


def positions(rows: Sequence[Row], task: str = MDQA_TASK) -> dict:
    """The MDQA position curve: {position: {value, stderr, n}} of ``best_subspan_em_pos<P>`` (all lengths pooled)."""
    out = {}
    for r in latest(rows):
        if r["task"] == task and r["metric"] == names.MDQA_METRIC and r["position_kind"] == "doc" and not r["length"]:
            out[int(r["position"])] = {"value": float(r["value"]), "stderr": float(r["stderr"]) if r["stderr"] else None,
                                       "n": int(r["n"]) if r["n"] else None}  # fmt: skip
    return {str(k): out[k] for k in sorted(out)}


def loss_curves(rows: Sequence[Row]) -> list[dict]:
    """The continuation-loss curves (lower is better, no threshold): per model and task, {P: {nll, nll_stderr, ppl}}
    of ``nll_len<P>`` / ``ppl_len<P>``."""
    from harness_ext.reporting.plots import loss_series

    nll, ppl = loss_series(rows, "nll"), loss_series(rows, "ppl")
    out = []
    for (label, task), points in sorted(nll.items()):
        ppls = ppl.get((label, task), {})
        out.append({"model": label, "task": task, "points": {
            str(p): {"nll": v, "nll_stderr": se, "ppl": ppls[p][0] if p in ppls else None}
            for p, (v, se) in sorted(points.items())}})  # fmt: skip
    return out


def references() -> dict:
    """The published rows shown beside ours: RULER (claimed and effective length, score per length) and Lost in the
    Middle (20-document accuracy by gold position)."""
    out: dict = {"ruler": [], "lost_in_the_middle": []}
    if path := reference_path(RULER_CSV):
        by_model: dict[str, dict] = {}
        for r in read_csv(path):
            entry = by_model.setdefault(r["model"], {"model": r["model"], "scores": {}})
            if r["metric"] == "score" and r["length"]:
                entry["scores"][r["length"]] = float(r["value"])
            elif r["metric"] == "claimed_length":
                entry["claimed"] = int(float(r["value"]))
            elif r["metric"] == "effective_length" and r["filter"].startswith("ruler>"):
                entry["effective"] = r["note"].split(" | ", 1)[0]
        out["ruler"] = list(by_model.values())
        out["ruler_source"] = str(path.name)
    if path := reference_path(LITM_CSV):
        by_model = {}
        for r in read_csv(path):
            if names.MDQA_POSITION_TASK.match(r["task"]) and r["metric"] == names.MDQA_METRIC:
                by_model.setdefault(r["model"], {})[r["position"]] = float(r["value"])
        out["lost_in_the_middle"] = [{"model": m, "positions": p} for m, p in sorted(by_model.items())]
        out["lost_in_the_middle_source"] = str(path.name)
    return out


def data_hashes(runs: Sequence[Run]) -> list[dict]:
    """Per task: the generated data's SHA-256, the files it read, lm-eval's task hash, and the results file's hash."""
    out = []
    for run in runs:
        digest = hashlib.sha256(run.path.read_bytes()).hexdigest()
        hashes = run.data.get("task_hashes") or {}
        for task in sorted(run.data.get("configs") or {}):
            meta = run.task_metadata(task)
            out.append({"task": task, "data_sha256": str(meta.get("needles_data_sha256", "")),
                        "data_files": meta.get("needles_data_files") or {}, "task_hash": str(hashes.get(task, "")),
                        "version": str((run.data.get("versions") or {}).get(task, "")),
                        "results": run.path.name, "results_sha256": digest})  # fmt: skip
    return out


def build_scorecard(families: Sequence[dict], root: Path, rules: Sequence[Rule], meta: dict) -> tuple[dict, list[Row]]:
    """(the scorecard dict written as scorecard.json, the tidy rows behind it: scorecard.csv and the plots)."""
    runs = load_runs(families, root)
    if not runs:
        raise NeedlesError(
            "the scorecard has no finished family run (every family was left out)",
            fix="make the data available (see the reasons above), e.g. set NEEDLES_NIAH_MIRROR / NEEDLES_MDQA_MIRROR",
        )
    rows = [r for run in runs for r in rows_from_run(run)]
    summaries = require_curves(summarize(rows, list(rules), runs), rows, "scorecard")
    card = {
        "schema": SCHEMA,
        **meta,
        "rules": [{"label": r.label, "describe": r.describe()} for r in rules],
        "families": list(families),
        "effective_length": curve_entries(summaries),
        "grids": grids(rows),
        "positions": positions(rows),
        "loss": loss_curves(rows),
        "references": references(),
        "data": data_hashes(runs),
        "lm_eval_version": next((r["lm_eval_version"] for r in rows if r["lm_eval_version"]), ""),
        "date": max((r["date"] for r in rows), default=""),
    }
    return card, rows + leaderboard_rows(summaries)


def write_scorecard(card: dict, rows: list[Row], out: Path, rule: Rule) -> None:
    """scorecard.json, scorecard.csv (the tidy leaderboard rows, effective-length rows included) and the page."""
    from harness_ext.reporting.scorecard_html import render_scorecard

    write_json_atomic(out / "scorecard.json", card)
    write_atomic(out / "scorecard.csv", to_csv_text(rows))
    write_atomic(out / "scorecard.html", render_scorecard(card, rows, rule))
