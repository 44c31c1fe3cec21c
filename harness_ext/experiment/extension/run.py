"""``needles experiment`` with a context extension: the steps of the three-variant experiment (data, eval_base,
eval_training_free, finetune, eval_finetuned, compare, report), its ``--dry-run`` commands and its cost estimate.
The plan (harness_ext.experiment.extension.plan) says which lengths each variant scores."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic, write_json_atomic
from harness_ext.experiment.extension.plan import (
    PLAN,
    VARIANTS,
    eval_folder,
    extension_mde_text,
    extension_pilot,
    is_extension,
    plan_extension,
    variant_argvs,
)
from harness_ext.experiment.extension.report import compare_variants, to_markdown, write_report
from harness_ext.experiment.run import finetune_step, lm_eval_step, open_folder, reference_numbers, run_experiment
from harness_ext.workflow.steps import Step
from harness_ext.workflow.suite import ExperimentConfig
from harness_ext.workflow.training import finetune_config


def run(
    cfg: ExperimentConfig,
    out: str | Path,
    log: Callable[[str], None] | None = None,
    config_path: str | None = None,
    skip_pilot_check: bool = False,
) -> dict:
    """``needles experiment``: the extension experiment when the finetune extends the window, else the plain one."""
    out = Path(out).expanduser().resolve()
    ft = finetune_config(cfg, out)
    if not is_extension(ft):
        return run_experiment(cfg, out, log=log, config_path=config_path, skip_pilot_check=skip_pilot_check)
    return run_extension(cfg, ft, out, log, config_path, skip_pilot_check)


def run_extension(
    cfg: ExperimentConfig,
    ft,
    out: Path,
    log: Callable[[str], None] | None = None,
    config_path: str | None = None,
    skip_pilot_check: bool = False,
) -> dict:
    """Run (or resume) the three-variant experiment into ``out``; returns the comparison (OUT/comparison.json)."""
    from harness_ext.experiment import pilot
    from harness_ext.finetune.modeling import resolve_model

    base = resolve_model(cfg.model)
    plan_extension(cfg, ft)  # every check before the first slow step
    runner, data_step, data, run_cfg = open_folder(cfg, ft, out, log, config_path, len(PLAN))
    ft_yaml, reproduce = out / "finetune.yaml", data_step.command
    plan = plan_extension(run_cfg, ft)  # again on the suite the data step settled on
    argvs = variant_argvs(run_cfg, ft, plan, base, out)
    runner.log(extension_mde_text(run_cfg, plan))
    done: dict[str, dict] = {"data": data}

    def compare() -> dict:
        results = {v: done[f"eval_{v}"]["results"] for v in VARIANTS}
        comparison = compare_variants(results, run_cfg, plan.to_json(), data["skipped"])
        write_json_atomic(out / "comparison.json", comparison)
        write_atomic(out / "comparison.md", to_markdown(comparison, reference_numbers(cfg)))
        return {"comparison": str(out / "comparison.json"), "claim_holds": comparison["claim_holds"]}

    def evaluation(variant: str) -> Step:
        calls = argvs[variant]

        def run_calls() -> dict:
            results = {}
            for kind, argv in calls.items():
                folder = eval_folder(out, variant, kind)
                if folder.exists():  # the step's second folder: half-written by an interrupted run
                    shutil.rmtree(folder)
                results[kind] = lm_eval_step(argv, folder)["results"]
            return {"results": results}

        first = next(iter(calls))
        return Step(f"eval_{variant}", step_command(calls), run_calls, eval_folder(out, variant, first))

    pilot_argv, pilot_cfg, checked = extension_pilot(run_cfg, plan, base, out, ft.system_prompt)
    no_pilot = skip_pilot_check or not pilot_cfg.suite  # a suite of losses only: nothing at a floor to stop at
    steps = [
        pilot.pilot_step(pilot_argv, pilot_cfg, out, runner, checked, no_pilot),
        evaluation("base"),
        evaluation("training_free"),
        Step(
            "finetune",
            ["needles", "finetune", "--config", str(ft_yaml)],
            lambda: finetune_step(ft),
            out / "finetune",
            keep_partial=True,
        ),
        evaluation("finetuned"),
        Step("compare", reproduce, compare, same_command=False),
        Step(
            "report",
            reproduce,
            lambda: write_report(cfg.name, {v: done[f"eval_{v}"]["results"] for v in VARIANTS}, plan.native, out),
            same_command=False,
        ),
    ]
    assert [data_step.name, *(s.name for s in steps)] == list(PLAN)
    runner.write_plan(
        [data_step, *steps],
        {
            "name": cfg.name,
            "model": base,
            "config": str(out / "experiment.yaml"),
            "skipped": data["skipped"],
            "extension": plan.to_json(),
        },  # fmt: skip
    )
    for i, step in enumerate(steps, 2):  # one at a time: later steps read earlier outputs
        done.update(runner.run([step], i, len(PLAN)))
        if step.name == "pilot":
            pilot.after_pilot(done["pilot"], runner, no_pilot)
    return compare_variants(
        {v: done[f"eval_{v}"]["results"] for v in VARIANTS}, run_cfg, plan.to_json(), data["skipped"]
    )


def step_command(calls: dict[str, list[str]]) -> list[str]:
    """What reproduces a variant's evaluation by hand: its one lm_eval command, or both run one after the other."""
    if len(calls) == 1:
        return next(iter(calls.values()))
    return ["sh", "-c", " && ".join(shlex.join(argv) for argv in calls.values())]


