"""The plan of ``needles study``: its steps, their dependencies, and the two executors that run them.

Every step is the command ``needles study OUT/study.yaml -o OUT --step NAME``: independent (it reads only its
prerequisites' markers and outputs), resumable (a finished step has its marker ``OUT/steps/NAME.json``; a
half-done one is redone from a clean folder, finetuning continuing from its checkpoints) and recorded in
``OUT/plan.json`` with its prerequisites, its resource request and the tool command it runs, so any
scheduler can run the study. Two are built in: ``local`` runs the steps one after another in this process;
``ray`` submits each unfinished step as a Ray task with its resource request (a GPU per model step with
``on_gpu``), its prerequisites' results passed as arguments so that Ray runs it after them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from harness_ext.core.errors import NeedlesError
from harness_ext.study import steps as st
from harness_ext.study.config import BASE, StudyConfig, plain
from harness_ext.study.in_distribution import plan_checks
from harness_ext.workflow.steps import Step, StepRunner

MODEL_STEPS = ("finetune", "eval", "heads", "knockout", "patch")  # steps that load a model (a GPU under Ray)


@dataclass
class PlannedStep:
    name: str  # KIND or KIND:RUN
    depends: list[str] = field(default_factory=list)
    folder: Path | None = None
    keep_partial: bool = False

    @property
    def kind(self) -> str:
        return self.name.partition(":")[0]

    @property
    def run(self) -> str:
        return self.name.partition(":")[2]


def plan_steps(study: st.Study) -> list[PlannedStep]:
    """Every step in an order that respects the dependencies (the order the local executor runs them in)."""
    runs = list(study.runs.values())
    # the base model without adapter, scored like every run: the report's "vs base" pairs each run with it
    steps: list[PlannedStep] = [PlannedStep(f"eval:{BASE}", [], study.folder(BASE, "eval"))]
    for r in runs:
        f = study.folder
        steps += [
            PlannedStep(f"finetune:{r.name}", [], f(r.name, "finetune"), keep_partial=True),
            PlannedStep(f"eval:{r.name}", [f"finetune:{r.name}"], f(r.name, "eval")),
        ]
        if study.cfg.head_steps:
            steps.append(PlannedStep(f"heads:{r.name}", [f"finetune:{r.name}"], f(r.name, "heads")))
    if not study.cfg.head_steps:  # `heads: false`: the finetunes scored against base and the reference only
        return [*steps, PlannedStep("report", [s.name for s in steps])]
    for r in runs:
        steps.append(PlannedStep(f"knockout:{r.name}", [f"heads:{r.name}"], study.folder(r.name, "knockout")))
        if not r.is_reference:
            pair = [f"heads:{r.reference}", f"heads:{r.name}"]
            steps.append(PlannedStep(f"recall:{r.name}", pair, study.folder(r.name, "recall")))
            steps.append(PlannedStep(f"patch:{r.name}", pair, study.folder(r.name, "patch")))
    others = [r.name for r in runs if not r.is_reference]
    steps.append(PlannedStep("correlation", [f"eval:{r}" for r in others] + [f"recall:{r}" for r in others]))
    steps.append(PlannedStep("report", [s.name for s in steps]))
    return steps


def tool_command(study: st.Study, step: PlannedStep) -> str:
    """The command a step runs (patching: with every configured set; an empty set is left out when it runs)."""
    kind, run = step.kind, step.run
    if kind == "finetune":
        return f"needles finetune --config {study.folder(run, 'finetune.yaml')}"
    argv = {
        "eval": lambda: st.eval_argv(study, run),
        "heads": lambda: ["needles", *st.heads_argv(study, run)],
        "recall": lambda: ["needles", *st.compare_argv(study, run)],
        "knockout": lambda: ["needles", *st.knockout_argv(study, run)],
        "patch": lambda: ["needles", *st.patch_argv(study, run, st.patch_sets(study))],
    }.get(kind)
    return shlex.join(argv()) if argv else f"(in process: {kind} across the runs)"


def step_argv(study: st.Study, name: str) -> list[str]:
    return ["needles", "study", str(study.out / "study.yaml"), "-o", str(study.out), "--step", name]


def resources(study: st.Study, step: PlannedStep) -> dict:
    gpus = 1 if study.cfg.on_gpu and step.kind in MODEL_STEPS else 0
    return {"num_cpus": 1, "num_gpus": gpus}


def prepare(
    cfg: StudyConfig, out: Path, needles: Callable[[list[str]], int], log: Callable[[str], None], write: bool = True
) -> tuple[st.Study, list[PlannedStep]]:
    """Check everything a step will need (finetune configs, K against the model's heads, a folder holding
    another study), then, with ``write``, record study.yaml, each run's finetune.yaml and plan.json."""
    import yaml

    from harness_ext.core.atomic_io import write_atomic
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.finetune.modeling import resolve_model
    from harness_ext.study.context import check_context
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask
    from harness_ext.workflow.training import finetune_config

    out = Path(out).expanduser().resolve()
    check_output_dir(out, "study folder")
    base = resolve_model(cfg.model)
    if Path(cfg.model).exists():  # a local folder: steps run elsewhere (Ray workers) must find it too
        cfg = dataclasses.replace(cfg, model=base)
    _check_k(cfg, base)
    check_data(cfg)
    runs = st.make_runs(cfg)
    suite = [SuiteTask(t.task, "target", t.metric, filter=t.filter, label=t.name) for t in cfg.targets]
    fts = {}
    for name, r in runs.items():
        exp = ExperimentConfig(name, cfg.model, suite, st.merged_finetune(cfg, r), cfg.metadata)
        try:
            fts[name] = finetune_config(exp, out / "runs" / name)
        except NeedlesError as exc:  # say which variant's finetune settings are wrong
            raise NeedlesError(
                f"study config: variant {r.variant.name} (finetune): {exc.problem}", fix=exc.fix
            ) from None
    cfg, checks, fts = plan_checks(cfg, runs, fts, out)  # each run's held-out task of its own training family
    check_context(cfg, fts, base)  # an adapter trained with another RoPE is never scored on the unscaled base
    study = st.Study(cfg, out, base, runs, fts, needles, log, in_distribution=checks)
    steps = plan_steps(study)
    text = yaml.safe_dump(plain(cfg), sort_keys=False)
    saved = out / "study.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) != yaml.safe_load(text):
        raise NeedlesError(
            f"{out} holds a study of another config ({saved})",
            fix=f"use a new output folder, or delete {out} to start this study over",
        )
    if write:
        write_atomic(saved, text)
        for name, ft in fts.items():
            write_atomic(out / "runs" / name / "finetune.yaml", yaml.safe_dump(dataclasses.asdict(ft), sort_keys=False))
        StepRunner(out, log).write_plan(
            [Step(s.name, step_argv(study, s.name), dict, s.folder) for s in steps],
            {
                "name": cfg.name,
                "model": base,
                "config": str(saved),
                "reference_variant": cfg.reference_variant,
                "runs": {
                    n: {"variant": r.variant.name, "seed": r.seed, "reference": r.reference} for n, r in runs.items()
                },
                "depends_on": {s.name: s.depends for s in steps},
                "resources": {s.name: resources(study, s) for s in steps},
                "tools": {s.name: tool_command(study, s) for s in steps},
            },
        )
    return study, steps


