"""``needles experiment CONFIG.yaml``: the paper's claim as one command (transfer + no regression), resumable."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _experiment(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.experiment.config import load_experiment
    from harness_ext.experiment.extension.run import describe, estimate_text, run
    from harness_ext.workflow.training import finetune_config

    cfg = load_experiment(args.config)
    out = Path(args.output or Path("outputs") / cfg.name)
    check_output_dir(out, "experiment folder")
    # a finetune with a context section past the native window runs the three-variant extension experiment
    print(estimate_text(cfg, finetune_config(cfg, out)), file=sys.stderr)
    if args.dry_run:
        print(describe(cfg, out))
        return 0
    comparison = run(cfg, out, config_path=str(args.config), skip_pilot_check=args.skip_pilot_check)
    print((out / "comparison.md").read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps(comparison, indent=2))
    return 0 if comparison["claim_holds"] else 1


def _pilot_help() -> str:
    from harness_ext.workflow.pilot import SKIP_HELP

    return SKIP_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="base -> finetune -> finetuned on a suite of targets and guards; paired verdict (exit 0 holds, 1 not, 2 bad input)",
        description="Score the base model on the suite (lm_eval --model vllm), finetune it, score the finetuned model "
        "on the same documents, and test every suite task paired: targets must improve, guards must not drop by more "
        "than their margin (Holm across the suite). Finished steps are skipped when rerun into the same folder. "
        "Exit 0: the claim holds; 1: it does not; 2: invalid input. Examples: examples/experiments/*.yaml.",
    )
    p.add_argument("config", help="experiment YAML (see examples/experiments/)")
    p.add_argument("-o", "--output", help="output folder (default outputs/NAME); rerun into it to resume")
    p.add_argument("--dry-run", action="store_true", help="print the cost estimate and the commands, run nothing")
    p.add_argument("--json", action="store_true", help="also print the comparison as JSON")
    p.add_argument("--skip-pilot-check", action="store_true", help=_pilot_help())
    p.set_defaults(func=_experiment)
