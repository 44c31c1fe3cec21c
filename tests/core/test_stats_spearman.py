"""Spearman's rho and its bootstrap interval (harness_ext.core.stats), checked against scipy and by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from harness_ext.core import stats


@pytest.mark.parametrize("seed", range(5))
def test_rho_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=12).astype(float)  # many ties
    b = a + rng.normal(0, 1.5, size=12)
    assert stats.spearman_rho(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_undefined_cases():
    assert stats.spearman_rho([1.0], [2.0]) is None
    assert stats.spearman_rho([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    res = stats.spearman_bootstrap([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert res.rho is None and res.ci is None and res.defined == 0
    with pytest.raises(ValueError):
        stats.spearman_rho([1.0, 2.0], [1.0])


def test_monotone_pairs_give_rho_one_and_a_degenerate_interval():
    x = np.arange(6, dtype=float)
    res = stats.spearman_bootstrap(x, x**2, iters=500)
    assert res.rho == pytest.approx(1.0)
    assert res.ci == pytest.approx((1.0, 1.0))
    anti = stats.spearman_bootstrap(x, -x, iters=500)
    assert anti.rho == pytest.approx(-1.0) and anti.ci == pytest.approx((-1.0, -1.0))


def test_interval_is_reproducible_contains_rho_and_narrows_with_more_pairs():
    rng = np.random.default_rng(1)
    widths = []
    for n in (8, 120):
        a = rng.normal(size=n)
        b = a + rng.normal(size=n)
        res = stats.spearman_bootstrap(a, b, iters=1000, seed=3)
        assert res.ci[0] <= res.rho <= res.ci[1]
        assert res == stats.spearman_bootstrap(a, b, iters=1000, seed=3)
        widths.append(res.ci[1] - res.ci[0])
    assert widths[1] < widths[0] / 2


def test_interval_covers_the_population_rho_about_95_percent_of_the_time():
    # bivariate normal with Pearson r = 0.6: population Spearman = (6/pi) asin(r/2)
    r = 0.6
    true = 6 / np.pi * np.arcsin(r / 2)
    rng = np.random.default_rng(7)
    hits, trials = 0, 100
    for t in range(trials):
        a = rng.normal(size=60)
        b = r * a + np.sqrt(1 - r**2) * rng.normal(size=60)
        lo, hi = stats.spearman_bootstrap(a, b, iters=200, seed=t).ci
        hits += lo <= true <= hi
    assert 0.85 <= hits / trials <= 0.99