def _check_k(cfg: StudyConfig, base: str) -> None:
    """K random heads must fit outside the top K: refused here rather than after the finetunes."""
    import json

    config = Path(base) / "config.json"
    if not cfg.head_steps or not config.is_file():
        return
    c = json.loads(config.read_text(encoding="utf-8"))
    total = int(c.get("num_hidden_layers", 0)) * int(c.get("num_attention_heads", 0))
    if total and 2 * cfg.k > total:
        raise NeedlesError(
            f"study config: k {cfg.k} is too large for {Path(base).name} ({total} heads: knockout draws random-K "
            "outside the top K)",
            fix=f"set k: {total // 2} or lower",
        )


# ----------------------------------------------------------------------------------- running steps
def work(study: st.Study, step: PlannedStep, runner: StepRunner) -> Callable[[], dict]:
    kind, run = step.kind, step.run
    if kind == "correlation":
        return lambda: _write(study, "correlation/correlation.json", st.correlation(study, _outputs(runner, step)))
    if kind == "report":
        from harness_ext.study.report import write_report

        return lambda: write_report(study, _outputs(runner, step))
    fn = {
        "finetune": st.finetune_run,
        "eval": st.eval_run,
        "heads": st.heads_run,
        "recall": st.recall_run,
        "knockout": st.knockout_run,
        "patch": st.patch_run,
    }[kind]
    return lambda: fn(study, run)


def _outputs(runner: StepRunner, step: PlannedStep) -> dict[str, dict]:
    return {d: runner.done(d)["outputs"] for d in step.depends}


def _write(study: st.Study, rel: str, data: dict) -> dict:
    from harness_ext.core.atomic_io import write_json_atomic

    write_json_atomic(study.out / rel, data)
    return {**data, "file": rel}


def run_step(study: st.Study, steps: list[PlannedStep], name: str) -> dict:
    """Run one step (skipped when its marker exists); its prerequisites must have finished."""
    by_name = {s.name: s for s in steps}
    if name not in by_name:
        raise NeedlesError(f"the study has no step {name!r}", fix=f"use one of: {', '.join(by_name)}")
    step = by_name[name]
    runner = StepRunner(study.out, study.log)
    missing = [d for d in step.depends if runner.done(d) is None]
    if missing:
        raise NeedlesError(f"step {name} needs {', '.join(missing)} first", fix="run those steps (see plan.json)")
    planned = Step(name, step_argv(study, name), work(study, step, runner), step.folder, keep_partial=step.keep_partial)
    # numbered within the whole plan ("5/14 knockout:real"), also when a Ray task runs this one step
    return runner.run([planned], first=steps.index(step) + 1, total=len(steps))[name]


def log_mde(study: st.Study) -> None:
    """Before a whole study runs: what each target's "vs base" test, and each in-distribution check, can detect at
    its n."""
    from harness_ext.workflow.mde import study_plan_blocks

    for block in study_plan_blocks(study.cfg, len(study.runs), study.in_distribution):
        study.log(block)