def describe(cfg: ExperimentConfig, out: Path) -> str:
    """The commands of the experiment (``--dry-run``): the extension's three evaluations, or the plain plan."""
    from harness_ext.experiment.run import describe_plan
    from harness_ext.finetune.modeling import resolve_model

    out = Path(out)
    ft = finetune_config(cfg, out)
    if not is_extension(ft):
        return describe_plan(cfg, out)
    from harness_ext.experiment.pilot import describe as describe_pilot

    plan = plan_extension(cfg, ft)
    argvs = variant_argvs(cfg, ft, plan, resolve_model(cfg.model), out)
    pilot_argv, pilot_cfg, _ = extension_pilot(cfg, plan, resolve_model(cfg.model), out, ft.system_prompt)
    commands = {v: [shlex.join(a) for a in argvs[v].values()] for v in VARIANTS}
    return "\n".join(
        [
            f"# context extension: native window {plan.native} -> {plan.target} ({plan.rope['rope_type']}); "
            f"base scored on {plan.inside}, the extended variants also on {plan.past}",
            "# " + extension_mde_text(cfg, plan).replace("\n", "\n# "),
            "# data: check every suite task's data (optional tasks without it are left out)",
            describe_pilot(pilot_argv, pilot_cfg, skip=not pilot_cfg.suite),
            *commands["base"],
            *commands["training_free"],
            f"needles finetune --config {out / 'finetune.yaml'}",
            *commands["finetuned"],
        ]
    )


def estimate_text(cfg: ExperimentConfig, ft) -> str:
    """The cost estimate of the three evaluations (harness_ext.workflow.cost per variant), printed first."""
    from harness_ext.workflow.cost import estimate, format_estimate, training_text

    if not is_extension(ft):
        return format_estimate(estimate(cfg, ft))
    plan = plan_extension(cfg, ft)
    base_cfg = dataclasses.replace(
        cfg, suite=[e for e in cfg.suite if e.name in plan.base_tasks], metadata=plan.base_metadata(cfg.metadata)
    )
    full, short = estimate(cfg, ft), estimate(base_cfg, ft)
    lines = [
        f"[needles experiment] cost estimate: context extension {plan.native} -> {plan.target} tokens "
        f"({plan.rope['rope_type']}, factor {plan.rope.get('factor', 1):g}); training {training_text(full)}"
    ]
    for variant, est in (("base, inside the native window", short), ("training-free and finetuned, each", full)):
        docs = sum(r["documents"] for r in est["eval"])
        prompt = sum(r["prompt_tokens"] for r in est["eval"])
        lines.append(f"  {variant}: {docs:,} documents, ~{prompt:,} prompt tokens")
    for r in full["eval"]:
        lines.append(f"    {r['task']}: {r['documents']:,} documents, ~{r['prompt_tokens']:,} prompt tokens")
    if full["not_estimated"]:
        lines.append(f"  not estimated (their data is read at run time): {', '.join(full['not_estimated'])}")
    return "\n".join(lines)
