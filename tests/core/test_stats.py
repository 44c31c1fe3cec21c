"""The gate's statistics, checked against exact references and by simulation (calibration and power).

Simulations run the gate's own decision path (compare_paired + decide: test, Holm, margin, verdict) on
simulated per-sample scores. Tolerances are 3 binomial standard errors of the simulated rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from harness_ext.core import stats
from harness_ext.reporting.gate import GateConfig, compare_paired, decide

ALPHA = 0.05


def _tol(p: float, trials: int) -> float:
    return 3 * math.sqrt(p * (1 - p) / trials)


def _binary_pair(rng, n: int, p_disc: float, drop: float, acc: float = 0.6):
    """Paired 0/1 scores: each item discordant with prob p_disc; a discordant item is a loss with prob q."""
    q = 0.5 * (1 + drop / p_disc)
    disc = rng.random(n) < p_disc
    loss = rng.random(n) < q
    concordant_ok = rng.random(n) < acc
    base = np.where(disc, loss, concordant_ok).astype(float)
    cand = np.where(disc, ~loss, concordant_ok).astype(float)
    return base, cand


def _gate_fails(pairs: list[tuple[np.ndarray, np.ndarray]], config: GateConfig) -> bool:
    comps = [compare_paired("t", f"m{i}", "none", b, c, True, config) for i, (b, c) in enumerate(pairs)]
    decide(comps, config)
    return any(c.verdict == "REGRESSION" for c in comps)


# ------------------------------------------------------------------------------------------ exact pieces
@pytest.mark.parametrize("losses,wins", [(0, 0), (5, 0), (0, 7), (10, 3), (30, 20), (61, 39), (400, 350)])
def test_mcnemar_matches_scipy_binomial_test(losses, wins):
    expected = binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue if losses + wins else 1.0
    assert stats.mcnemar_one_sided(losses, wins) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n,p", [(0, 0.3), (1, 0.5), (40, 0.5), (300, 0.07), (5000, 0.6), (12, 0.0), (12, 1.0)])
def test_numpy_binomial_matches_scipy(n, p):
    from scipy.stats import binom

    x = np.arange(n + 2)
    assert np.allclose(stats.binom_pmf(n, p), binom.pmf(x[:-1], n, p), rtol=1e-9, atol=1e-300)
    assert np.allclose(stats.binom_sf_at_least(n, p), binom.sf(x - 1, n, p), rtol=1e-8, atol=1e-15)


def test_mcnemar_is_exact_at_large_n_without_underflow():
    # 2 * 1500 pairs: 0.5**3000 underflows a float; the integer computation must still give a sane tail
    p = stats.mcnemar_one_sided(1600, 1400)
    assert 0 < p < 0.001
    assert p == pytest.approx(binomtest(1600, 3000, 0.5, alternative="greater").pvalue, rel=1e-6)


def test_exact_mcnemar_size_never_exceeds_alpha():
    for k in range(1, 301):
        crit = stats.critical_losses(k, ALPHA)
        assert stats.binom_half_sf(crit, k) <= ALPHA + 1e-12
        if crit <= k:  # one loss fewer must not be significant (crit is the smallest)
            assert stats.binom_half_sf(crit - 1, k) > ALPHA


def test_holm_matches_hand_computation():
    # sorted p: 0.01 (x4=0.04), 0.02 (x3=0.06), 0.03 (x2=0.06 -> cummax 0.06), 0.5 (x1=0.5)
    assert stats.holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])


def test_mde_matches_the_platform_rule_of_thumb():
    # PLATFORM.md: paired n=500, 10% discordant, alpha 0.05 one-sided, power 0.8 -> about 3.5 points (normal
    # approximation); the exact McNemar test needs slightly more. Unpaired at p=0.5 -> about 7.9 points.
    exact = stats.mcnemar_mde(500, 0.10, ALPHA, 0.8)
    assert 0.034 <= exact <= 0.039
    assert stats.mcnemar_power(500, 0.10, exact, ALPHA) == pytest.approx(0.8, abs=1e-3)
    assert stats.normal_mde(math.sqrt(0.1 / 500), ALPHA) == pytest.approx(0.0352, abs=5e-4)
    assert stats.normal_mde(math.sqrt(2 * 0.25 / 500), ALPHA) == pytest.approx(0.0786, abs=5e-4)


def test_newcombe_interval_covers_at_nominal_rate():
    rng = np.random.default_rng(7)
    trials, n, p_disc, drop = 1000, 200, 0.2, 0.05
    covered = 0
    for _ in range(trials):
        b, c = _binary_pair(rng, n, p_disc, drop)
        both, lo_ = int(np.sum((b == 1) & (c == 1))), int(np.sum((b == 1) & (c == 0)))
        hi_, nei = int(np.sum((b == 0) & (c == 1))), int(np.sum((b == 0) & (c == 0)))
        lo, hi = stats.newcombe_paired_ci(both, lo_, hi_, nei, level=0.90)
        covered += lo <= -drop <= hi
    assert covered / trials >= 0.90 - _tol(0.9, trials)


# ------------------------------------------------------------------------------------------ calibration (A/A)
def test_binary_aa_false_alarm_rate_at_most_alpha():
    """Same model, different noise: per-item difficulty shared, outcomes drawn independently; 3 metrics, Holm."""
    rng = np.random.default_rng(11)
    trials, n = 1500, 300
    config = GateConfig(alpha=ALPHA)
    alarms = 0
    for _ in range(trials):
        pairs = []
        for _metric in range(3):
            difficulty = rng.random(n)
            pairs.append(((rng.random(n) < difficulty).astype(float), (rng.random(n) < difficulty).astype(float)))
        alarms += _gate_fails(pairs, config)
    rate = alarms / trials
    assert rate <= ALPHA + _tol(ALPHA, trials), rate
    assert binomtest(alarms, trials, ALPHA, alternative="greater").pvalue > 0.01


def test_continuous_aa_false_alarm_rate_at_most_alpha():
    rng = np.random.default_rng(12)
    trials, n = 300, 200
    config = GateConfig(alpha=ALPHA, bootstrap_iters=1000)
    alarms = 0
    for t in range(trials):
        mu = rng.uniform(0.2, 0.8, n)
        base = np.clip(mu + rng.normal(0, 0.15, n), 0, 1)
        cand = np.clip(mu + rng.normal(0, 0.15, n), 0, 1)
        config.seed = t
        alarms += _gate_fails([(base, cand)], config)
    rate = alarms / trials
    assert rate <= ALPHA + _tol(ALPHA, trials), rate


def test_unpaired_aa_false_alarm_rate_at_most_alpha():
    rng = np.random.default_rng(13)
    trials, se = 4000, 0.02
    base = 0.6 + rng.normal(0, se, trials)
    cand = 0.6 + rng.normal(0, se, trials)
    alarms = sum(stats.unpaired_z(b, se, c, se, ALPHA)[0] <= ALPHA for b, c in zip(base, cand, strict=True))
    assert alarms / trials <= ALPHA + _tol(ALPHA, trials)


# ------------------------------------------------------------------------------------------ power at the MDE
@pytest.mark.parametrize("max_drop", [0.0, 0.04])
def test_binary_planted_drop_of_printed_mde_is_caught_at_stated_power(max_drop):
    rng = np.random.default_rng(21)
    n, power = 500, 0.8
    config = GateConfig(alpha=ALPHA, power=power, max_drop=max_drop)
    pilot_b, pilot_c = _binary_pair(rng, n, p_disc=0.10, drop=0.0)
    printed = compare_paired("t", "m", "none", pilot_b, pilot_c, True, config, alpha_mde=ALPHA)
    p_disc = (printed.detail["losses"] + printed.detail["wins"]) / n
    assert printed.mde is not None and printed.mde > max_drop
    trials = 2000
    caught = sum(_gate_fails([_binary_pair(rng, n, p_disc, printed.mde)], config) for _ in range(trials))
    assert abs(caught / trials - power) <= _tol(power, trials), (caught / trials, printed.mde)


def test_continuous_planted_drop_of_printed_mde_is_caught_at_stated_power():
    rng = np.random.default_rng(22)
    n, power = 200, 0.8
    config = GateConfig(alpha=ALPHA, power=power, bootstrap_iters=1000)

    def pair(shift: float):
        mu = rng.uniform(0.3, 0.7, n)
        return mu + rng.normal(0, 0.1, n), mu + rng.normal(0, 0.1, n) - shift

    printed = compare_paired("t", "m", "none", *pair(0.0), True, config, alpha_mde=ALPHA)
    trials = 300
    caught = 0
    for t in range(trials):
        config.seed = t
        caught += _gate_fails([pair(printed.mde)], config)
    assert abs(caught / trials - power) <= _tol(power, trials), (caught / trials, printed.mde)


def test_unpaired_planted_drop_of_printed_mde_is_caught_at_stated_power():
    rng = np.random.default_rng(23)
    trials, se, power = 4000, 0.02, 0.8
    mde = stats.normal_mde(math.sqrt(2) * se, ALPHA, power)
    base = 0.6 + rng.normal(0, se, trials)
    cand = 0.6 - mde + rng.normal(0, se, trials)
    caught = sum(stats.unpaired_z(b, se, c, se, ALPHA)[0] <= ALPHA for b, c in zip(base, cand, strict=True))
    assert abs(caught / trials - power) <= _tol(power, trials)


def test_margin_keeps_small_significant_drops_from_failing():
    rng = np.random.default_rng(31)
    base, cand = _binary_pair(rng, 4000, p_disc=0.2, drop=0.03)  # clearly significant, but only ~3 points
    assert _gate_fails([(base, cand)], GateConfig(alpha=ALPHA))
    assert not _gate_fails([(base, cand)], GateConfig(alpha=ALPHA, max_drop=0.05))


def test_lower_is_better_metrics_are_oriented():
    rng = np.random.default_rng(32)
    base, cand = _binary_pair(rng, 1000, p_disc=0.2, drop=0.1)  # candidate has fewer 1s
    config = GateConfig(alpha=ALPHA)
    higher = compare_paired("t", "m", "none", base, cand, True, config)
    lower = compare_paired("t", "m", "none", base, cand, False, config)  # e.g. an error rate: fewer 1s is better
    decide([higher], config)
    decide([lower], config)
    assert higher.verdict == "REGRESSION" and lower.verdict == "pass"
    assert lower.diff == pytest.approx(higher.diff) and lower.drop == pytest.approx(-higher.drop)


def test_standard_errors_match_their_definitions():
    rng = np.random.default_rng(41)
    values = rng.normal(0.5, 0.2, 50)
    assert stats.mean_stderr(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(50), rel=1e-12)
    assert stats.mean_stderr([0.3]) is None and stats.mean_stderr([]) is None
    base, cand = rng.random(40), rng.random(40)
    assert stats.paired_diff_stderr(base, cand) == pytest.approx(np.std(cand - base, ddof=1) / math.sqrt(40))
    # identical differences: no paired spread was observed, so the unpaired spread bounds what could be hidden
    base = rng.integers(0, 8, 40) / 4  # exact in binary, so every difference is exactly 0.25
    shifted = base - 0.25
    unpaired = math.sqrt(np.var(base, ddof=1) + np.var(shifted, ddof=1)) / math.sqrt(40)
    assert stats.paired_diff_stderr(base, shifted) == pytest.approx(unpaired)
    assert stats.paired_diff_stderr(np.array([]), np.array([])) is None


def test_paired_binary_counts_tabulate_the_two_by_two_table():
    base = np.array([1, 1, 0, 0, 1, 0, 1])
    cand = np.array([1, 0, 1, 0, 1, 1, 0])
    assert stats.paired_binary_counts(base, cand) == (2, 2, 2, 1)  # both, baseline only, candidate only, neither
    both, losses, wins, neither = stats.paired_binary_counts(base, cand)
    comparison = compare_paired("t", "m", "none", base.astype(float), cand.astype(float), True, GateConfig())
    assert comparison.detail == {"losses": losses, "wins": wins, "both_good": both, "both_bad": neither}
    assert comparison.p_value == pytest.approx(stats.mcnemar_one_sided(losses, wins))
