"""``needles scorecard MODEL``: run the planned family runs (``scorecard_plan``) as resumable steps, then write the
scorecard (``harness_ext.reporting.scorecard``).

Steps (``harness_ext.workflow.steps``, the experiment's mechanism): ``data`` (which families can get their data;
the marker fixes the answer, so a resumed scorecard scores the same families whatever the network does), one
``eval_<family>`` per family (the real ``lm_eval run --model vllm`` command, or ``--model local-chat-completions``
for an endpoint, into ``runs/<family>/``), ``report``
(always redone: it is seconds). A rerun into the same folder skips finished family runs; a changed plan (another
budget, other lengths) stops with exit 2 naming the marker to delete instead of mixing two plans in one page.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.scorecard.plan import FamilyRun, ScorecardPlan
from harness_ext.workflow.data_step import unavailable
from harness_ext.workflow.steps import Step, StepRunner

MIRROR_ENVS = ("NEEDLES_MDQA_MIRROR", "NEEDLES_NIAH_MIRROR", "NEEDLES_FLENQA_MIRROR")


def eval_argv(plan: ScorecardPlan, run: FamilyRun, out: Path, on_gpu: bool = False) -> list[str]:
    """The lm_eval command of one family run (the runner's vLLM command line, as ``needles experiment`` builds it,
    without ``--apply_chat_template`` for a plain-text family; for an endpoint, its local-chat-completions command
    line)."""
    from harness_ext.plugin.runner import api_eval_command, vllm_eval_command

    output = out / "runs" / run.family
    if plan.endpoint is not None:
        ep = plan.endpoint
        argv = api_eval_command(ep.model, ep.chat_url, ep.tokenizer, run.tasks, run.metadata, plan.window, output)
        return argv + (["--limit", str(run.limit)] if run.limit else [])
    argv = vllm_eval_command(plan.served, run.tasks, run.metadata, plan.window, output_path=output, on_gpu=on_gpu)
    if not run.chat_template:  # the loss family scores plain text: a chat template would change its P tokens
        argv.remove("--apply_chat_template")
    return argv + (["--limit", str(run.limit)] if run.limit else [])


def shell_line(argv: list[str]) -> str:
    """The command as a user reruns it, with the data mirrors this run used (they change what is scored)."""
    from harness_ext.plugin.runner import shell_command

    env = {k: os.environ[k] for k in MIRROR_ENVS if os.environ.get(k)}
    return shell_command(argv, env)


def check_data(plan: ScorecardPlan, log: Callable[[str], None]) -> dict:
    """The data step: families whose every task can get its files, and the others with reason and fix."""
    kept, skipped = [], []
    for run in plan.runs:
        problem = next((p for t in run.tasks if (p := unavailable(t, run.metadata, {})) is not None), None)
        if problem is None:
            kept.append(run.family)
            continue
        skipped.append({"family": run.family, "tasks": run.tasks, "reason": problem.problem, "fix": problem.fix})
        log(f"data: {run.family} ({', '.join(run.tasks)}) is left out: {problem.problem}")
    return {"kept": kept, "skipped": skipped}


def _lm_eval(argv: list[str], folder: Path, out: Path, timeout: int) -> dict:
    from harness_ext.plugin.runner import run_lm_eval

    args = list(argv[2:])
    i = args.index("--output_path")
    del args[i : i + 2]
    folder.parent.mkdir(parents=True, exist_ok=True)  # runs/: the log sits beside the family's folder
    path = run_lm_eval(
        args, folder, log_file=folder.parent / f"{folder.name}.log", timeout=timeout, progress=f"eval_{folder.name}"
    )
    # relative to the scorecard folder, so a copied or moved folder still reads, resumes and compares
    return {"results": os.path.relpath(path, out)}


def run_scorecard(
    plan: ScorecardPlan,
    out: str | Path,
    reproduce: list[str],
    rules: list,
    on_gpu: bool = False,
    timeout: int = 6 * 3600,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the scorecard into ``out``; returns the scorecard (also OUT/scorecard.json)."""
    from harness_ext.reporting.scorecard import build_scorecard, write_scorecard

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: print(f"[needles scorecard] {msg}", file=sys.stderr, flush=True))
    runner = StepRunner(out, say)
    total = len(plan.runs) + 2
    data_step = Step("data", reproduce, lambda: check_data(plan, runner.log), same_command=False)
    data = runner.run([data_step], 1, total)["data"]
    settled = data["kept"] + [s["family"] for s in data["skipped"]]
    if sorted(settled) != sorted(r.family for r in plan.runs):
        raise NeedlesError(
            f"{out} holds a scorecard of other families ({', '.join(data['kept'])})",
            fix=f"use a new output folder, or delete {out / 'steps'} to start this one over",
        )
    skipped = {s["family"]: s for s in data["skipped"]}
    families = []
    steps = []
    for run in plan.runs:
        argv = eval_argv(plan, run, out, on_gpu)
        entry = {"family": run.family, "tasks": run.tasks, "what": run.what, "command": shell_line(argv),
                 "metadata": run.metadata, "limit": run.limit}  # fmt: skip
        if run.family in skipped:
            entry |= {"status": "left out", "reason": skipped[run.family]["reason"], "fix": skipped[run.family]["fix"]}
        else:
            entry["status"] = "run"
            folder = out / "runs" / run.family
            steps.append(
                Step(f"eval_{run.family}", argv, lambda a=argv, f=folder: _lm_eval(a, f, out, timeout), folder)
            )
        families.append(entry)
    report_step = Step("report", reproduce, lambda: {}, same_command=False)
    runner.write_plan([data_step, *steps, report_step], {"model": plan.model, "served": plan.served,
                                                         "budget": plan.budget.name, "lengths": plan.lengths})  # fmt: skip
    number = 2
    by_name = {s.name: s for s in steps}
    for entry in families:
        if entry["status"] != "run":
            runner.log(f"{number}/{total} eval_{entry['family']}: left out ({entry['reason']})")
            number += 1
            continue
        name = f"eval_{entry['family']}"
        done = runner.run([by_name[name]], number, total)[name]
        marker = runner.done(name) or {}
        entry |= {"results": done["results"], "seconds": marker.get("seconds")}
        number += 1
    runner.log(f"{total}/{total} report: {out / 'scorecard.html'}")
    card, rows = build_scorecard(
        families,
        out,
        rules,
        meta={
            "model": plan.name,
            "given": plan.model,
            "served": plan.served,
            "window": plan.window,
            "window_source": plan.window_source,
            "budget": plan.budget.name,
            "budget_what": plan.budget.what,
            "lengths": plan.lengths,
            "command": shlex.join(reproduce),
            **({"endpoint": plan.endpoint.describe()} if plan.endpoint is not None else {}),
        },
    )
    write_scorecard(card, rows, out, rules[0])
    return card
