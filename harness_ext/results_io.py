"""Read what ``lm_eval`` wrote: ``results_<ts>.json`` and, with ``--log_samples``, ``samples_<task>_<ts>.jsonl``.

Every problem with an input names the file: not lm-eval output, truncated JSON, or an unexpected schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.errors import NeedlesError

# lm-eval names results "<prefix>_<date_id>.json" and samples "samples_<task>_<date_id>.jsonl" (same date_id).
_DATE_ID = re.compile(r"_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.json$")
_REQUIRED_KEYS = ("results", "configs", "versions")


class InvalidInput(NeedlesError):
    """An input file that is not (complete, current-schema) lm-eval output."""


@dataclass
class Run:
    """One lm-eval results file and the sample logs written beside it."""

    path: Path
    data: dict
    _samples: dict[str, Path] = field(default_factory=dict)

    @property
    def date_id(self) -> str | None:
        m = _DATE_ID.search(self.path.name)
        return m.group(1) if m else None

    def tasks(self) -> list[str]:
        return list(self.data.get("results", {}))

    def samples_path(self, task: str) -> Path | None:
        """The ``samples_<task>_<date_id>.jsonl`` of this run, if it was logged."""
        if task not in self._samples:
            date_id = self.date_id
            path = self.path.parent / f"samples_{task}_{date_id}.jsonl" if date_id else None
            self._samples[task] = path if path and path.is_file() else None
        return self._samples[task]

    def model_args(self) -> dict:
        return parse_model_args(self.data.get("config", {}).get("model_args"))

    def task_metadata(self, task: str) -> dict:
        meta = self.data.get("configs", {}).get(task, {}).get("metadata")
        return meta if isinstance(meta, dict) else {}


def parse_model_args(value) -> dict:
    """lm-eval stores model_args as a dict (0.4.13) or as ``k=v,k=v`` (older releases and the CLI)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    out = {}
    for part in str(value).split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Results files named by ``paths``: files as given, folders searched recursively for ``results_*.json``."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            hits = sorted(p for p in path.rglob("results_*.json") if p.is_file())
            if not hits:
                raise InvalidInput(
                    f"{path}: no results_*.json found in this folder",
                    fix="pass the --output_path folder of an lm_eval run, or a results JSON file",
                )
            found.extend(hits)
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidInput(f"{path}: no such file or folder", fix="check the path")
    return found


def load_run(path: Path) -> Run:
    """Load and validate one results JSON; errors name the file and say what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a text file, so not lm-eval output", fix="pass a results_*.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = _ends_early(text)
        what = "truncated JSON (the file ends early)" if truncated else "invalid JSON"
        raise InvalidInput(
            f"{path}: {what}: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            fix="re-run lm_eval or restore the file; a crashed run can leave a partial file",
        ) from None
    if not isinstance(data, dict) or not all(k in data for k in _REQUIRED_KEYS):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise InvalidInput(
            f"{path}: not lm-eval output (missing top-level keys {missing})",
            fix="pass the results_*.json that `lm_eval run --output_path` writes",
        )
    _check_schema(path, data)
    return Run(path, data)


def _ends_early(text: str) -> bool:
    """True when the text stops inside a string or with brackets still open (a cut-off write)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return in_string or depth > 0


def _check_schema(path: Path, data: dict) -> None:
    """lm-eval >= 0.4 writes ``"<metric>,<filter>"`` keys; older or hand-edited files mix other shapes."""
    for section in ("results", "groups"):
        block = data.get(section) or {}
        if not isinstance(block, dict):
            raise InvalidInput(f"{path}: mixed schema: '{section}' is {type(block).__name__}, expected an object")
        for task, metrics in block.items():
            if not isinstance(metrics, dict):
                raise InvalidInput(
                    f"{path}: mixed schema: {section}[{task!r}] is {type(metrics).__name__}, expected an object"
                )
            bad = [k for k, v in metrics.items() if k not in _FIXED_TASK_KEYS and "," not in k]
            if bad:
                raise InvalidInput(
                    f"{path}: mixed schema: {section}[{task!r}] has metric keys without ',<filter>' ({bad[:3]}); "
                    "this reader expects lm-eval 0.4 output",
                    fix="re-run the evaluation with lm-eval 0.4.x",
                )


_FIXED_TASK_KEYS = {"name", "alias", "sample_len", "sample_count"}


def split_metric_key(key: str) -> tuple[str, str, bool] | None:
    """``"acc_stderr,none"`` -> ("acc", "none", True); ``"acc,none"`` -> ("acc", "none", False)."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return metric[: -len("_stderr")], filt, True
    return metric, filt, False


def as_number(value) -> float | None:
    """A finite float, or None for "N/A", null, strings and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def iter_samples(path: Path) -> Iterator[dict]:
    """Rows of a samples JSONL; a damaged line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}); the file may be truncated",
                    fix="re-run lm_eval with --log_samples",
                ) from None
            if not isinstance(row, dict) or "doc_id" not in row:
                raise InvalidInput(f"{path}: line {lineno} is not an lm-eval sample (no doc_id)")
            yield row


def sample_metric_values(path: Path, metrics: set[str]) -> dict[tuple[str, str], list[float]]:
    """(metric, filter) -> per-sample values, read once from a samples file (prompts are not kept)."""
    out: dict[tuple[str, str], list[float]] = {}
    for row in iter_samples(path):
        filt = row.get("filter", "none")
        for m in metrics:
            v = as_number(row.get(m))
            if v is not None:
                out.setdefault((m, filt), []).append(v)
    return out
