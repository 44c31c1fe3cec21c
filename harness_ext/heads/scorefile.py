"""Reading and writing head-score files, in both formats the plugin understands.

* ``needles``: the ``heads.json`` that ``needles heads`` writes (``"schema": "needles.heads/1"``, a
  ``scores`` matrix, the threshold, the model and the probes it was computed on);
* ``published``: the reference implementation's ``head_score/<model>.json`` (github.com/nightdessert/
  Retrieval_Head): ``{"layer-head": [score per successful test, ...]}``; a head's score is the mean of
  its list and the retrieval threshold is the paper's 0.1.

The format is recognised from the content, never from the file name. Pure numpy and json: reading a
score file needs no torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness_ext.core import atomic_io
from harness_ext.core.errors import NeedlesError
from harness_ext.heads.scores import DEFAULT_THRESHOLD

SCHEMA = "needles.heads/1"
NEEDLES = "needles"
PUBLISHED = "published"
FORMAT_NAMES = {NEEDLES: "needles heads.json", PUBLISHED: "published head_score"}
_KEY = re.compile(r"^(\d+)-(\d+)$")
_FIX = "pass a heads.json written by `needles heads`, or a published head_score/<model>.json of the reference"


@dataclass(frozen=True)
class HeadScores:
    """A (layers, heads) score grid, its retrieval threshold, and what is known about where it came from."""

    scores: np.ndarray
    format: str  # NEEDLES | PUBLISHED
    threshold: float
    model: str | None = None
    adapter: str | None = None
    num_retrieved: int | None = None  # probes (needles) or tests (published) the model answered
    num_probes: int | None = None
    probes_sha256: str | None = None
    report: dict = field(default_factory=dict, compare=False)  # the whole heads.json (needles format)

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.scores.shape[1])

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format]

    def describe(self) -> dict:
        """The provenance fields written next to a comparison or a knockout."""
        return {
            "model": self.model,
            "adapter": self.adapter,
            "num_retrieved": self.num_retrieved,
            "num_probes": self.num_probes,
            "probes_sha256": self.probes_sha256,
            "format": self.format,
        }


def load_head_scores(path: str | Path) -> HeadScores:
    """Read a score file of either format (recognised from its content)."""
    data = _read_json(Path(path))
    if isinstance(data, dict) and "schema" in data:
        return from_report(data, where=str(path))
    if isinstance(data, dict) and data and all(isinstance(k, str) and _KEY.match(k) for k in data):
        return from_published(data, model=_published_model_name(Path(path)), where=str(path))
    raise NeedlesError(
        f'{path} is neither a `needles heads` scores file (no "schema") nor a published head_score file '
        '(keys "layer-head")',
        fix=_FIX,
    )


def _read_json(path: Path) -> object:
    if not path.exists():
        raise NeedlesError(f"head scores file {path} does not exist", fix=_FIX)
    if path.is_dir():
        raise NeedlesError(f"{path} is a folder, not a head scores file", fix=f"{_FIX} (e.g. {path / 'heads.json'})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise NeedlesError(f"cannot read head scores {path}: {exc.strerror or exc}", fix=_FIX) from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for a binary file
        raise NeedlesError(
            f"{path} is not valid JSON ({str(exc).splitlines()[0]}); truncated or not a scores file?", fix=_FIX
        ) from None


def _published_model_name(path: Path) -> str:
    return path.stem


def from_report(report: dict, where: str = "the scores") -> HeadScores:
    """A `needles heads` report (the parsed heads.json) as a score grid, validated."""
    if report.get("schema") != SCHEMA:
        raise NeedlesError(
            f"{where} has schema {report.get('schema')!r}, not {SCHEMA!r}", fix="recompute it with `needles heads`"
        )
    scores = _grid(report.get("scores"), where)
    for key, size in (("num_layers", scores.shape[0]), ("num_heads", scores.shape[1])):
        if key in report and report[key] != size:
            raise NeedlesError(
                f"{where}: {key}={report[key]!r} but the scores matrix is {scores.shape[0]}x{scores.shape[1]}",
                fix="the file was edited or damaged; recompute it with `needles heads`",
            )
    threshold = report.get("threshold", DEFAULT_THRESHOLD)
    if not _finite_number(threshold):
        raise NeedlesError(f"{where}: threshold {threshold!r} is not a number", fix="recompute it with `needles heads`")
    model = report.get("model") if isinstance(report.get("model"), dict) else {}
    return HeadScores(
        scores=scores,
        format=NEEDLES,
        threshold=float(threshold),
        model=model.get("model"),
        adapter=model.get("adapter"),
        num_retrieved=report.get("num_retrieved"),
        num_probes=report.get("num_probes"),
        probes_sha256=report.get("probes_sha256"),
        report=report,
    )


def _grid(rows: object, where: str) -> np.ndarray:
    bad = NeedlesError(
        f'{where}: "scores" is not a non-empty layers x heads matrix of finite numbers',
        fix="the file was edited or damaged; recompute it with `needles heads`",
    )
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise bad
    if len({len(r) for r in rows}) != 1 or not all(_finite_number(x) for r in rows for x in r):
        raise bad
    return np.asarray(rows, dtype=float)


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def from_published(data: dict, model: str | None = None, where: str = "the scores") -> HeadScores:
    """The reference's ``{"layer-head": [score per successful test]}``: a head's score is the mean of its list."""
    cells: dict[tuple[int, int], float] = {}
    lengths = set()
    for key, values in data.items():
        m = _KEY.match(key) if isinstance(key, str) else None
        if m is None:
            raise NeedlesError(f'{where}: key {key!r} is not "layer-head"', fix=_FIX)
        if not isinstance(values, list) or not values or not all(_finite_number(v) for v in values):
            raise NeedlesError(f"{where}: head {key} has no list of finite scores", fix=_FIX)
        cells[(int(m.group(1)), int(m.group(2)))] = float(np.mean(values))
        lengths.add(len(values))
    layers = 1 + max(la for la, _ in cells)
    heads = 1 + max(h for _, h in cells)
    if len(cells) != layers * heads:
        raise NeedlesError(
            f"{where}: {len(cells)} heads listed, but the highest index implies a {layers}x{heads} grid "
            f"({layers * heads} heads); the file is incomplete",
            fix=_FIX,
        )
    scores = np.zeros((layers, heads))
    for (la, h), score in cells.items():
        scores[la, h] = score
    return HeadScores(
        scores=scores,
        format=PUBLISHED,
        threshold=DEFAULT_THRESHOLD,
        model=model,
        # Every head gets one score per successful test, so the lists have one common length.
        num_retrieved=lengths.pop() if len(lengths) == 1 else None,
    )


def write_json(path: Path, data: dict) -> None:
    """Write a heads result (heads.json, knockout.json, a comparison) atomically, in the plugin's layout."""
    atomic_io.write_json_atomic(path, data, indent=1)
