"""The pilot check of ``needles experiment`` and ``needles study``: before the long run, the base model scores a small
sample of every suite task, and the run stops when a comparison it plans cannot move.

**Sample.** The workflow's own base-model evaluation command with ``--limit L`` into ``OUT/pilot/``:
``L = max(20, 4 x cells)``, where cells are the lengths x depths (or placements) one sample index renders in the
task's ``--metadata`` (harness_ext.workflow.cost.cells_per_sample; the largest over the suite, within the config's
own ``limit``). The synthetic families order their documents (sample, length, depth), so the first L documents hold
at least 4 in every cell; tasks read from data files score their first L documents.

**Rule** (exact, on the pilot's per-document values of the task's metric): *floor* when every document scored 0,
*ceiling* when every document scored 1. With n documents all at 0 the base rate lies below ``1 - 0.05^(1/n)``
(one-sided 95% Clopper-Pearson bound; 0.14 at n 20); all at 1, above ``0.05^(1/n)``. The run stops when

- a target scored where the model works natively (an experiment's target, a context extension's target without
  lengths past the window, every study target) is at floor or at ceiling: at ceiling there is no room to improve,
  and at floor the comparison usually ends as two floors (a finetune can lift a task from zero, but a model that
  fails every pilot document of a task rarely learns it from a short finetune);
- a guard is at floor: nothing to lose, so "held" would be an empty pass;
- a context extension's target (lengths past the native window) is at floor at the edge of the window: there is no
  skill to extend (its pilot scores it at the longest multiple of 64 tokens that fits the native window with the
  reply; a skill the model has at 1K and loses by 8K has nothing to carry past 8K).
- the in-distribution check (held-out documents of the training family) is at ceiling: the finetune could not show
  that it learned its own task. At floor it goes on: a base model that cannot do the trained task is what a
  finetune is for.

A base mean near but above the bound (one right answer in 20) passes: the check stops only what cannot move. A
row whose documents carry no value of its metric (a misspelt metric name) is an error that names the metrics the
task reports.
The stop is a NeedlesError (exit 2) naming every such task, the reason and the fix; ``--skip-pilot-check`` runs
without it. Results: ``OUT/pilot.json`` (and the step's marker), printed as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.workflow.informative import CEILING, FLOOR, at_bound

PER_CELL = 4  # pilot documents in every length x depth cell
MIN_DOCS = 20  # and at least this many per task
SKIP_FLAG = "--skip-pilot-check"
SKIP_HELP = (
    "run without the pilot check (by default the base model first scores a few documents of every suite task, "
    "and the run stops, exit 2, when a target is at floor or ceiling, a guard at floor or the in-distribution check at "
    "ceiling: docs/experiment.md)"
)
# what each kind of row is checked for
TARGET, GUARD, EXTENSION, IN_DISTRIBUTION = "target", "guard", "extension target", "in-distribution check"


@dataclass(frozen=True)
class PilotTask:
    """One suite entry as the pilot checks it."""

    name: str
    task: str  # the lm-eval task or group
    metric: str
    filter: str = "none"
    kind: str = TARGET  # TARGET, GUARD or EXTENSION
    lengths: tuple[int, ...] = ()  # the lengths whose documents it reads (a task piloted in two roles); () all


def pilot_limit(tasks: Sequence[str], metadata: dict, limit: int | None = None) -> int:
    """The pilot's ``--limit`` (module docstring)."""
    from harness_ext.workflow.cost import cells_per_sample

    n = max([MIN_DOCS, *(PER_CELL * c for t in tasks if (c := cells_per_sample(t, metadata)))])
    return min(n, limit) if limit else n


def pilot_argv(argv: list[str], out: Path, limit: int) -> list[str]:
    """An evaluation command turned into the pilot's: output into ``out``, ``--limit limit`` (replacing any)."""
    argv = list(argv)
    if "--limit" in argv:
        i = argv.index("--limit")
        del argv[i : i + 2]
    if "--output_path" in argv:
        argv[argv.index("--output_path") + 1] = str(out)
    return [*argv, "--limit", str(limit)]


def _values(results: Path, entry: PilotTask) -> np.ndarray:
    from harness_ext.reporting.results_io import as_number, iter_samples, load_run
    from harness_ext.tasklib.breakdowns import key_suffix
    from harness_ext.workflow.paired import leaf_tasks

    run = load_run(Path(results))
    values, reported = [], {}
    for leaf in leaf_tasks(run, entry.task):
        path = run.samples_path(leaf)
        if path is None:
            raise NeedlesError(
                f"pilot: {leaf} has no per-sample log in {results}", fix="run lm_eval with --log_samples"
            )
        for row in iter_samples(path):
            reported.update(dict.fromkeys(row.get("metrics") or ()))
            # a document of one length carries the metric's per-length key (passkey_acc_len1024) only for its own
            keys = [entry.metric + key_suffix("length", n) for n in entry.lengths] or [entry.metric]
            value = next((v for k in keys if (v := as_number(row.get(k))) is not None), None)
            if row.get("filter", "none") == entry.filter and value is not None:
                values.append(value)
    if not values:  # a misspelt metric would otherwise surface only when the report pairs the runs, hours later
        # the metrics themselves, not their breakdowns (answer_f1, not answer_f1_len1024)
        names = ", ".join(m for m in reported if not any(m.startswith(r + "_") for r in reported)) or "none"
        raise NeedlesError(
            f"pilot: no {entry.task} document carries metric {entry.metric!r} (filter {entry.filter!r}) in {results};"
            f" the task reports: {names}",
            fix=f"name one of the task's per-sample metrics for {entry.name} in the config",
        )
    return np.asarray(values, dtype=float)


