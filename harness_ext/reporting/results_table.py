"""A readable table of an lm-eval results JSON: model, task, length, position, score +- stderr (``needles results``).

Breakdown keys (``both_acc_len1024_depth0.50``) are split by harness_ext.tasklib.breakdowns, the one parser.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness_ext.reporting.results_io import InvalidInput, as_number, find_results, parse_model_args, read_json
from harness_ext.tasklib.breakdowns import parse_name

# Metric names the table shows: what our tasks and lm-eval's usual metrics are called (letters, digits, _).
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Row:
    model: str
    task: str
    length: str
    position: str
    metric: str
    value: float
    stderr: float | None


def model_name(results: dict) -> str:
    """``<model>`` or ``<model>+<adapter>``: last path components of ``pretrained=`` and ``lora_local_path=``."""
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    args = parse_model_args(config.get("model_args"))
    pretrained, lora = args.get("pretrained"), args.get("lora_local_path")
    name = str(pretrained).rstrip("/").split("/")[-1] if pretrained else str(config.get("model", "?"))
    return f"{name}+{str(lora).rstrip('/').split('/')[-1]}" if lora else name


def rows(results: dict, metrics: tuple[str, ...] | None = None) -> list[Row]:
    """One row per numeric metric (and breakdown) of every task; ``metrics`` keeps only those base names."""
    out = []
    model = model_name(results)
    block = results.get("results")
    for task, scores in sorted((block if isinstance(block, dict) else {}).items()):
        if not isinstance(scores, dict):
            continue
        for key, value in scores.items():
            if "," not in key or "_stderr" in key or as_number(value) is None:
                continue
            name, filt = key.split(",", 1)
            if not _METRIC_NAME.match(name):
                continue
            bd = parse_name(name)
            if metrics and bd.base not in metrics:
                continue
            out.append(
                Row(
                    model,
                    task,
                    "all" if bd.length is None else str(bd.length),
                    bd.position or "all",
                    bd.base,
                    float(value),
                    as_number(scores.get(f"{name}_stderr,{filt}")),
                )
            )
    return out


def load_results(path: str | Path) -> dict:
    """The results JSON at ``path``, or the newest ``results_*.json`` under a folder; errors name the file."""
    found = find_results([path])
    newest = max(found, key=os.path.getmtime) if Path(path).is_dir() else found[0]
    data = read_json(newest)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise InvalidInput(
            f"{newest}: not lm-eval output (no 'results' object)",
            fix="pass the results_*.json that `lm_eval run --output_path` writes, or its folder",
        )
    return data


def rows_from_paths(paths: Iterable[str | Path], metrics: tuple[str, ...] | None = None) -> list[Row]:
    """Rows of every results file or folder named (all read and checked before any is shown)."""
    return [row for path in paths for row in rows(load_results(path), metrics)]


def format_table(table: list[Row]) -> str:
    """A plain-text table with aligned columns."""
    header = ("model", "task", "length", "position", "metric", "score ± stderr")
    body = [
        (
            r.model,
            r.task,
            r.length,
            r.position,
            r.metric,
            f"{r.value:.3f} ± " + ("N/A" if r.stderr is None else f"{r.stderr:.3f}"),
        )
        for r in table
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]

    def fmt(cells: Iterable[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([fmt(header), fmt("-" * w for w in widths), *(fmt(b) for b in body)])
