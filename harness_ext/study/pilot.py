"""``needles study``'s pilot check (harness_ext.workflow.pilot): before the first finetune, the base model scores the
pilot's few documents of every target with the study's own ``eval:base`` command, and the study stops when a target
is at floor or at ceiling (every study target is compared with the base model where it works natively) or a run's
in-distribution check is at ceiling (the finetune could not show that it learned its own task).

It runs in the process that drives the study (local or Ray), as the step ``pilot`` (marker ``OUT/steps/pilot.json``,
outputs ``OUT/pilot/`` and ``OUT/pilot.json``) ahead of the plan's steps; once any finetune has finished it has
nothing left to save and is not run. A scheduler running ``--step NAME`` one step at a time runs no pilot.
"""

from __future__ import annotations

from harness_ext.core.atomic_io import write_json_atomic
from harness_ext.study import steps as st
from harness_ext.study.config import BASE
from harness_ext.workflow.in_distribution import label
from harness_ext.workflow.pilot import (
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


def command(study: st.Study) -> tuple[list[str], int]:
    """(the pilot's lm_eval command, its --limit): ``eval:base``'s on the pilot's limit, into OUT/pilot/."""
    cfg = study.cfg
    limit = pilot_limit([t.task for t in cfg.targets], cfg.metadata, cfg.limit)
    return pilot_argv(st.eval_argv(study, BASE), study.out / "pilot", limit), limit


def run_pilot(study: st.Study, skip: bool, total: int) -> None:
    """Run the pilot step (numbered 0 of ``total``: before the plan) and stop the study when a target cannot move."""
    runner = StepRunner(study.out, study.log)
    if any(runner.done(f"finetune:{r}") is not None for r in study.runs):
        study.log("pilot check: not run (a finetune has finished: nothing left to save)")
        return
    argv, limit = command(study)
    entries = [PilotTask(t.name, t.task, t.metric, t.filter, TARGET) for t in study.cfg.targets]
    checks = {c["task"]: c["metric"] for c in study.in_distribution.values() if c.get("task")}
    entries += [PilotTask(label(task), task, m, kind=IN_DISTRIBUTION) for task, m in checks.items()]

    def run() -> dict:
        from harness_ext.workflow.eval_step import run_eval

        if skip:
            return {"skipped": SKIP_FLAG}
        record = check(run_eval(argv, study.out / "pilot", progress="pilot"), entries, limit)
        write_json_atomic(study.out / "pilot.json", record)
        return record

    record = runner.run([Step("pilot", argv, run, study.out / "pilot")], first=0, total=total)["pilot"]
    enforce(record, skip, study.log)


def describe(study: st.Study, skip: bool = False) -> str:
    """What ``--dry-run`` says of the pilot (on stderr: stdout lists the plan's steps)."""
    import shlex

    if skip:
        return f"pilot check: not run ({SKIP_FLAG})"
    argv, limit = command(study)
    return f"pilot check (the base model, first {limit} documents per target): {shlex.join(argv)}"
