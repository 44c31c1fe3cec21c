"""``needles study``'s "vs base": every run against the base model (step ``eval:base``) on every target; and
"vs reference": every non-reference run against its reference run, the same way.

The two evals' per-sample logs are paired on (task, doc_id) by the experiment verdict's reader
(``verdict.paired_values``: the gate's pairing, which also checks that both saw the same documents, prompts and
targets). Every statistic comes from harness_ext.core.stats: on 0/1 metrics the exact McNemar test, two-sided,
with Newcombe's 95% paired interval; otherwise a paired bootstrap (two-sided p, 95% percentile interval). Holm
across the whole family of runs x targets. A pair that cannot be compared is reported with the reason; a pair
whose two sides are both at floor or both at ceiling is marked uninformative (harness_ext.workflow.informative).
"""

from __future__ import annotations

import numpy as np

from harness_ext.core import stats
from harness_ext.core.errors import NeedlesError
from harness_ext.core.power import shown
from harness_ext.study.config import BASE
from harness_ext.study.steps import Study
from harness_ext.workflow.informative import both_at_bound, verdict_text
from harness_ext.workflow.mde import beside
from harness_ext.workflow.suite import SuiteTask

LEVEL = 0.95


def paired_test(base: np.ndarray, run: np.ndarray, iters: int, seed: int = 0) -> dict:
    """delta = mean(run - base) over the pairs, its 95% interval and the two-sided p-value."""
    base, run = np.asarray(base, dtype=float), np.asarray(run, dtype=float)
    out: dict = {"n": int(len(base)), "base": float(base.mean()), "run": float(run.mean())}
    out["delta"] = float((run - base).mean())
    if np.isin(base, (0.0, 1.0)).all() and np.isin(run, (0.0, 1.0)).all():
        both, base_only, run_only, neither = stats.paired_binary_counts(base, run)
        low, high = stats.newcombe_paired_ci(both, base_only, run_only, neither, level=LEVEL)
        # two-sided exact McNemar: twice the smaller one-sided tail of Binomial(discordant, 1/2), at most 1
        tail = min(stats.mcnemar_one_sided(base_only, run_only), stats.mcnemar_one_sided(run_only, base_only))
        method = "exact McNemar (two-sided), Newcombe interval"
        out["discordant"] = {"only_base_right": base_only, "only_run_right": run_only}
    else:
        alpha = (1 - LEVEL) / 2  # paired_bootstrap's interval is the (alpha, 1 - alpha) percentile interval
        worse = stats.paired_bootstrap(run - base, alpha, iters, seed)  # one-sided: run worse
        better = stats.paired_bootstrap(base - run, alpha, iters, seed)  # one-sided: run better
        (low, high), tail = worse.ci, min(worse.p_value, better.p_value)
        method = "paired bootstrap (two-sided), percentile interval"
    return {**out, "ci95": [float(low), float(high)], "p": min(1.0, 2 * tail), "method": method}


def with_holm(tests: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Holm's adjusted p (``p_holm``) added to every test that has a p, across all runs and targets together."""
    family = [(run, target) for run, row in tests.items() for target, t in row.items() if "p" in t]
    adjusted = stats.holm([tests[r][t]["p"] for r, t in family])
    for (run, target), p_holm in zip(family, adjusted, strict=True):
        tests[run][target]["p_holm"] = p_holm
        test = tests[run][target]
        if test.get("uninformative"):
            test["note"] = verdict_text(test["uninformative"])
        elif p_holm >= 1 - LEVEL and "mde_text" in test:
            test["note"] = f"no significant change; {test['mde_text']}"
    return tests


def rounded(test: dict) -> dict:
    # six significant digits, not decimals: an exact McNemar p of 3.5e-07 must not be written as 0.0
    def r(x: object) -> object:
        return float(f"{x:.6g}") if isinstance(x, float) else x

    return {k: [r(x) for x in v] if isinstance(v, list) else r(v) for k, v in test.items()}


def vs_base(study: Study, done: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{run: {target: delta, ci95, p, p_holm, ...}} from the eval markers' results files (relative paths)."""
    return _against(study, done, dict.fromkeys(study.runs, BASE))


def vs_reference(study: Study, done: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Every non-reference run against its reference run (the same seed), as "vs base" pairs it with base: what
    changing one setting of the reference's finetune did, on the same prompts; Holm across these pairs."""
    return _against(study, done, {name: r.reference for name, r in study.runs.items() if not r.is_reference})


def _against(study: Study, done: dict[str, dict], pairs: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{run: {target: test}} of each run (key of ``pairs``) against the eval it is paired with (value)."""
    from harness_ext.reporting.gate_pairing import load_one_run
    from harness_ext.workflow.paired import paired_values

    loaded: dict[str, object] = {}

    def load(run: str, role: str):
        if (run, role) not in loaded:
            try:
                results = done.get(f"eval:{run}", {}).get("results")
                if results is None:
                    raise NeedlesError(f"eval:{run} recorded no results file", fix=f"rerun the step eval:{run}")
                loaded[run, role] = load_one_run(study.out / results, role)
            except NeedlesError as exc:
                loaded[run, role] = exc
        if isinstance(loaded[run, role], NeedlesError):
            raise loaded[run, role]
        return loaded[run, role]

    targets = study.cfg.targets
    tests: dict[str, dict[str, dict]] = {}
    for name, other in pairs.items():
        tests[name] = {}
        try:
            base, run = load(other, "baseline"), load(name, "candidate")
        except NeedlesError as exc:
            tests[name] = {t.name: {"error": relative(study, exc)} for t in targets}
            continue
        for t in targets:
            entry = SuiteTask(t.task, "target", t.metric, filter=t.filter, label=t.name)
            try:
                b, r, _ = paired_values(base, run, entry)
            except NeedlesError as exc:
                tests[name][t.name] = {"error": relative(study, exc)}
                continue
            tests[name][t.name] = paired_test(b, r, study.cfg.bootstrap_iters)
            # what this pair could detect (Holm's first step over the family, two-sided), shown beside "no significant"
            level = (1 - LEVEL) / (2 * max(len(pairs), 1) * len(targets))
            found = beside(b, r, level)
            tests[name][t.name] |= {"mde": found["mde"], "mde_text": found["text"]}
            if bound := both_at_bound(b, r):  # nothing could move: no test to read (workflow.informative)
                tests[name][t.name] |= {"uninformative": bound}
    return {run: {t: rounded(v) for t, v in row.items()} for run, row in with_holm(tests).items()}


def relative(study: Study, exc: NeedlesError) -> str:
    """The reason without the study folder's absolute path (the report is the same bytes in any folder)."""
    return exc.problem.replace(f"{study.out}/", "").replace(str(study.out), "OUT")


def cell(test: dict | None) -> str:
    """A report.md "vs base" cell: delta [95% interval], p (Holm p)."""
    if test is None:
        return "—"
    if "error" in test:
        return "n/a"
    low, high = test["ci95"]
    text = f"{test['delta']:+.3f} [{low:+.3f}, {high:+.3f}] p={test['p']:.3g} (Holm {test['p_holm']:.3g})"
    if test.get("uninformative"):
        return f"{text}, {verdict_text(test['uninformative'])}"
    if test["p_holm"] >= 1 - LEVEL and "mde" in test:
        # "none": at this n no effect reaches the power; a reader must see that beside "no significant" too
        text += f", n.s.: MDE {shown(test['mde'])}"
    return text
