"""The experiment config: a base model, its training (what ``needles finetune`` takes), and an evaluation
suite of lm-eval tasks, each a ``target`` (must improve) or a ``guard`` (must not drop by more than its margin).

YAML::

    name: smollm2_cpu
    model: smollm2
    alpha: 0.05
    max_model_len: 4096
    finetune: {recipe: smollm2_kv_lora.yaml, data: {num_samples: 320}}   # FinetuneConfig keys
    metadata: {lengths: [256], niah_lengths: [512]}                      # one --metadata for the suite
    fixtures: {flenqa: {ctx_sizes: [250, 500], instances: 1}}            # built offline, marked non-official
    suite:
      - {task: kv_retrieval_simple, role: target, metric: value_acc}
      - {task: flenqa, role: target, metric: acc}
      - {task: mdqa_closedbook, role: guard, metric: best_subspan_em, margin: 0.05, optional: true}
    in_distribution: {documents: 60}   # held-out documents of the training family (harness_ext.workflow.in_distribution)

``optional: true``: when the task's data cannot be had (no mirror, no cache, no network) the experiment runs
without it and says so in its log, plan and comparison; otherwise missing data stops it before the first step.
"""

from __future__ import annotations

import math
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.workflow.config_file import (
    check_known_keys,
    check_strings,
    config_error,
    in_distribution_of,
    load_config,
)
from harness_ext.workflow.suite import FIXTURE_OPTIONS, ROLES, ExperimentConfig, SuiteTask

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # experiments shipped in the wheel (the demo's)


KIND = "experiment config"  # how errors name the file


def _fail(path: str, problem: str, fix: str) -> NeedlesError:
    return config_error(KIND, path, problem, fix)


def _suite_entry(path: str, i: int, raw: object) -> SuiteTask:
    where = f"suite[{i}]"
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} is not a mapping", "write `- {task: NAME, role: target, metric: METRIC}`")
    check_known_keys(KIND, path, raw, SuiteTask, where)
    fix = "e.g. {task: kv_retrieval_simple, role: target, metric: value_acc}"
    check_strings(KIND, path, raw, ("task", "role", "metric"), where, fix)
    if raw["role"] not in ROLES:
        raise _fail(
            path, f"{where} role {raw['role']!r} is neither target nor guard", "use role: target or role: guard"
        )
    margin = raw.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise _fail(path, f"{where} margin {margin!r} is not a number >= 0", "e.g. margin: 0.01 (one point)")
    if not isinstance(raw.get("optional", False), bool):
        raise _fail(path, f"{where} optional {raw['optional']!r} is not true or false", "write optional: true")
    if raw["role"] == "target" and margin:
        raise _fail(path, f"{where} is a target with a margin", "margins belong to guards; drop it")
    return SuiteTask(**{**raw, "margin": float(margin)})


def experiment_from_dict(values: dict, path: str = "<dict>") -> ExperimentConfig:
    """A validated config; every problem names the key and the fix."""
    if not isinstance(values, dict):
        raise _fail(path, "is not a mapping", "write `key: value` lines (see examples/experiments/)")
    check_known_keys(KIND, path, values, ExperimentConfig)
    check_strings(KIND, path, values, ("name", "model"))
    suite = values.get("suite")
    if not isinstance(suite, list) or not suite:
        raise _fail(path, "needs a non-empty suite", "add `suite:` with one `- {task, role, metric}` per task")
    entries = [_suite_entry(path, i, raw) for i, raw in enumerate(suite)]
    if not any(e.role == "target" for e in entries):
        raise _fail(path, "has no target task", "mark at least one suite task `role: target`")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise _fail(path, f"suite names repeat: {names}", "give repeated tasks a distinct `label`")
    alpha = values.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise _fail(path, f"alpha {alpha!r} is not between 0 and 0.5", "e.g. alpha: 0.05")
    for key, lo in (("max_model_len", 64), ("bootstrap_iters", 100), ("seed", 0), ("limit", 1)):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise _fail(path, f"{key} {v!r} is not an integer >= {lo}", f"fix `{key}:`")
    for key in ("finetune", "metadata", "fixtures"):
        if not isinstance(values.get(key, {}), dict):
            raise _fail(path, f"{key} is not a mapping", f"write `{key}: {{...}}`")
    for name, options in (values.get("fixtures") or {}).items():
        if name not in FIXTURE_OPTIONS:
            raise _fail(path, f"fixtures has unknown fixture {name!r}", f"use one of {sorted(FIXTURE_OPTIONS)}")
        if not isinstance(options or {}, dict) or sorted(set(options or {}) - set(FIXTURE_OPTIONS[name])):
            raise _fail(path, f"fixtures.{name} has unknown options", f"use keys among {list(FIXTURE_OPTIONS[name])}")
    in_distribution = in_distribution_of(KIND, path, values)  # the held-out check of the training family
    return ExperimentConfig(**{**values, "suite": entries, "in_distribution": in_distribution})


def packaged_experiment(name: str) -> Path:
    """An experiment config shipped inside the package (``harness_ext/experiment/configs/NAME``)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise NeedlesError(f"no packaged experiment {name!r}", fix=f"use one of {shipped}")
    return path


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML (safe loader)."""
    return load_config(KIND, path, experiment_from_dict, "pass a YAML file (see examples/experiments/)")