# (row kind, bound) -> (the reason, "{where}" and "{rate}" filled in per row; the fix): the rows that cannot move
_PROBLEMS = {
    (GUARD, FLOOR): (
        "guard {where} ({rate}): it cannot drop, so 'held' would be an empty pass",
        "choose a guard the base model can do at these settings (shorter lengths, an easier task) or drop it",
    ),
    (EXTENSION, FLOOR): (
        "extension target {where} inside the native window ({rate}): there is no skill to extend past it",
        "choose a task or lengths the model solves inside its window (the extension carries a skill past it)",
    ),
    (IN_DISTRIBUTION, CEILING): (
        "in-distribution check {where} ({rate}): the finetune could not show that it learned its own task",
        "make the held-out documents harder (more documents or longer lengths in the training data, which the check "
        "follows) or leave the check out (in_distribution: false)",
    ),
    (TARGET, CEILING): (
        "target {where} ({rate}): no room to improve",
        "make the target harder (longer lengths, more distractors) or drop it",
    ),
    (TARGET, FLOOR): (
        "target {where} ({rate}): the comparison would most likely be two floors",
        "make the task reachable for this model (shorter lengths, an easier variant, a larger model); "
        f"if the finetune is meant to lift it from zero, rerun with {SKIP_FLAG}",
    ),
}


def _problem(entry: PilotTask, bound: str | None, n: int) -> tuple[str, str] | None:
    """(reason, fix) when the row's comparison cannot move, else None."""
    if (entry.kind, bound) not in _PROBLEMS:
        return None
    upper = 1 - 0.05 ** (1 / n)
    where = f"{entry.name}: the base model scored {0 if bound == FLOOR else 1} on all {n} pilot documents"
    rate = f"base rate below {upper:.2f}" if bound == FLOOR else f"base rate above {1 - upper:.2f}"
    reason, fix = _PROBLEMS[(entry.kind, bound)]
    return reason.format(where=where, rate=rate), fix


def check(results: Path, entries: Sequence[PilotTask], limit: int) -> dict:
    """The pilot's record (what OUT/pilot.json holds): every entry's n, mean, bound and problem."""
    rows = []
    for entry in entries:
        v = _values(results, entry)
        bound = at_bound(v)
        problem = _problem(entry, bound, len(v))
        rows.append({"task": entry.name, "kind": entry.kind, "metric": entry.metric, "lengths": list(entry.lengths),
                     "n": int(len(v)),
                     "mean": float(v.mean()), "bound": bound,
                     "problem": problem[0] if problem else None, "fix": problem[1] if problem else None})  # fmt: skip
    return {"results": str(results), "limit": limit, "tasks": rows, "stops": any(r["problem"] for r in rows)}


def format_pilot(record: dict) -> str:
    """The pilot's table as the log prints it."""
    lines = [f"pilot check: the base model on {record['limit']} documents per task at most"]
    for r in record["tasks"]:
        verdict = "STOP: " + r["problem"] if r["problem"] else ("ok" if r["bound"] is None else f"at {r['bound']}")
        at = f" at {', '.join(map(str, r['lengths']))} tokens" if r.get("lengths") else ""
        lines.append(f"  {r['task']} ({r['kind']}, {r['metric']}{at}): mean {r['mean']:.3f} at n {r['n']} - {verdict}")
    return "\n".join(lines)


def enforce(record: dict, skip: bool, log: Callable[[str], None]) -> None:
    """Print the pilot; stop (NeedlesError, exit 2) when a row cannot move, unless ``skip``."""
    if record.get("skipped"):
        log(f"pilot check: not run ({record['skipped']})")
        return
    log(format_pilot(record))
    problems = [r for r in record["tasks"] if r["problem"]]
    if not problems:
        return
    if skip:
        log(f"pilot check: {len(problems)} row(s) cannot move; going on ({SKIP_FLAG})")
        return
    raise NeedlesError(
        "the pilot check stops the run before the long steps: "
        + "; ".join(r["problem"] for r in problems)
        + f" (pilot results: {record['results']})",
        fix="; ".join(dict.fromkeys(r["fix"] for r in problems)) + f"; or rerun with {SKIP_FLAG} to go on anyway",
    )
