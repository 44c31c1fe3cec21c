"""Build the reference leaderboard ``leaderboards/ruler_main_results.csv`` from RULER's published table.

Input: ``shared/data/ruler/main_results.csv`` (RULER's README table, transcribed; percentages). Output: tidy rows
in the leaderboard schema (values as fractions, ``run_id`` ``ref:arXiv:2404.06654``): per model the score at
each length (task ``ruler``, metric ``score``), the average over lengths (metric ``score``, no length),
``wavg_inc`` / ``wavg_dec`` and ``claimed_length`` as published, and ``effective_length`` under the RULER rule
(85.6) and the relative rule, computed by harness_ext.reporting.length_curves from the six scores: where the
published effective length differs from the rule, the note says so and gives the published value (the row
keeps the rule's value; its label says which rule).

Usage: python scripts/build_ruler_leaderboard.py [MAIN_RESULTS_CSV] [-o leaderboards/ruler_main_results.csv]
(default input: $NEEDLES_SHARED_DATA/ruler/main_results.csv, else ../shared/data/ruler/main_results.csv).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from harness_ext.reporting.effective_length import EffectiveLength, default_rules
from harness_ext.reporting.leaderboard_csv import to_csv_text
from harness_ext.reporting.leaderboard_rows import COLUMNS, Row
from harness_ext.reporting.length_curves import leaderboard_rows, summarize

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "leaderboards" / "ruler_main_results.csv"
RUN_ID = "ref:arXiv:2404.06654"
SOURCE = (
    "Hsieh et al. 2024, RULER (arXiv:2404.06654), results table of the README of github.com/NVIDIA/RULER "
    "at c3f5e3b; average of 13 tasks"
)
LENGTHS = {"4K": 4096, "8K": 8192, "16K": 16384, "32K": 32768, "64K": 65536, "128K": 131072}
_SIZE = re.compile(r"^(\d+)([KM])$")


def tokens(text: str) -> int:
    """RULER's length notation: ``4K`` -> 4096, ``1M`` -> 1048576 (K = 1024 tokens, as RULER's 4096...131072)."""
    m = _SIZE.match(text.strip().upper())
    if not m:
        raise ValueError(f"not a length: {text!r}")
    return int(m.group(1)) * (1024 if m.group(2) == "K" else 1024 * 1024)


def ruler_notation(result: EffectiveLength) -> str:
    """An outcome as RULER's table writes it: ``64K``, ``>128K`` (above at every length), ``<4K``."""

    def k(n: int) -> str:
        return f"{n // 1024}K"

    if result.kind == "at_least":
        return f">{k(result.lengths[-1])}"
    if result.kind == "below_all":
        return f"<{k(result.lengths[0])}"
    return k(result.length)


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def scores(record: dict[str, str]) -> dict[int, float]:
    """Length -> published score (percent); ``-`` (not measured) and blanks left out."""
    out = {}
    for name, length in LENGTHS.items():
        text = record[name].strip()
        if text not in ("", "-"):
            out[length] = float(text)
    return out


def _row(model: str, metric: str, value: float | int, note: str, length: int | None = None) -> Row:
    row = dict.fromkeys(COLUMNS, "")
    row.update(model=model, task="ruler", group="ruler", metric=metric, filter="none", value=repr(value),
               length="" if length is None else str(length), run_id=RUN_ID, source=SOURCE, note=note)  # fmt: skip
    return row


def build(path: Path) -> list[Row]:
    rules = default_rules()
    rows: list[Row] = []
    for record in read_table(path):
        authors = record["model"].strip().find("*") >= 0
        model = record["model"].replace("*", "").strip()
        note = "reported by the model authors" if authors else ""
        points = scores(record)
        model_rows = [_row(model, "score", round(v / 100, 6), note, length) for length, v in points.items()]
        model_rows.append(_row(model, "claimed_length", tokens(record["claimed_length"]), "claimed context length"))
        for column, metric in (("avg", "score"), ("wavg_inc", "wavg_inc"), ("wavg_dec", "wavg_dec")):
            if record[column].strip() not in ("", "TBD", "-"):
                label = {"score": "average over the lengths", "wavg_inc": "published wAvg(inc)",
                         "wavg_dec": "published wAvg(dec)"}[metric]  # fmt: skip
                model_rows.append(_row(model, metric, round(float(record[column]) / 100, 6), label))
        published = record["effective_length"].strip()
        if published:  # the first row (Llama2 7B, the threshold itself) has no effective length
            (summary,) = summarize(model_rows, rules)
            for result, row in zip(summary.results, leaderboard_rows([summary], averages=False), strict=True):
                if result.rule.kind == "ruler":
                    same = ruler_notation(result).upper() == published.upper()
                    row["note"] += f" | published: {published}" + ("" if same else " (DISAGREES with the rule)")
                    row["note"] += f" | {note}" if note else ""
                model_rows.append(row)
        rows.extend(model_rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    shared = Path(os.environ.get("NEEDLES_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", default=str(shared / "ruler" / "main_results.csv"))
    parser.add_argument("-o", "--output", default=str(OUTPUT))
    args = parser.parse_args(argv)
    text = to_csv_text(build(Path(args.table)))
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {args.output}: {text.count(chr(10)) - 1} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
