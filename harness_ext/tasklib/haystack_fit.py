"""Cut a haystack of text units to an exact token target, with the key units at controlled places.

Used by the MuSiQue and SummHay families. A sample has *key* units (MuSiQue's supporting paragraphs, the
SummHay documents that hold the insight), always whole, and a *pool* of filler units in a fixed order (taken
from the front). For a target of L tokens (the evaluated model's tokenizer, special tokens included) and a set
of placements, the fit is the most whole fillers plus the longest word prefix of the next one such that the
prompt at *every* placement is at most L tokens: the same units at every placement, so placements are paired,
and one more word of filler would not fit (every decision is an exact tokenization of the full prompt).

Placements of k key units among N units (0-based slots): ``early`` 0..k-1, ``late`` N-k..N-1, ``spread`` the
centres of k equal parts, ``floor((j + 0.5) * N / k)``. Fillers fill the other slots in their display order, a
hash of each unit's id (``order_key``), so a filler keeps its relative place across placements and lengths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_choice, as_list
from harness_ext.tasklib.token_budget import count_tokens

PLACEMENTS = ("early", "spread", "late")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Unit:
    """One paragraph or document: its id (for logs and ordering), title, text, and whether it is a key unit."""

    uid: str
    title: str
    text: str
    key: bool
    order_key: str = ""  # display order of fillers (a hash of the sample and uid); keys keep their given order
    words: int | None = None  # set on the one filler cut to a word prefix


def placements_from(key: str, value: object) -> tuple[str, ...]:
    """``--metadata`` placements (a list, or one name) in the canonical order early, spread, late."""
    items = [value] if isinstance(value, str) else as_list(key, value, '["early", "spread", "late"]')
    chosen = {as_choice(key, p, PLACEMENTS) for p in items}
    return tuple(p for p in PLACEMENTS if p in chosen)


def key_slots(placement: str, keys: int, total: int) -> list[int]:
    """0-based slots of ``keys`` key units among ``total`` units for a placement."""
    if placement == "early":
        return list(range(keys))
    if placement == "late":
        return list(range(total - keys, total))
    if placement == "spread":
        return [int((j + 0.5) * total / keys) for j in range(keys)]
    raise NeedlesError(f"unknown placement {placement!r}", fix=f"use some of {list(PLACEMENTS)}")


def arrange(keys: list[Unit], fillers: list[Unit], placement: str) -> list[Unit]:
    """All units in prompt order: keys at the placement's slots (in their order), fillers in display order."""
    total = len(keys) + len(fillers)
    slots = set(key_slots(placement, len(keys), total))
    key_iter, filler_iter = iter(keys), iter(sorted(fillers, key=lambda u: (u.order_key, u.uid)))
    return [next(key_iter) if i in slots else next(filler_iter) for i in range(total)]


def cut(unit: Unit, words: int) -> Unit:
    """``unit`` with its text cut after its first ``words`` words (the original spacing kept)."""
    ends = [m.end() for m in _WORD.finditer(unit.text)]
    return replace(unit, text=unit.text[: ends[words - 1]] if words else "", words=words)


@dataclass(frozen=True)
class Fit:
    whole: int  # whole fillers taken from the front of the pool
    words: int  # words of the next filler (0: none)
    layouts: dict[str, list[Unit]]  # placement -> units in prompt order
    prompts: dict[str, str]
    tokens: dict[str, int]


def fit_haystack(
    keys: list[Unit],
    pool: list[Unit],
    placements: tuple[str, ...],
    length: int,
    render: Callable[[list[Unit]], str],
    tokenizer,
    what: str,
) -> Fit:
    """The fit of ``keys`` + a front of ``pool`` to ``length`` tokens at every placement (see the module doc)."""

    def build(whole: int, words: int) -> Fit:
        fillers = list(pool[:whole]) + ([cut(pool[whole], words)] if words else [])
        layouts = {p: arrange(keys, fillers, p) for p in placements}
        prompts = {p: render(units) for p, units in layouts.items()}
        counts = count_tokens(tokenizer, list(prompts.values()))
        return Fit(whole, words, layouts, prompts, dict(zip(prompts, counts)))

    def fits(whole: int, words: int) -> Fit | None:
        got = build(whole, words)
        return got if max(got.tokens.values()) <= length else None

    best = fits(0, 0)
    if best is None:
        need = max(build(0, 0).tokens.values())
        raise NeedlesError(
            f"{what}: a target of {length} tokens cannot hold the question and its {len(keys)} key unit(s) "
            f"({need} tokens without any filler)",
            fix="raise the target lengths",
        )
    lo, hi = 0, len(pool) + 1  # fits(lo) holds; hi: first count known not to fit (len+1: unknown)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = fits(mid, 0)
        lo, hi, best = (mid, hi, got) if got is not None else (lo, mid, best)
    if lo == len(pool):
        raise NeedlesError(
            f"{what}: its {len(pool)} filler units all fit in {length} tokens; the haystack cannot reach the target",
            fix="lower the target lengths (or use data with more units)",
        )
    total_words = len(_WORD.findall(pool[lo].text))
    wlo, whi = 0, total_words  # the whole next unit does not fit, so words < total_words
    while whi - wlo > 1:
        mid = (wlo + whi) // 2
        got = fits(lo, mid)
        wlo, whi, best = (mid, whi, got) if got is not None else (wlo, mid, best)
    return best
