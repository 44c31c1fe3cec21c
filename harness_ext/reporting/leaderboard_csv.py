"""The tidy leaderboard CSV: read (strictly our schema), write (sorted, stable), upsert by row identity, and
``export``, which upserts runs into a CSV under a file lock so concurrent exports lose no row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness_ext.core.output_files import locked, output_error, write_output
from harness_ext.reporting import length_curves
from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.leaderboard_rows import COLUMNS, KEY, Row, length_number, rows_from_run
from harness_ext.reporting.results_io import InvalidInput, find_results, load_run
from harness_ext.tasklib.breakdowns import POSITION_KINDS, is_length, is_position


def read_csv(path: Path) -> list[Row]:
    """A leaderboard CSV in exactly our schema; anything else is an error naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a UTF-8 text CSV") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror or exc})", fix="check the path") from None
    if not text.strip():
        return []
    if "\0" in text:
        raise InvalidInput(f"{path}: contains NUL bytes, so not a leaderboard CSV (damaged file?)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        if header != COLUMNS:
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            raise InvalidInput(
                f"{path}: mixed schema: CSV header differs from the leaderboard schema "
                f"(missing {missing}, unexpected {extra[:5]})",
                fix="export into a new file, or convert the old one to the current columns",
            )
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(COLUMNS):
                raise InvalidInput(
                    f"{path}: line {reader.line_num} has {len(fields)} fields, expected {len(COLUMNS)} "
                    "(damaged, truncated or hand-edited file)"
                )
            row = dict(zip(COLUMNS, fields, strict=True))
            _check_row(path, reader.line_num, row)
            rows.append(row)
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise InvalidInput(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    if text[-1] not in "\r\n":
        # We always end the file with a newline: without one, the last row may have been cut off mid-field.
        raise InvalidInput(
            f"{path}: truncated (the last line has no newline, so the last row may be cut short)",
            fix="restore the file, or re-export the runs into a new one",
        )
    return rows


def _sort_key(row: Row) -> tuple:
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
        length_number(row["length"]),
        pos,
        row["position_kind"],
        row["date"],
        row["run_id"],
    )


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_row(path: Path, lineno: int, row: Row) -> None:
    """The columns the views and plots compute with hold what the exporter writes (a damaged or hostile file)."""
    problems = []
    if not _finite(row["value"]):
        problems.append(f"value {row['value'][:40]!r} is not a finite number")
    if row["stderr"] and not _finite(row["stderr"]):
        problems.append(f"stderr {row['stderr'][:40]!r} is not a finite number")
    if row["length"] and not is_length(row["length"]):
        problems.append(f"length {row['length'][:40]!r} is not a whole number")
    kind = row["position_kind"]
    if kind and kind not in POSITION_KINDS:
        problems.append(f"position_kind {kind[:40]!r} is not one of {list(POSITION_KINDS)}")
    elif (row["position"] or kind) and not is_position(kind, row["position"]):
        problems.append(f"position {row['position'][:40]!r} does not fit position_kind {kind!r}")
    if problems:
        raise InvalidInput(
            f"{path}: line {lineno}: {'; '.join(problems)}", fix="restore the file or re-export the runs"
        )


def to_csv_text(rows: Iterable[Row]) -> str:
    """The CSV text of ``rows``: our header, rows in a stable order, ``\\n`` line ends."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=_sort_key):
        writer.writerow([row.get(c, "") for c in COLUMNS])
    return buf.getvalue()


def row_key(row: Row) -> tuple[str, ...]:
    """A row's identity (KEY columns): the same run and cell."""
    return tuple(row[k] for k in KEY)


def upsert(existing: list[Row], new: list[Row]) -> list[Row]:
    """Merge by KEY: the same run replaces its own rows; other runs' rows stay."""
    merged = {row_key(r): r for r in existing}
    for r in new:
        merged[row_key(r)] = r
    return list(merged.values())


def collect_rows(
    inputs: Iterable[str | Path],
    model: str | None = None,
    adapter: str | None = None,
    rules: Sequence[Rule] | None = None,
) -> list[Row]:
    """Rows from a mix of lm-eval outputs (folders, results JSON) and leaderboard CSVs. Validates all first.

    With ``rules``, the lm-eval runs' score-by-length curves also give ``effective_length`` (one row per rule)
    and ``wavg_inc`` / ``wavg_dec`` rows (harness_ext.reporting.length_curves); a CSV's rows are kept as they are.
    """
    rows: list[Row] = []
    run_rows: list[Row] = []
    runs = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".csv":
            rows = upsert(rows, read_csv(path))
            continue
        for results in find_results([path]):
            run = load_run(results)
            new = rows_from_run(run, model, adapter)
            runs.append(run)
            run_rows = upsert(run_rows, new)
            rows = upsert(rows, new)
    if rules and runs:
        summaries = length_curves.summarize(run_rows, rules, runs)
        rows = upsert(
            rows, length_curves.leaderboard_rows(length_curves.require_curves(summaries, run_rows, "effective length"))
        )
    return rows


def export(
    inputs: Iterable[str | Path],
    output: Path,
    model: str | None = None,
    adapter: str | None = None,
    rules: Sequence[Rule] | None = None,
) -> tuple[list[Row], int]:
    """Upsert the inputs into ``output`` atomically; returns (all rows, number of rows added or changed).

    The read-modify-write of ``output`` runs under an exclusive lock, so processes exporting into the same
    file at once each see the others' rows and none is lost.
    """
    output = Path(output)
    new = collect_rows(inputs, model, adapter, rules)  # every input is parsed before anything is written
    with locked(output, "leaderboard CSV"):
        try:
            exists = output.is_file()
        except OSError as exc:
            raise output_error(output, exc, "leaderboard CSV") from None
        existing = read_csv(output) if exists else []
        before = {row_key(r): r for r in existing}
        changed = sum(1 for r in new if before.get(row_key(r)) != r)
        merged = upsert(existing, new)
        text = to_csv_text(merged)
        if not exists or output.read_text(encoding="utf-8") != text:
            write_output(output, text, "leaderboard CSV")
    return merged, changed
