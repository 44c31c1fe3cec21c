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

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.breakdowns import not_run

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
    _samples: dict[str, Path | None] = field(default_factory=dict)

    @property
    def date_id(self) -> str | None:
        m = _DATE_ID.search(self.path.name)
        return m.group(1) if m else None

    def tasks(self) -> list[str]:
        return list(self.data.get("results", {}))

    def samples_path(self, task: str) -> Path | None:
        """The ``samples_<task>_<date_id>.jsonl`` of this run, if it was logged.

        Task names come from the (untrusted) results file: one that is not a plain file name (``../x``, ``a/b``)
        has no sample log, so nothing outside the run's folder is ever read.
        """
        if task not in self._samples:
            date_id = self.date_id
            name = f"samples_{task}_{date_id}.jsonl"
            path = self.path.parent / name if date_id and _plain_file_name(name) else None
            self._samples[task] = path if path and path.is_file() else None
        return self._samples[task]

    def model_args(self) -> dict:
        """The run's ``model_args`` as a dict, whichever form lm-eval stored."""
        return parse_model_args((self.data.get("config") or {}).get("model_args"))

    def task_metadata(self, task: str) -> dict:
        """The ``metadata`` block of one task's config ({} when absent)."""
        meta = ((self.data.get("configs") or {}).get(task) or {}).get("metadata")
        return meta if isinstance(meta, dict) else {}

    def section(self, name: str, task: str) -> dict:
        """One task's entry of a per-task object section (``n-samples``, ``higher_is_better``), {} when absent."""
        value = (self.data.get(name) or {}).get(task)
        return value if isinstance(value, dict) else {}


def _plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def parse_model_args(value: object) -> dict:
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


def read_json(path: Path) -> object:
    """Parse one JSON file; an unreadable, truncated, invalid or absurdly nested file is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a text file, so not lm-eval output", fix="pass a results_*.json") from None
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file", fix="check the path") from None
    except OSError as exc:
        raise InvalidInput(
            f"{path}: cannot read it ({exc.strerror or exc})", fix="check the path and its permissions"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = _ends_early(text)
        kind = "truncated JSON (the file ends early)" if truncated else "invalid JSON"
        raise InvalidInput(
            f"{path}: {kind}: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            fix="re-run lm_eval or restore the file; a crashed run can leave a partial file",
        ) from None
    except (RecursionError, ValueError) as exc:  # nesting past the parser's limit; integers past max_str_digits
        raise InvalidInput(
            f"{path}: not lm-eval output ({_short(exc)})", fix="pass a results_*.json that lm_eval wrote"
        ) from None
    _check_depth(path, data)
    return data


def load_run(path: Path) -> Run:
    """Load and validate one results JSON; errors name the file and say what is wrong with it."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(k in data for k in _REQUIRED_KEYS):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise InvalidInput(
            f"{path}: not lm-eval output (missing top-level keys {missing})",
            fix="pass the results_*.json that `lm_eval run --output_path` writes",
        )
    _check_schema(path, data)
    return Run(path, data)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


# lm-eval's files nest about 6 levels deep; anything far deeper is hostile or broken, and would make the
# recursive code that later walks the data (json.dumps, Jinja) hit Python's recursion limit.
MAX_JSON_DEPTH = 64


def _check_depth(path: Path, data: object) -> None:
    stack = [(data, 1)]
    while stack:  # iterative on purpose: a recursive walk is what this guards against
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(
                f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep, so not lm-eval output",
                fix="pass a results_*.json that lm_eval wrote",
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


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


# Top-level sections the reporting code reads, and the JSON type each must have (lm-eval 0.4 writes these).
_OBJECT_SECTIONS = ("config", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "group_subtasks",
                    "task_hashes")  # fmt: skip
# Sections whose values are one object per task.
_PER_TASK_OBJECTS = ("configs", "higher_is_better", "n-samples")


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
            counts = metrics.get("sample_count")
            if counts is not None and not isinstance(counts, dict):
                raise InvalidInput(f"{path}: mixed schema: {section}[{task!r}]['sample_count'] is not an object")
    for section in _OBJECT_SECTIONS:
        block = data.get(section)
        if block is not None and not isinstance(block, dict):
            raise InvalidInput(f"{path}: mixed schema: '{section}' is {type(block).__name__}, expected an object")
    for section in _PER_TASK_OBJECTS:
        for task, value in (data.get(section) or {}).items():
            if value is not None and not isinstance(value, dict):
                raise InvalidInput(
                    f"{path}: mixed schema: {section}[{task!r}] is {type(value).__name__}, expected an object"
                )
    for group, subtasks in (data.get("group_subtasks") or {}).items():
        if subtasks is not None and not (isinstance(subtasks, list) and all(isinstance(t, str) for t in subtasks)):
            raise InvalidInput(f"{path}: mixed schema: group_subtasks[{group!r}] is not a list of task names")
    for task, hib in (data.get("higher_is_better") or {}).items():
        bad = [m for m, v in (hib or {}).items() if v is not None and not isinstance(v, bool)]
        if bad:
            raise InvalidInput(f"{path}: mixed schema: higher_is_better[{task!r}] has non-boolean values for {bad[:3]}")


_FIXED_TASK_KEYS = {"name", "alias", "sample_len", "sample_count"}


def split_metric_key(key: str) -> tuple[str, str, bool] | None:
    """``"acc_stderr,none"`` -> ("acc", "none", True); ``"acc,none"`` -> ("acc", "none", False)."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return metric[: -len("_stderr")], filt, True
    return metric, filt, False


def as_number(value: object) -> float | None:
    """A finite float, or None for "N/A", null, strings, NaN, infinities and integers too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def iter_samples(path: Path) -> Iterator[dict]:
    """Rows of a samples JSONL; a damaged line is an error naming file and line."""
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _sample_row(path, lineno, line)
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: line {lineno + 1} is not UTF-8 text, so not an lm-eval sample log") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _sample_row(path: Path, lineno: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{path}: line {lineno} is not valid JSON ({exc.msg}); the file may be truncated",
            fix="re-run lm_eval with --log_samples",
        ) from None
    except (RecursionError, ValueError) as exc:
        raise InvalidInput(f"{path}: line {lineno} is not an lm-eval sample ({_short(exc)})") from None
    _check_depth(path, row)
    if not isinstance(row, dict) or "doc_id" not in row:
        raise InvalidInput(f"{path}: line {lineno} is not an lm-eval sample (no doc_id)")
    doc_id, filt = row["doc_id"], row.get("filter", "none")
    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not isinstance(filt, str):
        raise InvalidInput(
            f"{path}: line {lineno} is not an lm-eval sample (doc_id must be an integer, filter a string)"
        )
    return row


def sample_metric_values(path: Path, metrics: set[str]) -> dict[tuple[str, str], list[float]]:
    """(metric, filter) -> per-sample values, read once from a samples file (prompts are not kept).

    lm-eval ruler's -1 ("this document is not at that length") is not a value.
    """
    out: dict[tuple[str, str], list[float]] = {}
    for row in iter_samples(path):
        filt = row.get("filter", "none")
        for m in metrics:
            v = as_number(row.get(m))
            if v is not None and not not_run(m, v):
                out.setdefault((m, filt), []).append(v)
    return out
