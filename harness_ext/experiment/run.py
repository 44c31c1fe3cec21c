"""``needles experiment``: score the base model on the suite, finetune, score the finetuned model on the same
documents, then the paired comparison and its verdict, leaderboard rows and plots. Each step is resumable.

Outputs under OUT: ``plan.json`` (every step and its command), ``steps/*.json`` (finished-step markers),
``pilot/`` and ``pilot.json`` (the pilot check, harness_ext.experiment.pilot), ``eval_base/``, ``finetune/``,
``eval_finetuned/``, ``comparison.{json,md}``, ``leaderboard.csv``, ``plots/``.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic, write_json_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.in_distribution import plain as without_check
from harness_ext.experiment.in_distribution import with_in_distribution
from harness_ext.experiment.verdict import compare_runs, to_markdown
from harness_ext.workflow.data_step import prepare_data
from harness_ext.workflow.mde import experiment_plan_blocks
from harness_ext.workflow.steps import Step, StepRunner
from harness_ext.workflow.suite import ExperimentConfig

# The experiment's steps, in order (the progress lines number them out of these)
PLAN = ("data", "pilot", "eval_base", "finetune", "eval_finetuned", "compare", "report")


def scored_model(ft, out: Path) -> tuple[Path | None, Path | None]:
    """(adapter, model folder) the finetuned suite scores: the LoRA adapter on the base, or with ``merge: true``
    the merged model (the same weights folded in: vLLM then runs no LoRA kernels, which on CPU cost the
    adapter's evaluation ~1.8x the base model's time), or the fully finetuned model."""
    if ft.method != "lora":
        return None, out / "finetune" / "model"
    if ft.merge:
        return None, out / "finetune" / "merged"
    return out / "finetune" / "adapter", None


def eval_argv(
    cfg: ExperimentConfig,
    base: str,
    out: Path,
    adapter: Path | None = None,
    merged: Path | None = None,
    lora_rank: int | None = None,
    hf_overrides: dict | None = None,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> list[str]:
    """The lm_eval command that scores the suite (the same documents for the base and the finetuned model);
    ``hf_overrides``: the RoPE of a context extension, for an adapter served on the base model; ``system_prompt``:
    the finetune's, rendered for both models so their prompts are the ones it trained on (``chat_template`` False:
    neither the chat template nor a system prompt, for tasks scored on plain text). Prefixed with
    ``env VAR=value`` where the served model needs the environment ``needles finetune`` prints (eval_env)."""
    from harness_ext.plugin.runner import eval_env, vllm_eval_command
    from harness_ext.workflow.eval_step import with_env

    argv = vllm_eval_command(
        base,
        cfg.tasks,
        cfg.metadata,
        cfg.max_model_len,
        adapter=adapter,
        merged=merged,
        output_path=out,
        on_gpu=cfg.on_gpu,
        lora_rank=lora_rank,
        hf_overrides=hf_overrides,
        chat_template=chat_template,
    )
    if cfg.gen_kwargs:
        argv += ["--gen_kwargs", cfg.gen_kwargs]
    if cfg.limit:
        argv += ["--limit", str(cfg.limit)]
    if system_prompt:
        argv += ["--system_instruction", system_prompt]
    # the base's tokenizer: a merged or finetuned folder saves the same one, and does not exist yet when planned
    return with_env(argv, eval_env(base, cfg.max_model_len))


def lm_eval_step(argv: list[str], out: Path) -> dict:
    """Run one evaluation step's command into ``out`` (log beside it; its environment and a time limit sized by
    the cost estimate: harness_ext.workflow.eval_step); the marker's record."""
    from harness_ext.workflow.eval_step import run_eval

    return {"results": str(run_eval(argv, out))}


