"""The one place that knows how our tasks name their breakdowns (length, position) and task families.

Metric keys: ``<metric>[_len<N>|_ctx<N>][_depth<F>|_pos<N>|_disp<name>]`` in any order, e.g.
``both_acc_len1024_depth0.50`` (KV), ``best_subspan_em_pos10`` (MDQA), ``acc_ctx500`` (FLenQA).
Task names may carry the same suffixes, e.g. MDQA's per-position subtasks ``mdqa20_pos10``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# kind -> (column it fills, pattern of a trailing suffix). Tried repeatedly from the right, each kind at most once.
_SUFFIXES: tuple[tuple[str, re.Pattern], ...] = (
    ("length", re.compile(r"_(?:len|ctx_size|ctxsize|ctx)(\d+)$")),
    ("depth", re.compile(r"_depth(\d+(?:\.\d+)?)$")),
    ("doc", re.compile(r"_pos(\d+)$")),
    ("dispersion", re.compile(r"_disp(?:ersion)?_?(first|middle|last|random)$")),
)
POSITION_KINDS = ("depth", "doc", "dispersion")
# Subset scores that are neither a length nor a position (FLenQA's padding type): kept as their own metric
# name in the leaderboard, but not an overall metric (the gate does not gate them by default).
_SUBSET = re.compile(r"_pad_(identity|same|books)$")

# MDQA (Lost in the Middle): per-position subtasks, closed-book and oracle baselines, metric.
MDQA_POSITION_TASK = re.compile(r"^mdqa(\d+)_pos(\d+)$")
MDQA_CLOSEDBOOK = "mdqa_closedbook"
MDQA_ORACLE = "mdqa_oracle"
MDQA_METRIC = "best_subspan_em"

# FLenQA: one task per dataset (optionally a chain-of-thought twin), accuracy broken down by context size.
FLENQA_TASK = re.compile(r"^flenqa_(monorel|pir|ruletaker)(_cot)?$")
FLENQA_METRIC = "acc"

# Synthetic KV retrieval: length x depth breakdowns of these metrics.
KV_TASK = re.compile(r"^kv_retrieval(_\w+)?$")
KV_METRIC = "both_acc"


@dataclass(frozen=True)
class Breakdown:
    base: str
    length: int | None = None
    position: str | None = None
    position_kind: str | None = None

    @property
    def is_breakdown(self) -> bool:
        return self.length is not None or self.position is not None


def parse_name(name: str) -> Breakdown:
    """Split a metric or task name into its base name and the length / position it is restricted to."""
    found: dict[str, str] = {}
    rest = name
    progress = True
    while progress:
        progress = False
        for kind, pattern in _SUFFIXES:
            if kind in found or (kind in POSITION_KINDS and any(k in found for k in POSITION_KINDS)):
                continue
            m = pattern.search(rest)
            if m and m.start() > 0:
                found[kind] = m.group(1)
                rest = rest[: m.start()]
                progress = True
    length = int(found["length"]) if "length" in found else None
    for kind in POSITION_KINDS:
        if kind in found:
            value = found[kind]
            if kind == "depth":
                value = f"{float(value):.2f}"
            return Breakdown(rest, length, value, kind)
    return Breakdown(rest, length)


def is_overall(metric: str) -> bool:
    """A task's headline metric: no length / position breakdown and not a subset score."""
    return not parse_name(metric).is_breakdown and not _SUBSET.search(metric)


def mdqa_position(task: str) -> int | None:
    """The 1-based gold position of an MDQA subtask name (``mdqa20_pos10`` -> 10), else None."""
    m = MDQA_POSITION_TASK.match(task)
    return int(m.group(2)) if m else None


def is_mdqa(task: str) -> bool:
    return bool(MDQA_POSITION_TASK.match(task)) or task in (MDQA_CLOSEDBOOK, MDQA_ORACLE) or task.startswith("mdqa")
