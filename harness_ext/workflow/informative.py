"""Rows that cannot say anything: a paired comparison whose two sides are both at floor or both at ceiling.

A row is **uninformative** when every per-document value of both sides is 0 (both at floor) or every value of
both sides is 1 (both at ceiling; metrics on a 0-1 scale). A loss (nll, ppl: lower is better) is never marked:
it has no such bound, and equal values on both sides are rare and still a tested comparison. Such a row has no discordant document, so its test
says nothing about the finetune: a guard at 0 and 0 "holds" its margin with a tiny p-value because nothing can
drop below zero, and a target at 1 and 1 cannot improve. The rule is exact (every value, no threshold), so a row
with a single document off the bound is tested as usual.

How the verdicts read it (experiment, context-extension experiment, study "vs base"): the row's verdict is
``uninformative (both at floor)`` / ``uninformative (both at ceiling)``, never "improved" or "held", and it does
not pass. The claim needs every target improved and every guard held, so an uninformative target is a target not
shown to improve, and an uninformative guard is no evidence of "no regression": either leaves the claim NOT
SHOWN, and the claim's verdict names the uninformative rows so the reader sees why.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harness_ext.tasklib.breakdowns import lower_is_better

FLOOR, CEILING = "floor", "ceiling"


def at_bound(values: Sequence[float] | np.ndarray) -> str | None:
    """``floor`` when every value is 0, ``ceiling`` when every value is 1, else None (and None when empty)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return None
    if np.all(v == 0.0):
        return FLOOR
    if np.all(v == 1.0):
        return CEILING
    return None


def both_at_bound(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> str | None:
    """``floor`` / ``ceiling`` when both sides sit at the same bound, else None."""
    bound = at_bound(a)
    return bound if bound is not None and at_bound(b) == bound else None


def verdict_text(bound: str) -> str:
    return f"uninformative (both at {bound})"


def mark_row(row: dict, a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> bool:
    """Mark a verdict row (``verdict``, ``pass``) uninformative when ``a`` and ``b`` sit at the same bound; drops
    the MDE beside it (an MDE at zero discordance means nothing). True when the row was marked. A loss (the row's
    ``metric`` lower-is-better: nll, ppl) has no floor or ceiling of a score: never marked."""
    if lower_is_better(str(row.get("metric", ""))):
        return False
    bound = both_at_bound(a, b)
    if bound is None:
        return False
    row["uninformative"] = bound
    row["verdict"] = verdict_text(bound)
    row["pass"] = False
    row.pop("mde", None)
    row.pop("mde_text", None)
    return True


def claim_note(rows: list[dict]) -> str:
    """Words for the claim's verdict line naming the uninformative rows ('' when none)."""
    names = [r["task"] for r in rows if r.get("uninformative")]
    if not names:
        return ""
    return f" ({len(names)} uninformative row(s), both sides at floor or ceiling: {', '.join(names)})"
