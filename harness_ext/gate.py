"""Regression gate: is the candidate run significantly worse than the baseline on the same documents?

Pairs per-sample results on (task, doc_id, filter); refuses runs that are not comparable (IncomparableRuns,
exit 2); tests each gated metric one-sided (exact McNemar for 0/1 metrics, paired bootstrap otherwise, an
unpaired z-test from value and stderr when sample logs are missing); Holm-adjusts across the gated metrics; calls
a metric a regression only when the drop is significant AND larger than ``max_drop``.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness_ext import stats
from harness_ext.breakdowns import is_overall
from harness_ext.errors import NeedlesError
from harness_ext.leaderboard import model_identity
from harness_ext.results_io import Run, as_number, find_results, iter_samples, load_run, split_metric_key


class IncomparableRuns(NeedlesError):
    """The two runs cannot be compared (different documents, prompts, task versions or sample sets)."""


@dataclass
class GateConfig:
    alpha: float = 0.05
    max_drop: float = 0.0
    power: float = 0.8
    metrics: list[str] | None = None  # fnmatch patterns on metric names (breakdowns allowed, e.g. "both_acc_len*")
    tasks: list[str] | None = None
    bootstrap_iters: int = 10000
    seed: int = 0
    paired: bool = True  # False forces the unpaired test even when sample logs exist


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


@dataclass
class GateReport:
    baseline: str
    candidate: str
    baseline_model: str
    candidate_model: str
    config: GateConfig
    comparisons: list[Comparison]
    notes: list[str]

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict == "REGRESSION"]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0

    @property
    def verdict(self) -> str:
        return "REGRESSION" if self.regressions else "PASS"

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "baseline": {"path": self.baseline, "model": self.baseline_model},
            "candidate": {"path": self.candidate, "model": self.candidate_model},
            "config": asdict(self.config),
            "ci_level": 1 - 2 * self.config.alpha,
            "notes": self.notes,
            "comparisons": [asdict(c) for c in self.comparisons],
        }


# ----------------------------------------------------------------------------------------- loading
def load_one_run(path: str | Path, role: str) -> Run:
    found = find_results([path])
    if len(found) != 1:
        listing = "\n  ".join(str(p) for p in found)
        raise NeedlesError(
            f"--{role} {path} holds {len(found)} results files:\n  {listing}",
            fix=f"pass one results_*.json file as --{role}",
        )
    return load_run(found[0])


def _task_list(base: Run, cand: Run, config: GateConfig) -> list[str]:
    groups = set(base.data.get("groups") or {}) | set(cand.data.get("groups") or {})
    b_tasks = [t for t in base.tasks() if t not in groups]
    c_tasks = {t for t in cand.tasks() if t not in groups}
    if config.tasks:
        missing = [
            (t, r)
            for t in config.tasks
            for r, ts in (("baseline", set(b_tasks)), ("candidate", c_tasks))
            if t not in ts
        ]
        if missing:
            raise IncomparableRuns(f"task(s) not in both runs: {missing}", fix="check --tasks")
        return list(config.tasks)
    if set(b_tasks) != c_tasks:
        raise IncomparableRuns(
            f"the runs evaluated different tasks: only in baseline {sorted(set(b_tasks) - c_tasks)}, "
            f"only in candidate {sorted(c_tasks - set(b_tasks))}",
            fix="evaluate the same tasks, or choose common ones with --tasks",
        )
    return b_tasks


def _check_task_compatible(base: Run, cand: Run, task: str) -> None:
    for key, what in (("versions", "task version"), ("n-shot", "n-shot")):
        b, c = (base.data.get(key) or {}).get(task), (cand.data.get(key) or {}).get(task)
        if str(b) != str(c):
            raise IncomparableRuns(
                f"{task}: {what} differs (baseline {b!r}, candidate {c!r})",
                fix="gate runs of the same task version and few-shot setting",
            )
    b, c = base.task_metadata(task).get("needles_data_sha256"), cand.task_metadata(task).get("needles_data_sha256")
    if b and c and b != c:
        raise IncomparableRuns(
            f"{task}: generated data differs (needles_data_sha256 {b[:12]} vs {c[:12]})",
            fix="use the same --metadata (lengths, depths, seed, num_samples) and tokenizer",
        )


def _gated_metrics(base: Run, cand: Run, task: str, config: GateConfig) -> list[tuple[str, str]]:
    def keys(run: Run) -> set[tuple[str, str]]:
        out = set()
        for key, value in (run.data["results"].get(task) or {}).items():
            parsed = split_metric_key(key)
            if parsed and not parsed[2] and as_number(value) is not None:
                out.add((parsed[0], parsed[1]))
        return out

    b_keys, c_keys = keys(base), keys(cand)
    if config.metrics:
        chosen = {k for k in b_keys | c_keys if any(fnmatch.fnmatchcase(k[0], p) for p in config.metrics)}
    else:
        chosen = {k for k in b_keys | c_keys if is_overall(k[0])}
    missing = sorted(
        (k, "baseline" if k not in b_keys else "candidate") for k in chosen if k not in b_keys or k not in c_keys
    )
    if missing:
        raise IncomparableRuns(
            f"{task}: metric(s) missing from one run: {missing}", fix="evaluate both runs the same way"
        )
    return sorted(chosen)


# ----------------------------------------------------------------------------------------- pairing
def _load_pairs(base: Run, cand: Run, task: str, metrics: list[tuple[str, str]]):
    """{(metric, filter): (doc_ids, baseline values, candidate values)} after checking the runs are comparable."""
    names = {m for m, _ in metrics}

    def index(run: Run) -> dict[tuple[int, str], dict]:
        out: dict[tuple[int, str], dict] = {}
        path = run.samples_path(task)
        for row in iter_samples(path):
            key = (row["doc_id"], row.get("filter", "none"))
            if key in out:
                raise IncomparableRuns(
                    f"{path}: doc_id {key[0]} (filter {key[1]}) appears twice",
                    fix="gate runs without repeats, or one results folder per run",
                )
            out[key] = {
                "doc_hash": row.get("doc_hash"),
                "prompt_hash": row.get("prompt_hash"),
                "target_hash": row.get("target_hash"),
                **{m: as_number(row.get(m)) for m in names},
            }
        return out

    b, c = index(base), index(cand)
    only_b, only_c = sorted(set(b) - set(c)), sorted(set(c) - set(b))
    if only_b or only_c:
        raise IncomparableRuns(
            f"{task}: the sample sets differ ({len(b)} baseline vs {len(c)} candidate samples; "
            f"{len(only_b)} only in baseline e.g. {only_b[:3]}, {len(only_c)} only in candidate e.g. {only_c[:3]})",
            fix="run both evaluations with the same --limit / --samples and task metadata",
        )
    for field_, why in (
        ("doc_hash", "documents"),
        ("target_hash", "targets"),
        ("prompt_hash", "prompts (prompt template, chat template, system instruction or few-shot)"),
    ):
        bad = [k for k in b if b[k][field_] != c[k][field_]]
        if bad:
            raise IncomparableRuns(
                f"{task}: {why} differ for {len(bad)} of {len(b)} samples (first: doc_id {bad[0][0]})",
                fix="gate runs that saw identical inputs; compare different prompts with the leaderboard instead",
            )
    out = {}
    for metric, filt in metrics:
        ids = sorted(k[0] for k in b if k[1] == filt and (b[k][metric] is not None or c[k][metric] is not None))
        half = [i for i in ids if (b[(i, filt)][metric] is None) != (c[(i, filt)][metric] is None)]
        if half:
            raise IncomparableRuns(f"{task}: {metric} is scored for doc_id {half[0]} in one run only")
        out[(metric, filt)] = (
            ids,
            np.array([b[(i, filt)][metric] for i in ids], dtype=float),
            np.array([c[(i, filt)][metric] for i in ids], dtype=float),
        )
    return out


# ----------------------------------------------------------------------------------------- tests
def compare_binary(
    task: str, metric: str, filt: str, base: np.ndarray, cand: np.ndarray, hib: bool, alpha: float
) -> Comparison:
    ob, oc = (base, cand) if hib else (1 - base, 1 - cand)  # oriented: 1 = good
    both = int(np.sum((ob == 1) & (oc == 1)))
    losses = int(np.sum((ob == 1) & (oc == 0)))
    wins = int(np.sum((ob == 0) & (oc == 1)))
    neither = int(np.sum((ob == 0) & (oc == 0)))
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
    sd = float(np.std(cand - base, ddof=1)) if n > 1 else 0.0
    if sd == 0 and n > 1:  # identical outputs: no paired spread observed; use the unpaired spread (conservative)
        sd = math.sqrt(float(np.var(base, ddof=1) + np.var(cand, ddof=1)))
    return stats.normal_mde(sd / math.sqrt(n), alpha, config.power, config.max_drop) if n else None


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


def _stderr_of(run: Run, task: str, metric: str, filt: str) -> float | None:
    block = run.data["results"][task]
    se = as_number(block.get(f"{metric}_stderr,{filt}"))
    if se is None and run.samples_path(task):
        vals = [
            as_number(r.get(metric)) for r in iter_samples(run.samples_path(task)) if r.get("filter", "none") == filt
        ]
        vals = [v for v in vals if v is not None]
        se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None
    return se


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
    n = ((base.data.get("n-samples") or {}).get(task) or {}).get("effective") or 0
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


# ----------------------------------------------------------------------------------------- the gate
def run_gate(baseline: str | Path, candidate: str | Path, config: GateConfig | None = None) -> GateReport:
    config = config or GateConfig()
    if not 0 < config.alpha < 0.5 or not 0 < config.power < 1 or config.max_drop < 0:
        raise NeedlesError("need 0 < alpha < 0.5, 0 < power < 1 and max_drop >= 0")
    base, cand = load_one_run(baseline, "baseline"), load_one_run(candidate, "candidate")
    notes: list[str] = []
    plan = []
    for task in _task_list(base, cand, config):
        _check_task_compatible(base, cand, task)
        metrics = _gated_metrics(base, cand, task, config)
        if not metrics:
            continue
        paired = config.paired and base.samples_path(task) is not None and cand.samples_path(task) is not None
        if not paired:
            why = "--unpaired was given" if not config.paired else "per-sample logs (--log_samples) are missing"
            notes.append(
                f"{task}: UNPAIRED fallback (z-test from value and stderr) because {why}; "
                "it needs a larger effect than a paired test to detect a drop"
            )
        plan.append((task, metrics, paired))
    if not plan:
        raise NeedlesError("no metric to gate", fix="check --metrics / --tasks against the results")
    m = sum(len(metrics) for _, metrics, _ in plan)
    alpha_mde = config.alpha / m  # Holm's first step: the level a single metric faces in the worst case
    comparisons: list[Comparison] = []
    for task, metrics, paired in plan:
        hib_map = (base.data.get("higher_is_better") or {}).get(task) or {}
        pairs = _load_pairs(base, cand, task, metrics) if paired else {}
        for metric, filt in metrics:
            hib = hib_map.get(metric)
            if hib is None:
                hib = True
                notes.append(f"{task}: {metric} has no higher_is_better; assuming higher is better")
            if not paired:
                comparisons.append(
                    compare_unpaired(base, cand, task, metric, filt, hib, config.alpha, config, alpha_mde)
                )
                continue
            _ids, bv, cv = pairs[(metric, filt)]
            if len(bv) == 0:
                raise IncomparableRuns(f"{task}: no samples scored {metric}")
            comparisons.append(compare_paired(task, metric, filt, bv, cv, hib, config, alpha_mde))
    decide(comparisons, config)
    b_model, c_model = (" + ".join(x for x in model_identity(r) if x) for r in (base, cand))
    return GateReport(str(base.path), str(cand.path), b_model, c_model, config, comparisons, notes)


# ----------------------------------------------------------------------------------------- output
def _f(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}"


def _p(x: float) -> str:
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _rows(report: GateReport) -> tuple[list[str], list[list[str]]]:
    level = round(100 * (1 - 2 * report.config.alpha))
    header = [
        "task",
        "metric",
        "method",
        "n",
        "baseline",
        "candidate",
        f"diff [{level}% CI]",
        "p",
        "p (Holm)",
        f"MDE @{report.config.power:.0%}",
        "verdict",
    ]
    body = []
    for c in report.comparisons:
        metric = c.metric if c.filter in ("none", "") else f"{c.metric} [{c.filter}]"
        body.append(
            [
                c.task,
                metric,
                c.method,
                str(c.n),
                _f(c.baseline),
                _f(c.candidate),
                f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]",
                _p(c.p_value),
                _p(c.p_adjusted),
                _f(c.mde),
                c.verdict,
            ]
        )
    return header, body


def _settings(report: GateReport) -> str:
    c = report.config
    return (
        f"alpha={c.alpha:g} (one-sided, Holm across {len(report.comparisons)} metrics), max_drop={c.max_drop:g}, "
        f"power={c.power:g}; MDE = smallest drop caught with that power at this n"
    )


def to_text(report: GateReport) -> str:
    header, body = _rows(report)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        f"needles gate: {report.verdict}",
        f"baseline:  {report.baseline_model}  ({report.baseline})",
        f"candidate: {report.candidate_model}  ({report.candidate})",
        _settings(report),
        "",
    ]
    for r in [header, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def to_markdown(report: GateReport) -> str:
    header, body = _rows(report)
    icon = "FAILED: regression" if report.regressions else "passed"
    lines = [
        f"## needles gate: {report.verdict} ({icon})",
        "",
        f"- baseline: `{report.baseline_model}` ({report.baseline})",
        f"- candidate: `{report.candidate_model}` ({report.candidate})",
        f"- {_settings(report)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if report.notes:
        lines += ["", *(f"> {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def to_json_text(report: GateReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n"
