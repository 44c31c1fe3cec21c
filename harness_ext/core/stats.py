"""The one statistics module (gate, experiment verdicts, knockout, patching). One-sided: H1 "the candidate is worse".

- Binary per-sample metrics: exact McNemar (binomial test on the discordant pairs, computed with integers),
  Newcombe's score interval for a paired difference of proportions, and an exact minimum detectable effect.
- Continuous metrics: paired bootstrap (p-value and percentile interval).
- Without per-sample logs: an unpaired z-test from the two values and their standard errors.
- Holm's step-down adjustment across the gated metrics.
- Standard errors of a mean and of a paired mean difference (the leaderboard's stderr, the gate's MDE).
- Rank correlation: Spearman's rho (average ranks for ties) with a percentile bootstrap interval over pairs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from statistics import NormalDist

import numpy as np

_N = NormalDist()


def z(q: float) -> float:
    return _N.inv_cdf(q)


# ----------------------------------------------------------------------------------- binary (paired)
def binom_half_sf(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, no underflow at large n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    tail = sum(math.comb(n, i) for i in range(k, n + 1))
    return float(Fraction(tail, 2**n))


def mcnemar_one_sided(losses: int, wins: int) -> float:
    """Exact one-sided McNemar p-value for "candidate worse".

    losses = pairs the baseline got right and the candidate wrong; wins = the reverse. Under H0 (no difference)
    each discordant pair is a loss with probability 1/2, so p = P(Binomial(losses + wins, 1/2) >= losses).
    """
    return binom_half_sf(losses, losses + wins)


def paired_binary_counts(base: np.ndarray, cand: np.ndarray) -> tuple[int, int, int, int]:
    """(both right, baseline only, candidate only, neither) for paired 0/1 outcomes (1 = good)."""
    base, cand = np.asarray(base), np.asarray(cand)
    return (
        int(np.sum((base == 1) & (cand == 1))),
        int(np.sum((base == 1) & (cand == 0))),
        int(np.sum((base == 0) & (cand == 1))),
        int(np.sum((base == 0) & (cand == 0))),
    )


def wilson(x: int, n: int, zval: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = x / n
    denom = 1 + zval**2 / n
    centre = (p + zval**2 / (2 * n)) / denom
    half = zval * math.sqrt(p * (1 - p) / n + zval**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_ci(both: int, base_only: int, cand_only: int, neither: int, level: float) -> tuple[float, float]:
    """Newcombe (1998, method 10) score interval for candidate - baseline accuracy on paired binary data."""
    n = both + base_only + cand_only + neither
    if n == 0:
        return -1.0, 1.0
    zval = z(0.5 + level / 2)
    p1, p2 = (both + base_only) / n, (both + cand_only) / n  # baseline, candidate accuracy
    l1, u1 = wilson(both + base_only, n, zval)
    l2, u2 = wilson(both + cand_only, n, zval)
    margins = (both + base_only) * (cand_only + neither) * (both + cand_only) * (base_only + neither)
    phi = (both * neither - base_only * cand_only) / math.sqrt(margins) if margins > 0 else 0.0
    delta = p2 - p1
    lower = delta - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    upper = delta + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return max(-1.0, lower), min(1.0, upper)


@lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def binom_pmf(n: int, p: float) -> np.ndarray:
    """P(X = x) for x = 0..n, X ~ Binomial(n, p), in log space (numpy only: the gate needs no scipy)."""
    x = np.arange(n + 1)
    if p <= 0.0 or p >= 1.0:
        return (x == (n if p >= 1.0 else 0)).astype(float)
    lf = _log_factorials(n)
    return np.exp(lf[n] - lf[x] - lf[n - x] + x * math.log(p) + (n - x) * math.log1p(-p))


def binom_sf_at_least(n: int, p: float) -> np.ndarray:
    """P(X >= x) for x = 0..n+1 (the last entry is 0)."""
    tail = np.cumsum(binom_pmf(n, p)[::-1])[::-1]
    return np.minimum(1.0, np.append(tail, 0.0))


@lru_cache(maxsize=100_000)
def critical_losses(k: int, alpha: float) -> int:
    """Smallest loss count L with P(Binomial(k, 1/2) >= L) <= alpha (k + 1 when no L qualifies)."""
    ok = np.nonzero(binom_sf_at_least(k, 0.5) <= alpha * (1 + 1e-12))[0]
    return int(ok[0])


def mcnemar_power(n: int, p_disc: float, drop: float, alpha: float, margin: float = 0.0) -> float:
    """Exact power of the gate's binary rule (exact McNemar p <= alpha AND observed drop > margin).

    Model: each of n pairs is discordant with probability max(p_disc, drop); a discordant pair is a loss with
    probability q chosen so that the expected accuracy drop equals ``drop``.
    """
    if drop <= 0:
        return 0.0
    pd = min(1.0, max(p_disc, drop))
    q = min(1.0, 0.5 * (1 + drop / pd))
    mean, sd = n * pd, math.sqrt(n * pd * (1 - pd))
    lo, hi = max(0, int(mean - 8 * sd) - 1), min(n, int(mean + 8 * sd) + 2)
    p_k = binom_pmf(n, pd)
    total = 0.0
    for k in range(lo, hi + 1):
        need = max(critical_losses(k, alpha), math.floor((k + n * margin) / 2) + 1)
        if need <= k:
            total += p_k[k] * binom_sf_at_least(k, q)[need]
    return float(total)


def mcnemar_mde(n: int, p_disc: float, alpha: float, power: float = 0.8, margin: float = 0.0) -> float | None:
    """Smallest accuracy drop the binary rule catches with the given power (bisection on the exact power)."""
    if n <= 0:
        return None
    lo, hi = 0.0, 1.0
    if mcnemar_power(n, p_disc, hi, alpha, margin) < power:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        if mcnemar_power(n, p_disc, mid, alpha, margin) >= power:
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------------- continuous (paired)
@dataclass
class BootstrapResult:
    mean_diff: float
    p_value: float
    ci: tuple[float, float]


def paired_bootstrap(diff: np.ndarray, alpha: float, iters: int = 10000, seed: int = 0) -> BootstrapResult:
    """One-sided bootstrap test of mean(diff) < 0 (diff = candidate - baseline, oriented so higher is better).

    p = (1 + #{bootstrap mean - observed mean <= observed mean}) / (iters + 1): the bootstrap distribution
    shifted to H0 (mean 0). The interval is the (1 - 2 alpha) percentile interval, whose upper end is the
    one-sided (1 - alpha) bound matching the test.
    """
    diff = np.asarray(diff, dtype=float)
    n = len(diff)
    obs = float(diff.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, min(iters, 4_000_000 // max(n, 1)))
    for start in range(0, iters, chunk):
        size = min(chunk, iters - start)
        idx = rng.integers(0, n, size=(size, n))
        means[start : start + size] = diff[idx].mean(axis=1)
    p = (1 + int(np.sum(means - obs <= obs))) / (iters + 1)
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return BootstrapResult(obs, min(1.0, p), (float(lo), float(hi)))


def normal_mde(se: float, alpha: float, power: float = 0.8, margin: float = 0.0) -> float | None:
    """Drop caught with the given power by "z-test significant at alpha AND observed drop > margin" (normal)."""
    if not se or se <= 0 or not math.isfinite(se):
        return None
    return max(margin, z(1 - alpha) * se) + z(power) * se


def mean_stderr(values: list[float] | np.ndarray) -> float | None:
    """Standard error of the mean, sample sd / sqrt(n) (as lm-eval's mean_stderr); None below two values."""
    values = [float(v) for v in values]
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def paired_diff_stderr(base: np.ndarray, cand: np.ndarray) -> float | None:
    """Standard error of mean(cand - base) on paired values; None for no pairs.

    When every pair has the same difference the paired spread is 0 and says nothing about how large a drop
    could go unseen; the unpaired spread sqrt(var(base) + var(cand)) is used instead (conservative).
    """
    base, cand = np.asarray(base, dtype=float), np.asarray(cand, dtype=float)
    n = len(base)
    if n == 0:
        return None
    sd = float(np.std(cand - base, ddof=1)) if n > 1 else 0.0
    if sd == 0 and n > 1:
        sd = math.sqrt(float(np.var(base, ddof=1) + np.var(cand, ddof=1)))
    return sd / math.sqrt(n)


# ----------------------------------------------------------------------------------- unpaired fallback
def unpaired_z(
    base: float, base_se: float, cand: float, cand_se: float, alpha: float
) -> tuple[float, float, tuple[float, float]]:
    """(p one-sided for cand < base, se of the difference, (1 - 2 alpha) interval of cand - base)."""
    se = math.sqrt(base_se**2 + cand_se**2)
    diff = cand - base
    if se == 0:
        return (0.0 if diff < 0 else 1.0), 0.0, (diff, diff)
    p = _N.cdf(diff / se)
    half = z(1 - alpha) * se
    return p, se, (diff - half, diff + half)


# ----------------------------------------------------------------------------------- multiple comparisons
def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------- rank correlation
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (as scipy.stats.rankdata's "average")."""
    x = np.asarray(x, dtype=float).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); None below two pairs or when a side is constant."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) != len(b):
        raise ValueError(f"spearman_rho needs paired values, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class CorrelationResult:
    """Spearman's rho of n pairs with a percentile bootstrap interval over resampled pairs.

    ``ci`` is None when rho is undefined, or when fewer than half the resamples had a defined rho (too few
    distinct pairs to say anything); ``defined`` counts the resamples that did.
    """

    rho: float | None
    ci: tuple[float, float] | None
    n: int
    level: float
    iters: int
    defined: int


def spearman_bootstrap(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, iters: int = 10000, seed: int = 0
) -> CorrelationResult:
    """Spearman's rho of paired values and its (level) percentile bootstrap interval, resampling the pairs.

    Resamples in which either side is constant (rho undefined) are left out; the interval is taken over the
    rest. With few pairs the interval is wide and lumpy: that is the honest answer for a handful of variants.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    rho = spearman_rho(a, b)
    n = len(a)
    if rho is None:
        return CorrelationResult(None, None, n, level, iters, 0)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(iters):
        idx = rng.integers(0, n, size=n)
        r = spearman_rho(a[idx], b[idx])
        if r is not None:
            rhos.append(r)
    if len(rhos) < iters / 2:
        return CorrelationResult(rho, None, n, level, iters, len(rhos))
    lo, hi = np.quantile(np.array(rhos), [(1 - level) / 2, (1 + level) / 2])
    return CorrelationResult(rho, (float(lo), float(hi)), n, level, iters, len(rhos))