def finetune_step(ft) -> dict:
    """The finetune step: train (resuming from checkpoints), or find the finished run whose marker was lost (the
    same options and data only: harness_ext.finetune.finished)."""
    from harness_ext.finetune.finished import finished_or_trained

    manifest = finished_or_trained(ft)
    return {"manifest": str(Path(ft.output_dir) / "manifest.json"), "final_loss": manifest["final_loss"]}


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    log: Callable[[str], None] | None = None,
    config_path: str | None = None,
    skip_pilot_check: bool = False,
) -> dict:
    """Run (or resume) the experiment into ``out``; returns the comparison (also in OUT/comparison.json).
    ``skip_pilot_check``: no pilot (harness_ext.experiment.pilot) before the long steps."""
    from harness_ext.experiment import pilot
    from harness_ext.finetune.context import plan_context
    from harness_ext.finetune.modeling import resolve_model

    out = Path(out).expanduser().resolve()
    base = resolve_model(cfg.model)
    # every option checked before the first slow step or the first file; the in-distribution check joins the suite
    cfg, ft = with_in_distribution(cfg, out)
    runner, data_step, data, run_cfg = open_folder(cfg, ft, out, log, config_path, len(PLAN))
    ft_yaml, reproduce, skipped = out / "finetune.yaml", data_step.command, data["skipped"]
    # what each target can detect at its n, before the evaluations (a resumed run plans from its base scores)
    for block in experiment_plan_blocks(run_cfg, (runner.done("eval_base") or {}).get("outputs", {}).get("results")):
        runner.log(block)

    adapter, merged = scored_model(ft, out)
    base_argv = eval_argv(run_cfg, base, out / "eval_base", system_prompt=ft.system_prompt)
    # an extended adapter is served on the base model with the RoPE it was trained with (a merged folder's config
    # carries it already)
    plan = plan_context(ft.context, base, cfg.model)
    overrides = plan.hf_overrides() if plan and adapter else None
    tuned_argv = eval_argv(
        run_cfg,
        base,
        out / "eval_finetuned",
        adapter=adapter,
        merged=merged,
        lora_rank=ft.lora_r,
        hf_overrides=overrides,
        system_prompt=ft.system_prompt,
    )

    def compare() -> dict:
        comparison = compare_runs(done["eval_base"]["results"], done["eval_finetuned"]["results"], run_cfg, skipped)
        write_json_atomic(out / "comparison.json", comparison)
        write_atomic(out / "comparison.md", to_markdown(comparison, reference_numbers(cfg)))
        return {"comparison": str(out / "comparison.json"), "claim_holds": comparison["claim_holds"]}

    done: dict[str, dict] = {"data": data}
    steps = [
        pilot.pilot_step(base_argv, run_cfg, out, runner, pilot.entries(run_cfg), skip_pilot_check),
        Step("eval_base", base_argv, lambda: lm_eval_step(base_argv, out / "eval_base"), out / "eval_base"),
        Step(
            "finetune",
            ["needles", "finetune", "--config", str(ft_yaml)],
            lambda: finetune_step(ft),
            out / "finetune",
            keep_partial=True,
        ),
        Step(
            "eval_finetuned",
            tuned_argv,
            lambda: lm_eval_step(tuned_argv, out / "eval_finetuned"),
            out / "eval_finetuned",
        ),
        Step("compare", reproduce, compare, same_command=False),
        Step("report", reproduce, lambda: report(run_cfg, done, out), same_command=False),
    ]
    assert [data_step.name, *(s.name for s in steps)] == list(PLAN)
    runner.write_plan(
        [data_step, *steps],
        {"name": cfg.name, "model": base, "config": str(out / "experiment.yaml"), "skipped": skipped},
    )
    for i, step in enumerate(steps, 2):  # run one at a time so later steps see earlier outputs
        done.update(runner.run([step], i, len(PLAN)))
        if step.name == "pilot":
            pilot.after_pilot(done["pilot"], runner, skip_pilot_check)
    return compare_runs(done["eval_base"]["results"], done["eval_finetuned"]["results"], run_cfg, skipped)


