"""Planning power: the minimal detectable effect (MDE) of a paired 0/1 comparison, before and after a run.

One implementation, used by ``needles experiment``, ``needles study`` and ``needles scorecard --compare``: what
change a paired test on n documents can detect with probability ``power`` at one-sided level ``alpha``.

The design is McNemar's: each document is scored 0/1 by both models; only discordant documents (one model
right, the other wrong) carry information. With psi the probability that a document is discordant and delta
the true change in accuracy (p01 - p10), Connor's normal approximation (Connor 1987, "Sample size for testing
differences in proportions for the paired-sample design", Biometrics 43:207-211; also Lachin 1992) is

    sqrt(n) * delta = z(1 - alpha) * sqrt(psi) + z(power) * sqrt(psi - delta^2)

and the MDE is the delta that solves it (by bisection; the equation is monotone in delta). psi >= |delta|
always (a change of delta needs at least delta discordant documents), so psi is raised to delta where needed,
as the gate's exact MDE does (``harness_ext.core.stats.mcnemar_mde``).

psi is an assumption before a run. Three sources, each labelled in the output:
- ``observed``: the discordance of a pilot or of the finished runs;
- ``independent``: from a base rate p0 alone, as if the two models erred independently:
  psi = p0 (1 - p1) + p1 (1 - p0) with p1 = p0 + delta. Pessimistic for a finetune of the same model (its
  errors are correlated with the base model's), so it over-states the MDE rather than under-states it;
- ``given``: a discordance rate the user states.

Check (the statistics notes of this project): n = 500, psi = 0.10, alpha 0.05 one-sided, power 0.8 ->
3.52 points (``tests/core/test_power.py`` also checks it against a brute-force simulation of McNemar's test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_N = NormalDist()
DEFAULT_EFFECT = 0.10  # the effect a plan is checked against when the user names none (10 points of accuracy)


def shown(mde: float | None) -> str:
    """An MDE as every report prints it: three decimals, or "none" when no effect reaches the power at that n."""
    return "none" if mde is None else f"{mde:.3f}"


def _z(q: float) -> float:
    return _N.inv_cdf(q)


def independent_discordance(p_base: float, delta: float) -> float:
    """psi when the two models err independently, the second with accuracy p_base + delta (clipped to 0..1)."""
    p1 = min(1.0, max(0.0, p_base + delta))
    return p_base * (1 - p1) + p1 * (1 - p_base)


def power_paired_binary(n: int, delta: float, psi: float, alpha: float) -> float:
    """Connor's approximate power of the one-sided paired test to detect a change of ``delta`` (> 0)."""
    if n <= 0 or delta <= 0:
        return 0.0
    if n < math.log2(1 / alpha):
        # even n discordant pairs all one way (p = 0.5^n) cannot reach alpha: the exact test never rejects, whatever
        # the normal approximation says about such tiny n
        return 0.0
    psi = min(1.0, max(psi, delta))
    if psi - delta * delta <= 0:
        return 1.0
    zp = (math.sqrt(n) * delta - _z(1 - alpha) * math.sqrt(psi)) / math.sqrt(psi - delta * delta)
    return _N.cdf(zp)


def mde_paired_binary(
    n: int, alpha: float, power: float = 0.8, psi: float | None = None, p_base: float | None = None
) -> float | None:
    """Smallest delta detected with ``power``: at a fixed discordance ``psi``, or (``psi`` None) at the
    independence discordance of base rate ``p_base``. None when even delta = 1 - p_base is not detected (or no n)."""
    if n <= 0:
        return None
    if psi is None and p_base is None:
        raise ValueError("mde_paired_binary needs a discordance psi or a base rate p_base")
    top = 1.0 if psi is not None else 1.0 - float(p_base)  # an accuracy cannot rise above 1

    def detects(delta: float) -> bool:
        disc = psi if psi is not None else independent_discordance(float(p_base), delta)
        return power_paired_binary(n, delta, disc, alpha) >= power

    if top <= 0 or not detects(top):
        return None
    lo, hi = 0.0, top
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if detects(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Planned:
    """The MDE of one target, and what it assumed."""

    name: str
    n: int | None
    alpha: float  # the level the MDE is computed at (Holm's first step: alpha / m)
    power: float
    mde: float | None  # None: not detectable at any effect (or n unknown)
    assumption: str  # "observed psi 0.12", "independent errors at base rate 0.50", ...
    effect: float | None  # the effect the user asks for
    note: str = ""

    @property
    def can_detect(self) -> bool | None:
        """Whether the asked effect is at least the MDE (None when unknown)."""
        if self.effect is None or self.n is None:
            return None
        return self.mde is not None and self.mde <= self.effect + 1e-12

    def text(self) -> str:
        """``MDE 0.112 at n 60`` plus the assumption; the words a "no significant" verdict is printed beside."""
        if self.n is None:
            return f"MDE unknown (n is only known after the run{': ' + self.note if self.note else ''})"
        mde = shown(self.mde) + (" (no effect reaches the power)" if self.mde is None else "")
        return f"MDE {mde} at n {self.n} (power {self.power:.0%}, one-sided alpha {self.alpha:.3g}; {self.assumption})"


def plan(
    name: str,
    n: int | None,
    alpha: float,
    power: float = 0.8,
    effect: float | None = DEFAULT_EFFECT,
    p_base: float | None = None,
    psi: float | None = None,
    note: str = "",
) -> Planned:
    """The MDE of one target: at the observed/given discordance ``psi`` when known, else at independent errors
    around ``p_base`` (0.5 when unknown: the largest spread, so the MDE is not under-stated)."""
    if n is None:
        return Planned(name, None, alpha, power, None, "n unknown", effect, note)
    if psi is not None:
        return Planned(name, n, alpha, power, mde_paired_binary(n, alpha, power, psi=psi), f"discordance {psi:.3f}",
                       effect, note)  # fmt: skip
    base = 0.5 if p_base is None else p_base
    why = "unknown, 0.5 assumed" if p_base is None else f"{base:.3f}"
    mde = mde_paired_binary(n, alpha, power, p_base=base)
    return Planned(name, n, alpha, power, mde, f"independent errors, base rate {why}", effect, note)


def format_plan(rows: list[Planned], prefix: str, effect: float | None, what: str = "target") -> str:
    """The block printed before a run: one line per ``what`` (a target), those that cannot detect ``effect``
    marked."""
    if not rows:
        return f"{prefix} minimal detectable effect: no 0/1 {what} to plan for"
    ask = f"; asked effect {effect:g}" if effect is not None else ""
    lines = [f"{prefix} minimal detectable effect per {what} (paired McNemar design, Connor 1987{ask}):"]
    for r in rows:
        mark = {True: "ok", False: "CANNOT DETECT the asked effect", None: "?"}[r.can_detect]
        lines.append(f"  {r.name}: {r.text()}  [{mark}]")
    if any(r.can_detect is False for r in rows):
        lines.append(
            f"  {what}s marked CANNOT DETECT would most likely read 'no significant' even if the asked effect is real:"
            " raise their n (more documents, lengths or seeds) or ask for a larger effect"
        )
    return "\n".join(lines)
