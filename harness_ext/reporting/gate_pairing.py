"""The gate's inputs: load the two runs, check they are comparable, choose the gated metrics, pair the samples.

Runs are paired per sample on (task, doc_id, filter). Anything that makes the comparison meaningless (different
tasks, task versions, generated data, documents, prompts or sample sets) raises IncomparableRuns (exit 2).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.results_io import Run, as_number, find_results, iter_samples, load_run, split_metric_key
from harness_ext.tasklib.breakdowns import is_overall


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
    effective_length: bool = False  # also fail when the candidate's effective length shrinks (gate_length)
    threshold: float = 85.6  # RULER rule threshold, 0-100 scale
    relative: float | None = None  # also check the relative rule at this fraction


@dataclass
class PairedValues:
    """One metric's per-sample values on the documents both runs scored, in doc_id order."""

    doc_ids: list[int]
    baseline: np.ndarray
    candidate: np.ndarray


def load_one_run(path: str | Path, role: str) -> Run:
    """The single results file named by ``--baseline`` / ``--candidate`` (a file, or a folder holding one)."""
    found = find_results([path])
    if len(found) != 1:
        listing = "\n  ".join(str(p) for p in found)
        raise NeedlesError(
            f"--{role} {path} holds {len(found)} results files:\n  {listing}",
            fix=f"pass one results_*.json file as --{role}",
        )
    return load_run(found[0])


def task_list(base: Run, cand: Run, config: GateConfig) -> list[str]:
    """The tasks to gate: ``--tasks`` (each must be in both runs), else all tasks, which must be the same."""
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


def check_task_compatible(base: Run, cand: Run, task: str) -> None:
    """Same task version, few-shot setting and generated data, or IncomparableRuns."""
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
            f"{task}: generated data differs (needles_data_sha256 {str(b)[:12]} vs {str(c)[:12]})",
            fix="use the same --metadata (lengths, depths, seed, num_samples) and tokenizer",
        )


def gated_metrics(base: Run, cand: Run, task: str, config: GateConfig) -> list[tuple[str, str]]:
    """(metric, filter) pairs to gate: those matching ``--metrics``, else the overall ones; both runs need each."""

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


def _index_samples(run: Run, task: str, names: set[str]) -> dict[tuple[int, str], dict]:
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


def load_pairs(base: Run, cand: Run, task: str, metrics: list[tuple[str, str]]) -> dict[tuple[str, str], PairedValues]:
    """{(metric, filter): paired values} after checking the runs saw the same documents, prompts and targets."""
    names = {m for m, _ in metrics}
    b, c = _index_samples(base, task, names), _index_samples(cand, task, names)
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
        out[(metric, filt)] = PairedValues(
            ids,
            np.array([b[(i, filt)][metric] for i in ids], dtype=float),
            np.array([c[(i, filt)][metric] for i in ids], dtype=float),
        )
    return out


def sample_values(run: Run, task: str, metric: str, filt: str) -> list[float]:
    """Per-sample values of one metric from the run's sample log ([] without one)."""
    path = run.samples_path(task)
    if path is None:
        return []
    values = (as_number(r.get(metric)) for r in iter_samples(path) if r.get("filter", "none") == filt)
    return [v for v in values if v is not None]
