"""The experiment's ``pilot`` step (harness_ext.workflow.pilot): the base model on a few documents of every suite task,
before the base evaluation and the finetune; the run stops when a row's comparison cannot move.

The plain experiment pilots its base evaluation's command; the context extension pilots the base model inside its
native window (its guards and in-window targets at their lengths inside it, an extension target at the window's edge:
an extension carries past the window a skill the model has up to its end). Once the
finetune has finished, the check has nothing left to save and no longer stops a resumed run; the report's
uninformative marks (harness_ext.workflow.informative) take over.
"""

from __future__ import annotations

from pathlib import Path

from harness_ext.core.atomic_io import write_json_atomic
from harness_ext.workflow.in_distribution import ROLE as IN_DISTRIBUTION_ROLE
from harness_ext.workflow.pilot import (
    EXTENSION,
    GUARD,
    IN_DISTRIBUTION,
    SKIP_FLAG,
    TARGET,
    PilotTask,
    check,
    enforce,
    pilot_argv,
    pilot_limit,
)
from harness_ext.workflow.steps import Step, StepRunner
from harness_ext.workflow.suite import ExperimentConfig


def entries(
    cfg: ExperimentConfig,
    extension_targets: frozenset[str] = frozenset(),
    lengths: dict[str, tuple[int, ...]] | None = None,
) -> list[PilotTask]:
    """The suite's targets, guards and in-distribution check as the pilot checks them; ``extension_targets``: names
    of targets with lengths past the window; ``lengths``: name -> the lengths whose documents an entry reads (all
    when absent)."""
    kinds = {"guard": GUARD, "target": TARGET, IN_DISTRIBUTION_ROLE: IN_DISTRIBUTION}
    lengths = lengths or {}
    return [
        PilotTask(
            e.name,
            e.task,
            e.metric,
            e.filter,
            EXTENSION if e.name in extension_targets else kinds[e.role],
            lengths.get(e.name, ()),
        )
        for e in cfg.suite
        if e.role in kinds
    ]


def pilot_step(
    argv: list[str], cfg: ExperimentConfig, out: Path, runner: StepRunner, checked: list[PilotTask], skip: bool
) -> Step:
    """The ``pilot`` step: ``argv`` (a base-model evaluation of ``cfg``'s tasks) on the pilot's limit, into
    OUT/pilot/; its record goes to OUT/pilot.json and the step's marker."""
    limit = pilot_limit(cfg.tasks, cfg.metadata, cfg.limit)
    folder = out / "pilot"
    command = pilot_argv(argv, folder, limit)

    def run() -> dict:
        from harness_ext.workflow.eval_step import run_eval

        if skip:
            return {"skipped": SKIP_FLAG}
        if runner.done("finetune") is not None:
            return {"skipped": "the finetune had finished before the pilot ran"}
        record = check(run_eval(command, folder), checked, limit)
        write_json_atomic(out / "pilot.json", record)
        return record

    return Step("pilot", command, run, folder)


def after_pilot(record: dict, runner: StepRunner, skip: bool) -> None:
    """Print the pilot and stop the run when a row cannot move (not with ``skip``, nor once the finetune finished)."""
    enforce(record, skip or runner.done("finetune") is not None, runner.log)


def describe(argv: list[str], cfg: ExperimentConfig, skip: bool = False) -> str:
    """The ``--dry-run`` line of the pilot (a comment: its command is the base model's with ``--limit``, in
    OUT/plan.json once the run starts)."""
    if skip:
        return f"# pilot check: not run ({SKIP_FLAG})"
    limit = pilot_limit(cfg.tasks, cfg.metadata, cfg.limit)
    folder = Path(argv[argv.index("--output_path") + 1]).parent / "pilot"
    return (
        f"# pilot check: the base model on the first {limit} documents of each task ({', '.join(cfg.tasks)}; "
        f"max_model_len {cfg.max_model_len}) into {folder}; stops on a target at floor or ceiling, a guard at floor, "
        "the in-distribution check at ceiling"
    )
