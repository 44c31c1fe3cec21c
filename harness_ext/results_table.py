"""A readable table of an lm-eval results JSON: model, task, length, position, score +- stderr."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Breakdown keys written by the plugin's tasks: <metric>[_len<N>][_depth<D>|_pos<N>|_ctx<N>]
_BREAKDOWN = re.compile(r"^(?P<metric>[a-z_]+?)(?:_len(?P<len>\d+))?(?:_(?:depth|pos)(?P<pos>[\d.]+|random))?$")


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
    args = results.get("config", {}).get("model_args", "")
    if isinstance(args, dict):
        args = ",".join(f"{k}={v}" for k, v in args.items())
    m = re.search(r"pretrained=([^,]+)", str(args))
    name = m.group(1).rstrip("/").split("/")[-1] if m else str(results.get("config", {}).get("model", "?"))
    lora = re.search(r"lora_local_path=([^,]+)", str(args))
    return f"{name}+{lora.group(1).rstrip('/').split('/')[-1]}" if lora else name


def rows(results: dict, metrics: tuple[str, ...] | None = None) -> list[Row]:
    out = []
    model = model_name(results)
    for task, scores in sorted(results.get("results", {}).items()):
        for key, value in scores.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            m = _BREAKDOWN.match(name)
            if not m or (metrics and m.group("metric") not in metrics):
                continue
            err = scores.get(f"{name}_stderr,{filt}")
            out.append(
                Row(
                    model,
                    task,
                    m.group("len") or "all",
                    m.group("pos") or "all",
                    m.group("metric"),
                    float(value),
                    float(err) if isinstance(err, (int, float)) else None,
                )
            )
    return out


def format_table(table: list[Row]) -> str:
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
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def fmt(cells) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([fmt(header), fmt("-" * w for w in widths), *(fmt(b) for b in body)])
