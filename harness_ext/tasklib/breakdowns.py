"""The one place that knows how our tasks name their breakdowns (length, position) and task families.

Metric keys: ``<metric>[_len<N>|_ctx<N>][_depth<F>|_pos<N>|_disp<name>|_place_<name>]`` in any order, e.g.
``both_acc_len1024_depth0.50`` (KV), ``best_subspan_em_pos10`` (MDQA), ``acc_ctx500`` (FLenQA),
``answer_f1_len4096_place_late`` (MuSiQue: where the supporting paragraphs sit; SummHay likewise).
Task names may carry the same suffixes, e.g. MDQA's per-position subtasks ``mdqa20_pos10``.
lm-eval's ``ruler`` names its per-length metrics by the bare length (``"4096"``, ... ``"131072"``) and writes
-1 for a length it did not run: such a key is metric ``score`` at that length, and -1 is "not measured".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What each position kind's value looks like. Numbers are capped at 18 digits: names come from untrusted results
# files, and int() of a longer string is slow or refused (Python's int max_str_digits).
_NUMBER = r"\d{1,18}"
_POSITION_VALUE = {
    "depth": rf"{_NUMBER}(?:\.{_NUMBER})?",
    "doc": _NUMBER,
    "dispersion": r"first|middle|last|random",
    "placement": r"early|spread|late",
}
# kind -> (column it fills, pattern of a trailing suffix). Tried repeatedly from the right, each kind at most once.
_SUFFIXES: tuple[tuple[str, re.Pattern], ...] = (
    ("length", re.compile(rf"_(?:len|ctx_size|ctxsize|ctx)({_NUMBER})$")),
    ("depth", re.compile(rf"_depth({_POSITION_VALUE['depth']})$")),
    ("doc", re.compile(rf"_pos({_POSITION_VALUE['doc']})$")),
    ("dispersion", re.compile(rf"_disp(?:ersion)?_?({_POSITION_VALUE['dispersion']})$")),
    ("placement", re.compile(rf"_place_?({_POSITION_VALUE['placement']})$")),
)
POSITION_KINDS = ("depth", "doc", "dispersion", "placement")
# Subset scores that are neither a length nor a position (FLenQA's padding type, MuSiQue's number of hops): kept
# as their own metric name in the leaderboard, but not an overall metric (the gate does not gate them by default).
_SUBSET = re.compile(r"_pad_(identity|same|books)$|_hops\d$")

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
NIAH_TASK = re.compile(r"^niah(_\w+)?$")
NIAH_METRIC = "niah_success"
# Passkey retrieval (Mohtashami & Jaggi): length x depth breakdowns, as NIAH.
PASSKEY_TASK = re.compile(r"^needles_passkey(_\w+)?$")
PASSKEY_METRIC = "passkey_acc"
# The length x depth grids the scorecard and plots draw: (metric, tasks).
DEPTH_GRIDS = ((KV_METRIC, KV_TASK), (NIAH_METRIC, NIAH_TASK), (PASSKEY_METRIC, PASSKEY_TASK))
# Continuation loss by context length (``nll_len<P>``): lower is better, so never a score curve for effective length.
LONG_PPL_TASK = re.compile(r"^needles_long_ppl(_\w+)?$")
LOSS_METRICS = ("nll", "ppl")

# lm-eval's ruler: metric keys that are a bare length; the value -1 means the length was not run.
BARE_LENGTH_METRIC = "score"
_BARE_LENGTH = re.compile(rf"^{_NUMBER}$", flags=re.ASCII)
NOT_RUN = -1.0


@dataclass(frozen=True)
class Breakdown:
    base: str
    length: int | None = None
    position: str | None = None
    position_kind: str | None = None

    @property
    def is_breakdown(self) -> bool:
        return self.length is not None or self.position is not None


def format_depth(depth: float | str | None) -> str:
    """How a gold depth appears in breakdown keys and ids: ``0.5`` -> ``"0.50"``; None (uniform) -> ``"random"``."""
    return "random" if depth is None else f"{float(depth):.2f}"


# How each breakdown is written as a key suffix ("ctx" is FLenQA's name for a length).
_SUFFIX_FORMATS = {
    "length": "_len{}",
    "ctx": "_ctx{}",
    "depth": "_depth{}",
    "doc": "_pos{}",
    "dispersion": "_disp_{}",
    "placement": "_place_{}",
}


def key_suffix(kind: str, value: int | float | str | None) -> str:
    """The key suffix of one breakdown: ``("length", 1024)`` -> ``_len1024``, ``("depth", 0.5)`` -> ``_depth0.50``,
    ``("doc", 10)`` -> ``_pos10``, ``("dispersion", "first")`` -> ``_disp_first``, ``("ctx", 500)`` -> ``_ctx500``.
    """
    if kind not in _SUFFIX_FORMATS:
        raise ValueError(f"unknown breakdown kind {kind!r}; expected one of {sorted(_SUFFIX_FORMATS)}")
    return _SUFFIX_FORMATS[kind].format(format_depth(value) if kind == "depth" else value)


def with_breakdowns(scores: dict[str, float], suffixes: list[str]) -> dict[str, float]:
    """``scores`` plus each score under every suffix alone and, given two, under both combined.

    E.g. suffixes ``["_len1024", "_depth0.50"]`` add ``acc_len1024``, ``acc_depth0.50`` and
    ``acc_len1024_depth0.50`` for each score ``acc``: the length x depth cells the leaderboard and plots read.
    """
    cells = list(suffixes) + (["".join(suffixes)] if len(suffixes) == 2 else [])
    out = dict(scores)
    for suffix in cells:
        for metric, value in scores.items():
            out[f"{metric}{suffix}"] = value
    return out


def lower_is_better(metric: str) -> bool:
    """True for a loss (``nll``, ``ppl`` and their breakdowns such as ``nll_len8192``): a decrease is the
    improvement. Every other metric of ours is a score, higher is better."""
    return parse_name(metric).base in LOSS_METRICS


def parse_name(name: str) -> Breakdown:
    """Split a metric or task name into its base name and the length / position it is restricted to."""
    if _BARE_LENGTH.match(name):  # lm-eval ruler's "4096": the score at that length
        return Breakdown(BARE_LENGTH_METRIC, int(name))
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
                value = format_depth(value)
            return Breakdown(rest, length, value, kind)
    return Breakdown(rest, length)


# A length in tokens, or with babilong's unit suffix (its configs "1k" ... "128k", "1M"); K = 1024 as in RULER.
_LENGTH_TEXT = re.compile(rf"^(?:({_NUMBER})|(\d{{1,6}})([kKmM]))$", flags=re.ASCII)
_LENGTH_UNIT = {"k": 1024, "m": 1024 * 1024}


def length_value(text: str) -> int | None:
    """A length as a number of tokens: ``"4096"`` -> 4096, ``"4k"`` / ``"4K"`` -> 4096, ``"1M"`` -> 1048576;
    None for anything else (a list, a fraction, ``"4 k"``)."""
    m = _LENGTH_TEXT.match(text.strip())
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else int(m.group(2)) * _LENGTH_UNIT[m.group(3).lower()]


def run_length(metadata: dict) -> int | None:
    """The one input length a task was run at, from ``--metadata '{"max_seq_lengths": "4k"}'`` (lm-eval's babilong,
    whose scores carry no length): ``"4k"``, ``"4K"`` or 4096 -> 4096, ``"1M"`` -> 1048576. babilong's ``"0k"``
    (the facts without a haystack) is not an input length, and lists (lm-eval's ruler) are per-length metrics
    already: both give None."""
    raw = metadata.get("max_seq_lengths", "")
    return (length_value(str(raw)) or None) if isinstance(raw, str | int) and not isinstance(raw, bool) else None


def not_run(name: str, value: float) -> bool:
    """lm-eval ruler's placeholder: a bare-length metric whose value is -1 was not run at that length."""
    return value == NOT_RUN and _BARE_LENGTH.match(name) is not None


def is_length(value: str) -> bool:
    """A length as ``parse_name`` reports it (plain digits)."""
    return re.fullmatch(_NUMBER, value, flags=re.ASCII) is not None


def is_position(kind: str, value: str) -> bool:
    """``value`` is a position of this kind as ``parse_name`` reports it (e.g. depth ``0.50``, doc ``10``)."""
    pattern = _POSITION_VALUE.get(kind)
    return pattern is not None and re.fullmatch(pattern, value, flags=re.ASCII) is not None


def is_overall(metric: str) -> bool:
    """A task's headline metric: no length / position breakdown and not a subset score."""
    return not parse_name(metric).is_breakdown and not _SUBSET.search(metric)


def mdqa_position(task: str) -> int | None:
    """The 1-based gold position of an MDQA subtask name (``mdqa20_pos10`` -> 10), else None."""
    m = MDQA_POSITION_TASK.match(task)
    return int(m.group(2)) if m else None


def is_mdqa(task: str) -> bool:
    """An MDQA task: a per-position subtask, a closed-book / oracle baseline, or any other ``mdqa*`` task."""
    return bool(MDQA_POSITION_TASK.match(task)) or task in (MDQA_CLOSEDBOOK, MDQA_ORACLE) or task.startswith("mdqa")
