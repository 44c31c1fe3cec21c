"""``needles gate``: exit 0 (pass), 1 (significant regression) or 2 (invalid or incomparable input)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _gate(args: argparse.Namespace) -> int:
    from harness_ext.cli.leaderboard import rules_from_args
    from harness_ext.core.output_files import append_output, check_output, write_output
    from harness_ext.reporting import gate

    rules_from_args(args)  # a threshold outside the scale is refused before anything is read, used or not
    check_output(args.summary, "gate summary")
    check_output(args.report, "gate report")

    config = gate.GateConfig(
        alpha=args.alpha,
        max_drop=args.max_drop,
        power=args.power,
        metrics=args.metrics,
        tasks=args.tasks,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
        paired=not args.unpaired,
        effective_length=args.effective_length,
        threshold=args.threshold,
        relative=args.relative,
    )
    report = gate.run_gate(args.baseline, args.candidate, config)
    sys.stdout.write(gate.to_text(report))
    markdown = gate.to_markdown(report)
    if args.summary:
        write_output(args.summary, markdown, "gate summary")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:  # GitHub's contract: append, never overwrite
        append_output(step_summary, markdown + "\n", "$GITHUB_STEP_SUMMARY file")
    if args.report:
        write_output(args.report, gate.to_json_text(report), "gate report")
    return report.exit_code


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gate",
        help="fail when a candidate run is significantly worse than a baseline run",
        description="Pair the per-sample results of two lm-eval runs (--log_samples) on (task, doc_id) and test "
        "each gated metric one-sided: exact McNemar for 0/1 metrics, paired bootstrap otherwise, Holm across "
        "metrics. Exit 0 pass, 1 regression, 2 invalid or incomparable input.",
    )
    p.add_argument("--baseline", required=True, help="results_*.json or the folder holding exactly one")
    p.add_argument("--candidate", required=True, help="results_*.json or the folder holding exactly one")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise one-sided significance level (default 0.05)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.0,
        help="practical margin in metric units (0.02 = 2 points): smaller drops never fail the gate",
    )
    p.add_argument("--power", type=float, default=0.8, help="power for the reported minimum detectable effect")
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="PATTERN",
        help="metrics to gate (glob, e.g. value_acc 'both_acc_len*'); default: each task's overall metrics",
    )
    p.add_argument(
        "--tasks", nargs="+", help="gate only these tasks (default: all; both runs must have the same tasks)"
    )
    p.add_argument("--bootstrap-iters", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (the gate is deterministic)")
    p.add_argument("--unpaired", action="store_true", help="ignore sample logs and use the unpaired z-test")
    p.add_argument("--effective-length", action="store_true",
                   help="also fail (exit 1) when the candidate's effective context length is shorter than the "
                   "baseline's under the RULER rule (--threshold) on any task or group with a length breakdown; "
                   "exit 2 when a run has none")  # fmt: skip
    p.add_argument("--threshold", type=float, default=85.6,
                   help="effective-length threshold on the 0-100 scale (default 85.6, RULER's)")  # fmt: skip
    p.add_argument("--relative", type=float,
                   help="also require the relative rule (above this fraction of the run's shortest-length score) "
                   "not to shrink")  # fmt: skip
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--summary", help="write the Markdown summary here (also appended to $GITHUB_STEP_SUMMARY)")
    p.set_defaults(func=_gate)
