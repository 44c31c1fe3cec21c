"""``needles study CONFIG.yaml``: why synthetic data transfers (Zhao, Yin, Durrett 2025) as one resumable command:
finetune each variant, score it, detect its retrieval heads, compare them with the real-data variant's, correlate
recall with score, knock heads out and patch them in; report. Steps run locally or as Ray tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[needles study] {msg}", file=sys.stderr, flush=True)


def _needles(argv: list[str]) -> int:
    """A `needles` command run in this process (the study's head steps use the commands themselves)."""
    from harness_ext.cli.app import main

    return main(argv)


def ray_step(argv: list[str], *prerequisites: object) -> int:
    """A Ray task: one study step, ``needles study ... --step NAME``, in the worker (prerequisites are the
    results of the steps it needs: Ray passes them only once those finished)."""
    code = _needles(argv[1:])
    if code != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {code}")
    return code


def _study(args: argparse.Namespace) -> int:
    from harness_ext.core.errors import NeedlesError
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.study import pilot as study_pilot
    from harness_ext.study import plan as study_plan
    from harness_ext.study.config import load_study

    if args.output:
        check_output_dir(Path(args.output), "study folder (-o/--output)")
    cfg = load_study(args.config)
    out = Path(args.output or Path("outputs") / cfg.name)
    executor = args.executor or cfg.executor
    if args.step and args.dry_run:
        raise NeedlesError("--step and --dry-run together", fix="drop one of them")
    study, steps = study_plan.prepare(cfg, out, _needles, _log, write=not args.dry_run)
    if args.dry_run:
        from harness_ext.study.cost import estimate, format_study_cost

        print(format_study_cost(estimate(study)), file=sys.stderr)  # stdout: the steps, one command each
        study_plan.log_mde(study)  # what the targets can detect at this n: the point of planning before running
        _log(study_pilot.describe(study, args.skip_pilot_check))
        for s in steps:
            deps = f"  (after {', '.join(s.depends)})" if s.depends and s.kind != "report" else ""
            print(f"# {s.name}{deps}\n{study_plan.tool_command(study, s)}")
        return 0
    if args.step:
        study_plan.run_step(study, steps, args.step)
        return 0
    study_pilot.run_pilot(study, args.skip_pilot_check, len(steps))  # before the first finetune
    if executor == "ray":
        study_plan.run_ray(study, steps, ray_step)
    else:
        study_plan.run_local(study, steps)
    print((study.out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {study.out / 'report.json'}, {study.out / 'report.md'}, {study.out / 'plots'}")
    return 0


def _pilot_help() -> str:
    from harness_ext.workflow.pilot import SKIP_HELP

    return SKIP_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="finetune variants, score them, detect/compare/knock out/patch retrieval heads; report (Zhao et al.)",
        description="Why synthetic data transfers, as one command: finetune every variant of the config (cells of "
        "the data-family grid and the real-data baseline), score each (and the base model) on the targets (lm_eval), detect its "
        "retrieval heads, compare them with the reference variant's (recall, Jaccard, Spearman), correlate recall "
        "with score across variants (bootstrap interval), knock out top-K vs random-K heads, patch intersection / "
        "complement / random heads from the reference into each synthetic variant; report (JSON, Markdown, plots). "
        "Every step is a resumable command listed in OUT/plan.json; rerun into the same folder to resume. "
        "See docs/study.md.",
    )
    p.add_argument("config", help="study YAML (see docs/study.md)")
    p.add_argument("-o", "--output", help="study folder (default outputs/NAME); rerun into it to resume")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="local: the steps one after another here (default, or the config's executor); ray: each step a Ray task",
    )
    p.add_argument("--dry-run", action="store_true", help="print every step and its command; run nothing")
    p.add_argument("--step", help="run this one step of the plan (how a scheduler runs them; see plan.json)")
    p.add_argument("--skip-pilot-check", action="store_true", help=_pilot_help())
    p.set_defaults(func=_study)