def open_folder(
    cfg: ExperimentConfig, ft, out: Path, log: Callable[[str], None] | None, config_path: str | None, steps: int
) -> tuple[StepRunner, Step, dict, ExperimentConfig]:
    """What every experiment does first, the plain one and the context extension alike: OUT/finetune.yaml and
    OUT/experiment.yaml, then the data step (step 1 of ``steps``), whose suite fixes every later command.
    Returns (runner, data step, its outputs, the config on the suite it settled on)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "finetune.yaml", yaml.safe_dump(dataclasses.asdict(ft), sort_keys=False))
    write_atomic(out / "experiment.yaml", yaml.safe_dump(_plain(cfg), sort_keys=False))
    runner = StepRunner(out, log)
    reproduce = ["needles", "experiment", config_path or str(out / "experiment.yaml"), "-o", str(out)]

    def data() -> dict:
        return {**prepare_data(cfg, out / "fixtures", runner.log), "training": check_training_data(ft)}

    data_step = Step("data", reproduce, data, out / "fixtures", same_command=False)
    done = runner.run([data_step], 1, steps)["data"]
    settled = sorted(done["suite"] + [s["task"] for s in done["skipped"]])
    if settled != sorted(e.name for e in cfg.suite):
        raise NeedlesError(
            f"{out} holds an experiment over another suite ({', '.join(settled)})",
            fix=f"use a new output folder, or delete {out / 'steps'} to start this one over",
        )
    kept = set(done["suite"])
    run_cfg = dataclasses.replace(cfg, suite=[e for e in cfg.suite if e.name in kept], metadata=done["metadata"])
    return runner, data_step, done, run_cfg


def check_training_data(ft) -> dict:
    """The finetune's training documents generated and checked against its evaluation sets (the leakage check)
    in the data step, so a refusal costs seconds there, not the evaluations that run before the finetune."""
    from harness_ext.finetune.data import prepare_docs
    from harness_ext.finetune.modeling import load_base

    base, _, tokenizer = load_base(ft)
    _, tasks, docs, leak = prepare_docs(ft, tokenizer, base)
    return {"documents": len(docs), "eval_tasks": tasks, "eval_docs": leak.eval_docs}


def _plain(cfg: ExperimentConfig) -> dict:
    d = without_check(cfg.to_dict())
    d["suite"] = [
        {k: v for k, v in e.items() if v not in ("", None) and not (k == "filter" and v == "none")} for e in d["suite"]
    ]
    return {k: v for k, v in d.items() if v is not None}


def reference_numbers(cfg: ExperimentConfig) -> dict:
    """Published numbers to show beside ours: {suite task name: text}, from the config's reference CSV."""
    if not cfg.reference:
        return {}
    import csv

    path = Path(cfg.reference)
    if not path.is_file():
        from harness_ext.core.paths import templates_dir

        path = templates_dir().parent / "leaderboards" / cfg.reference
    if not path.is_file():
        raise NeedlesError(f"reference CSV {cfg.reference} not found", fix="name a file in leaderboards/ or a path")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            task, value = row.get("task"), row.get("value")
            if task and value:
                out.setdefault(task, "")
                out[task] += ("; " if out[task] else "") + f"{row.get('model', '')}: {value}"
    return out


def report(cfg: ExperimentConfig, done: dict, out: Path) -> dict:
    """Leaderboard rows of both runs (the finetuned one named by its adapter) and the plots they support."""
    from harness_ext.core.output_files import write_output
    from harness_ext.reporting.leaderboard_csv import collect_rows, export
    from harness_ext.reporting.plots import all_plots, available

    board = out / "leaderboard.csv"
    export([done["eval_base"]["results"]], board)
    export([done["eval_finetuned"]["results"]], board, adapter=f"{cfg.name}-finetuned")
    written = []
    if available():
        rows = collect_rows([done["eval_base"]["results"]]) + collect_rows(
            [done["eval_finetuned"]["results"]], adapter=f"{cfg.name}-finetuned"
        )
        for name, png in all_plots(rows).items():
            write_output(out / "plots" / f"{name}.png", png, "plot")
            written.append(str(out / "plots" / f"{name}.png"))
    else:
        print("[needles experiment] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return {"leaderboard": str(board), "plots": written}


def describe_plan(cfg: ExperimentConfig, out: Path) -> str:
    """The commands the experiment will run, for --dry-run (nothing is loaded or written), and what its targets can
    detect."""
    from harness_ext.experiment.pilot import describe

    cfg, ft = with_in_distribution(cfg, out)
    adapter, merged = scored_model(ft, out)
    fixtures = f"build fixtures {', '.join(cfg.fixtures)} into {out / 'fixtures'}, " if cfg.fixtures else ""
    base_argv = eval_argv(cfg, cfg.model, out / "eval_base", system_prompt=ft.system_prompt)
    return "\n".join(
        [
            *("# " + block.replace("\n", "\n# ") for block in experiment_plan_blocks(cfg)),
            f"# data: {fixtures}check every suite task's data (optional tasks without it are left out)",
            describe(base_argv, cfg),
            shlex.join(base_argv),
            f"needles finetune --config {out / 'finetune.yaml'}",
            shlex.join(
                eval_argv(
                    cfg, cfg.model, out / "eval_finetuned", adapter, merged, ft.lora_r, system_prompt=ft.system_prompt
                )
            ),
        ]
    )