def run_local(study: st.Study, steps: list[PlannedStep]) -> None:
    log_mde(study)
    for step in steps:
        run_step(study, steps, step.name)


def run_ray(study: st.Study, steps: list[PlannedStep], task: Callable) -> None:
    """Each unfinished step as a Ray task running its own ``needles study ... --step NAME``; a prerequisite's
    result is an argument of the task, so Ray starts it only after that step finished. Connects to the Ray
    of RAY_ADDRESS or of ``ray start`` when there is one, else starts a local one (and stops it after)."""
    try:
        import ray
    except ImportError:
        raise NeedlesError("--executor ray needs Ray", fix="pip install 'lm-eval-needles[ray]' (or ray)") from None
    log_mde(study)
    runner = StepRunner(study.out, study.log)
    pending = []
    for step in steps:
        if runner.done(step.name) is not None:
            run_step(study, steps, step.name)  # logs "done before, skipped"
        else:
            pending.append(step)
    if not pending:
        return
    started = not ray.is_initialized()
    if started:
        keep = ("NEEDLES_", "HF_", "TRANSFORMERS_", "VLLM_", "TOKENIZERS_", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")
        env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
        # a relative data path (NEEDLES_SHARED_DATA=../shared/data) must not depend on a worker's folder
        env |= {k: str(Path(v).resolve()) for k, v in env.items() if k.startswith("NEEDLES_") and Path(v).exists()}
        ray.init(runtime_env={"env_vars": env}, include_dashboard=False, logging_level="WARNING")
    remote = ray.remote(task)
    refs: dict[str, object] = {}
    try:
        for step in pending:
            deps = [refs[d] for d in step.depends if d in refs]
            opts = resources(study, step)
            study.log(f"ray: {step.name} submitted ({opts})")
            refs[step.name] = remote.options(name=step.name, max_retries=0, **opts).remote(
                step_argv(study, step.name), *deps
            )
        for name, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise NeedlesError(
                    f"step {name} failed under Ray: {str(exc).strip().splitlines()[-1]}",
                    fix=f"read its log in {study.out} and run `{shlex.join(step_argv(study, name))}` to see it",
                ) from None
    finally:
        if started:
            ray.shutdown()


def qa_needs(cfg: StudyConfig) -> list[tuple[str, str, dict]]:
    """(what, task, metadata) of the musique / summhay head probes and knockout / patching items."""
    from harness_ext.heads.probes_qa import PROBE_DEFAULTS, QA_PROBES

    tasks = {"musique": "musique", "summhay": "summhay_citation"}
    if not cfg.head_steps:
        return []
    out = [
        (f"heads probes {p}", tasks[p], {**PROBE_DEFAULTS[p], **cfg.heads.get("qa_metadata", {})})
        for p in QA_PROBES
        if p in cfg.heads.get("probes", [])
    ]
    for section in ("knockout", "patching"):
        options = getattr(cfg, section)
        if options.get("task") in QA_PROBES:
            out.append((f"{section} task", tasks[options["task"]], options.get("qa_metadata", {})))
    return out


def check_data(cfg: StudyConfig) -> None:
    """The files every target and every head probe reads (a mirror, the cache or a verified download), checked in
    seconds before anything slow: a study should not stop at its first detection step for want of a file."""
    from harness_ext.heads.defaults import DEFAULT_MDQA, shared_needles
    from harness_ext.workflow.data_step import unavailable

    def fail(what: str, exc: NeedlesError) -> NoReturn:
        raise NeedlesError(f"study config: {what}: {exc.problem}", fix=exc.fix) from None

    for t in cfg.targets:
        if (problem := unavailable(t.task, cfg.metadata, {})) is not None:
            fail(f"target {t.task}", problem)
    if not cfg.head_steps:
        return
    probes = cfg.heads.get("probes", ["niah", "kv"])
    needs = [("heads probes mdqa", "mdqa_sweep", {**DEFAULT_MDQA, **cfg.heads.get("mdqa_metadata", {})})]
    needs = [n for n in needs if "mdqa" in probes]
    needs += [(f"heads probes {p}", "synth_mdqa_" + p.split(":", 1)[1], cfg.metadata) for p in probes if ":" in p]
    needs += qa_needs(cfg)
    for what, task, metadata in needs:
        if (problem := unavailable(task, metadata, {})) is not None:
            fail(what, problem)
    for section in ("heads", "knockout", "patching"):
        options = getattr(cfg, section)
        uses_needles = "niah" in probes if section == "heads" else options.get("task") == "niah"
        if not uses_needles:
            continue
        if options.get("needles"):
            if not Path(options["needles"]).is_file():
                fail(
                    f"{section}.needles", NeedlesError(f"{options['needles']} does not exist", fix="give a JSONL file")
                )
            continue
        try:
            path = shared_needles()
        except NeedlesError as exc:
            fail(f"{section} (niah needles)", exc)
        if not path.is_file():
            fail(f"{section} (niah needles)", NeedlesError(f"{path} does not exist", fix=f"set {section}.needles"))
