"""The gate's per-metric tests and verdict; every statistic comes from harness_ext.core.stats.

Binary (0/1) metrics: exact McNemar with Newcombe's interval; continuous metrics: paired bootstrap; without
sample logs: an unpaired z-test from value and stderr. Holm across the gated metrics, then a metric is a
regression only when its drop is significant AND larger than ``max_drop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness_ext.core import stats
from harness_ext.reporting.gate_pairing import GateConfig, IncomparableRuns, sample_values
from harness_ext.reporting.results_io import Run, as_number


@dataclass
class Comparison:
    task: str
    metric: str
    filter: str
    kind: str  # binary | continuous
    method: str  # mcnemar-exact | paired-bootstrap | unpaired-z
    n: int
    baseline: float
    candidate: float
    diff: float  # candidate - baseline, in the metric's own direction
    ci_low: float
    ci_high: float
    p_value: float
    higher_is_better: bool = True
    mde: float | None = None
    p_adjusted: float = 1.0
    verdict: str = ""
    reason: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def drop(self) -> float:
        """How much worse the candidate is (positive = worse), whatever the metric's direction."""
        return -self.diff if self.higher_is_better else self.diff


def compare_binary(
    task: str, metric: str, filt: str, base: np.ndarray, cand: np.ndarray, hib: bool, alpha: float
) -> Comparison:
    """Exact one-sided McNemar and Newcombe's (1 - 2 alpha) interval for 0/1 per-sample values."""
    ob, oc = (base, cand) if hib else (1 - base, 1 - cand)  # oriented: 1 = good
    both, losses, wins, neither = stats.paired_binary_counts(ob, oc)
    lo, hi = stats.newcombe_paired_ci(both, losses, wins, neither, level=1 - 2 * alpha)
    if not hib:
        lo, hi = -hi, -lo
    return Comparison(
        task,
        metric,
        filt,
        "binary",
        "mcnemar-exact",
        len(base),
        float(base.mean()),
        float(cand.mean()),
        float(cand.mean() - base.mean()),
        lo,
        hi,
        stats.mcnemar_one_sided(losses, wins),
        hib,
        detail={"losses": losses, "wins": wins, "both_good": both, "both_bad": neither},
    )


def compare_continuous(
    task: str,
    metric: str,
    filt: str,
    base: np.ndarray,
    cand: np.ndarray,
    hib: bool,
    alpha: float,
    iters: int,
    seed: int,
) -> Comparison:
    """One-sided paired bootstrap test and percentile interval for continuous per-sample values."""
    sign = 1.0 if hib else -1.0
    res = stats.paired_bootstrap(sign * (cand - base), alpha, iters, seed)
    lo, hi = res.ci if hib else (-res.ci[1], -res.ci[0])
    return Comparison(
        task,
        metric,
        filt,
        "continuous",
        "paired-bootstrap",
        len(base),
        float(base.mean()),
        float(cand.mean()),
        float(cand.mean() - base.mean()),
        lo,
        hi,
        res.p_value,
        hib,
        detail={"bootstrap_iters": iters, "seed": seed},
    )


def _paired_mde(c: Comparison, base: np.ndarray, cand: np.ndarray, alpha: float, config: GateConfig) -> float | None:
    n = len(base)
    if c.kind == "binary":
        p_disc = (c.detail["losses"] + c.detail["wins"]) / n if n else 0.0
        return stats.mcnemar_mde(n, p_disc, alpha, config.power, config.max_drop)
    se = stats.paired_diff_stderr(base, cand)
    return stats.normal_mde(se, alpha, config.power, config.max_drop) if se is not None else None


def compare_paired(
    task: str,
    metric: str,
    filt: str,
    base: np.ndarray,
    cand: np.ndarray,
    hib: bool,
    config: GateConfig,
    alpha_mde: float | None = None,
) -> Comparison:
    """Test one metric on paired per-sample values; ``alpha_mde=None`` skips the (slower) MDE computation."""
    if np.isin(base, (0.0, 1.0)).all() and np.isin(cand, (0.0, 1.0)).all():
        c = compare_binary(task, metric, filt, base, cand, hib, config.alpha)
    else:
        c = compare_continuous(task, metric, filt, base, cand, hib, config.alpha, config.bootstrap_iters, config.seed)
    if alpha_mde is not None:
        c.mde = _paired_mde(c, base, cand, alpha_mde, config)
    return c


def _stderr_of(run: Run, task: str, metric: str, filt: str) -> float | None:
    se = as_number(run.data["results"][task].get(f"{metric}_stderr,{filt}"))
    return se if se is not None else stats.mean_stderr(sample_values(run, task, metric, filt))


def compare_unpaired(
    base: Run,
    cand: Run,
    task: str,
    metric: str,
    filt: str,
    hib: bool,
    alpha: float,
    config: GateConfig,
    alpha_mde: float,
) -> Comparison:
    """Unpaired one-sided z-test from each run's value and standard error (no sample logs to pair)."""
    bv, cv = (as_number(r.data["results"][task][f"{metric},{filt}"]) for r in (base, cand))
    bse, cse = _stderr_of(base, task, metric, filt), _stderr_of(cand, task, metric, filt)
    if bse is None or cse is None:
        raise IncomparableRuns(
            f"{task}: {metric} has no standard error (lm-eval wrote N/A) and no sample log",
            fix="re-run with --log_samples",
        )
    sign = 1.0 if hib else -1.0
    p, se, (lo, hi) = stats.unpaired_z(sign * bv, bse, sign * cv, cse, alpha)
    if not hib:
        lo, hi = -hi, -lo
    n = as_number(base.section("n-samples", task).get("effective")) or 0
    c = Comparison(
        task,
        metric,
        filt,
        "unknown",
        "unpaired-z",
        int(n),
        bv,
        cv,
        cv - bv,
        lo,
        hi,
        p,
        hib,
        detail={"baseline_stderr": bse, "candidate_stderr": cse},
    )
    c.mde = stats.normal_mde(se, alpha_mde, config.power, config.max_drop)
    return c


def decide(comparisons: list[Comparison], config: GateConfig) -> None:
    """Holm across the gated metrics, then the verdict: a regression is significant AND bigger than max_drop."""
    for c, p_adj in zip(comparisons, stats.holm([c.p_value for c in comparisons]), strict=True):
        c.p_adjusted = p_adj
        significant = p_adj <= config.alpha
        if significant and c.drop > config.max_drop:
            c.verdict, c.reason = "REGRESSION", "significant drop larger than --max-drop"
        elif significant:
            c.verdict, c.reason = "pass", f"significant drop within --max-drop {config.max_drop:g}"
        else:
            c.verdict, c.reason = "pass", "no significant drop" if c.drop > 0 else "no drop"
