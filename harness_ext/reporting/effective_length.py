"""Effective context length (RULER, Hsieh et al., arXiv 2404.06654): the rules, the weighted averages and the
bootstrap over documents. One implementation, used by results, leaderboard, plots and gate.

Scales, explicitly: a threshold is always given on RULER's 0-100 scale (default 85.6, Llama-2-7B-chat at 4K);
a score curve says its own scale (``"fraction"`` for lm-eval results and leaderboard rows, ``"percent"`` for
RULER's published table) and the threshold is converted to it, never the scores. "Above" is strict, as in
RULER ("exceeds"): a score equal to the threshold (Qwen3-32B's 85.6 at 128K) is not above it.

Outcomes are one of three kinds, never folded into each other: ``length`` (effective to L, a measured length
shorter than the longest), ``at_least`` (above at every measured length: the effective length is at least
the longest, RULER's ">128K") and ``below_all`` (not above even at the shortest: RULER's "<4K").

Lengths are whole numbers of tokens, ordered numerically: text such as ``"4k"`` or ``"1M"`` is read as 4096 and
1048576 (sorting the text would put "16k" before "4k"), anything else is refused. RULER's grid doubles from one
length to the next; where a measured grid skips a doubling below the point that decides the outcome, the outcome's
text names the lengths that were not tested (``>=16384 (8192 not tested)``), because the rule reads "every shorter
length" and those were not measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.breakdowns import length_value

RULER_THRESHOLD = 85.6  # Llama-2-7B-chat's RULER score at 4K, on the 0-100 scale
# The relative rule's default: RULER's 85.6 is about 0.9 of a strong model's own 4K score (~95), so 0.9 asks a
# small model the same question of its own short-context score.
DEFAULT_RELATIVE = 0.9
SCALES = {"fraction": 1.0, "percent": 100.0}
# Published scores carry one decimal: equality within this (relative to the scale) counts as "not above".
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Rule:
    """``ruler``: score above ``value`` (0-100 scale); ``relative``: above ``value`` x the shortest-length score."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """Short, stable label (the leaderboard's ``filter`` column of effective_length rows)."""
        return f"ruler>{self.value:g}" if self.kind == "ruler" else f"relative>{self.value:g}x"

    def describe(self) -> str:
        if self.kind == "ruler":
            return (
                f"RULER rule: longest length whose score, and every shorter length's, is above {self.value:g} "
                "(0-100 scale)"
            )
        return (
            f"relative rule: longest length whose score, and every shorter length's, is above {self.value:g} x "
            "the model's own score at the shortest length"
        )


def check_threshold(threshold: float) -> float:
    """A RULER threshold on the 0-100 scale; 0-1 values are refused because they are most likely fractions."""
    if not (1.0 < threshold < 100.0):
        hint = f" (a fraction? the threshold is on the 0-100 scale: {threshold * 100:g})" if 0 < threshold <= 1 else ""
        raise NeedlesError(
            f"--threshold {threshold:g} is outside the 0-100 scale of effective-length thresholds{hint}",
            fix=f"give a percentage between 1 and 100, e.g. --threshold {RULER_THRESHOLD} (RULER's)",
        )
    return threshold


def check_relative(fraction: float) -> float:
    if not (0.0 < fraction < 1.0):
        raise NeedlesError(
            f"--relative {fraction:g} is outside (0, 1): it is a fraction of the model's own shortest-length score",
            fix=f"give a fraction such as --relative {DEFAULT_RELATIVE}",
        )
    return fraction


def default_rules(threshold: float = RULER_THRESHOLD, relative: float | None = DEFAULT_RELATIVE) -> list[Rule]:
    """The RULER rule at ``threshold`` and, unless ``relative`` is None, the relative rule; both checked."""
    rules = [Rule("ruler", check_threshold(threshold))]
    if relative is not None:
        rules.append(Rule("relative", check_relative(relative)))
    return rules


@dataclass(frozen=True)
class EffectiveLength:
    rule: Rule
    kind: str  # "length" | "at_least" | "below_all"
    length: int | None  # "length": L; "at_least": the longest measured length; "below_all": None
    lengths: tuple[int, ...]  # the measured lengths, ascending
    cutoff: float  # the score a length must exceed, on the curve's scale

    @property
    def rank(self) -> int:
        """Order of outcomes on one grid: below_all (-1) < each measured length (its index) < at_least."""
        if self.kind == "below_all":
            return -1
        if self.kind == "at_least":
            return len(self.lengths)
        return self.lengths.index(self.length)

    @property
    def value(self) -> int:
        """A number for the CSV's value column: L, the longest measured length (at_least), or 0 (below_all)."""
        return 0 if self.length is None else self.length

    @property
    def untested(self) -> list[int]:
        """Doublings the grid skips up to the length that decides the outcome (the first failing one, or the
        longest): at those lengths the rule's "every shorter length is above" was not checked."""
        if self.kind == "below_all":
            return []
        upto = self.lengths[-1] if self.kind == "at_least" else self.lengths[self.rank + 1]
        return untested_lengths([x for x in self.lengths if x <= upto])

    def display(self) -> str:
        """``32768``, ``>=131072`` (above at every measured length) or ``<4096`` (below at every length), followed
        by the skipped doublings that could change it: ``>=16384 (8192 not tested)``."""
        text = outcome_text(self.kind, self.length, self.lengths)
        gaps = self.untested
        return f"{text} ({', '.join(map(str, gaps))} not tested)" if gaps else text


def untested_lengths(lengths: Sequence[int]) -> list[int]:
    """The doublings of each measured length that fall short of the next one (ascending ``lengths``): 4096, 16384
    -> [8192]; 400, 800, 1600 -> []."""
    out = []
    for low, high in zip(lengths, lengths[1:], strict=False):
        x = 2 * low
        while 0 < x < high:
            out.append(x)
            x *= 2
    return out


def outcome_text(kind: str, length: int | None, lengths: Sequence[int]) -> str:
    if kind == "below_all":
        return f"<{lengths[0]}"
    if kind == "at_least":
        return f">={lengths[-1]}"
    return str(length)


def cell_text(note: str, value: str) -> str:
    """How views show an ``effective_length`` row: the outcome that leads its note (``>=800``, ``<400``, ``32768``).

    The value column alone cannot say ">= the longest" or "below every length" (it holds the longest length and
    0); the note written by harness_ext.reporting.length_curves starts with the outcome text.
    """
    head = note.split(" | ", 1)[0].strip()
    return head if head and (head[0] in "<>" or head.split(" ", 1)[0].isdigit()) else value


def _length(key: object, what: str) -> int:
    """A length key as a number of tokens (``"4k"`` -> 4096), or NeedlesError naming it."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        length = int(key)
    else:
        length = length_value(key) if isinstance(key, str) else None
    if length is None or length <= 0:
        raise NeedlesError(
            f"{what + ': ' if what else ''}length {key!r} is not a number of tokens, so the lengths cannot be put "
            "in order",
            fix='give lengths as positive whole numbers (4096) or with a K/M suffix ("4k", "4K", "1M")',
        )
    return length


def numeric_lengths(points: Mapping[object, float], what: str = "") -> dict[int, float]:
    """``points`` keyed by whole numbers of tokens (``"4k"`` -> 4096), or NeedlesError naming the bad length."""
    out = {_length(key, what): score for key, score in points.items()}
    if len(out) < len(points):
        raise NeedlesError(
            f'{what + ": " if what else ""}lengths {list(points)} name one length twice (e.g. 4096 and "4k")',
            fix="give each length once",
        )
    return out


def _check_points(points: Mapping[int, float], scale: str, what: str = "") -> tuple[list[int], np.ndarray]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    if not points:
        raise NeedlesError(
            "no length breakdown: an effective length needs scores at one or more input lengths",
            fix="pass results of a length sweep (this plugin's tasks with --metadata lengths, lm-eval's ruler, "
            "or babilong runs at several max_seq_lengths)",
        )
    points = numeric_lengths(points, what)
    lengths = sorted(points)
    values = np.array([points[k] for k in lengths], dtype=float)
    top = SCALES[scale]
    where = f"{what}: " if what else ""
    bad = [f"{length} is {float(v)}" for length, v in zip(lengths, values, strict=True) if not np.isfinite(v)]
    if bad:
        raise NeedlesError(
            f"{where}the score at length {', '.join(bad)}, not a number: the effective length cannot be decided",
            fix="rerun that task at that length (a NaN score is a metric that could not be computed) or leave "
            "the length out of the sweep",
        )
    if values.min() < 0 or values.max() > top * (1 + _TOLERANCE):
        raise NeedlesError(
            f"{where}scores {values.tolist()} are not on the {scale} scale (0-{top:g})",
            fix="lm-eval results and leaderboard rows hold fractions (0-1); RULER's table holds percentages",
        )
    return lengths, values


def _cutoff(rule: Rule, first_score: float, scale: str) -> float:
    return rule.value / 100.0 * SCALES[scale] if rule.kind == "ruler" else rule.value * first_score


def _outcome_ranks(matrix: np.ndarray, rule: Rule, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``matrix`` (rows: curves, columns: lengths, ascending): the index of the last length before the
    first one not above the cutoff (-1: not even the shortest; n - 1: all of them), and the row's cutoff."""
    cutoffs = _cutoff(rule, matrix[:, 0], scale) * np.ones(matrix.shape[0])
    above = matrix > cutoffs[:, None] + _TOLERANCE * SCALES[scale]
    # first length not above the cutoff; every length before it is above (RULER: "and every shorter length")
    failed = ~above
    first_fail = np.where(failed.any(axis=1), failed.argmax(axis=1), matrix.shape[1])
    return first_fail - 1, cutoffs


def effective_length(
    points: Mapping[int, float], rule: Rule, scale: str = "fraction", what: str = ""
) -> EffectiveLength:
    """The effective length of one score-by-length curve under ``rule``; ``what`` names the curve in errors."""
    lengths, values = _check_points(points, scale, what)
    ranks, cutoffs = _outcome_ranks(values[None, :], rule, scale)
    return _from_rank(int(ranks[0]), rule, lengths, float(cutoffs[0]))


def _from_rank(rank: int, rule: Rule, lengths: Sequence[int], cutoff: float) -> EffectiveLength:
    """rank = index of the last passing length before the first failure (-1: none passes)."""
    grid = tuple(lengths)
    if rank < 0:
        return EffectiveLength(rule, "below_all", None, grid, cutoff)
    if rank == len(grid) - 1:
        return EffectiveLength(rule, "at_least", grid[-1], grid, cutoff)
    return EffectiveLength(rule, "length", grid[rank], grid, cutoff)


def weighted_averages(points: Mapping[int, float], what: str = "") -> tuple[float, float, float]:
    """(avg, wAvg(inc), wAvg(dec)): RULER's averages over the measured lengths.

    wAvg(inc) weights the i-th shortest of n lengths by i, wAvg(dec) by n + 1 - i (linearly increasing /
    decreasing with length; RULER's six lengths get 1..6), each divided by the sum of the weights.
    """
    if not points:
        raise NeedlesError("no length breakdown: weighted averages need scores at one or more input lengths")
    points = numeric_lengths(points, what)
    values = np.array([points[k] for k in sorted(points)], dtype=float)
    inc = np.arange(1, len(values) + 1, dtype=float)
    return float(values.mean()), float((values * inc).sum() / inc.sum()), float((values * inc[::-1]).sum() / inc.sum())


@dataclass(frozen=True)
class Bootstrap:
    """Where the effective length lands when the documents are resampled."""

    rule: Rule
    iters: int
    seed: int
    level: float
    counts: dict[str, int]  # outcome text -> resamples landing there, in outcome order
    low: str  # the central ``level`` interval, in outcome order (below_all < lengths < at_least)
    high: str
    ranks: tuple[int, int]  # (low, high) in the order of EffectiveLength.rank, to compare with an outcome

    def interval_text(self) -> str:
        return self.low if self.low == self.high else f"[{self.low}, {self.high}]"

    def support_text(self) -> str:
        return ", ".join(f"{k}: {v / self.iters:.0%}" for k, v in self.counts.items())


def bootstrap(
    cells: Mapping[tuple[str, int], Sequence[float]],
    rule: Rule,
    scale: str = "fraction",
    iters: int = 1000,
    seed: int = 0,
    level: float = 0.9,
    what: str = "",
) -> Bootstrap:
    """Resample documents, with replacement, within each (task, length) cell; recompute the curve (a task's mean
    at each length, averaged over tasks as RULER averages its 13 tasks) and its effective length.

    Cells are resampled independently because each document was generated for one length. The seed makes
    the result reproducible; the interval is the central ``level`` quantiles of the outcomes in their order.
    """
    by_length = {(t, _length(key, what)): docs for (t, key), docs in cells.items()}
    if len(by_length) < len(cells):
        raise NeedlesError(f"bootstrap: a (task, length) cell is given twice under two spellings {list(cells)[:8]}")
    cells = by_length
    tasks = sorted({t for t, _ in cells})
    lengths = sorted({length for _, length in cells})
    missing = [(t, length) for t in tasks for length in lengths if not cells.get((t, length))]
    if missing:
        raise NeedlesError(f"bootstrap: no documents for (task, length) {missing[:4]}")
    rng = np.random.default_rng(seed)
    curves = np.zeros((iters, len(lengths)))
    for t in tasks:
        for j, length in enumerate(lengths):
            docs = np.asarray(cells[(t, length)], dtype=float)
            draws = rng.integers(0, len(docs), size=(iters, len(docs)))
            curves[:, j] += docs[draws].mean(axis=1) / len(tasks)
    _check_points(dict(zip(lengths, curves.max(axis=0), strict=True)), scale, what)
    ranks, _ = _outcome_ranks(curves, rule, scale)
    order = sorted(set(ranks.tolist()))
    outcomes = {r: _from_rank(r, rule, lengths, 0.0) for r in range(-1, len(lengths))}
    texts = {r: outcome_text(o.kind, o.length, lengths) for r, o in outcomes.items()}
    counts = {texts[r]: int((ranks == r).sum()) for r in order}
    tail = (1 - level) / 2
    low, high = (int(x) for x in np.quantile(ranks, [tail, 1 - tail], method="inverted_cdf"))
    return Bootstrap(
        rule, iters, seed, level, counts, texts[low], texts[high], (outcomes[low].rank, outcomes[high].rank)
    )
