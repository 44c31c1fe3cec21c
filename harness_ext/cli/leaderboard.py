"""``needles leaderboard``: lm-eval outputs -> tidy CSV (upsert), wide pivot, Markdown, HTML and PNG plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_rule_flags(p: argparse.ArgumentParser) -> None:
    """``--threshold`` and ``--relative``: the effective-length rules (harness_ext.reporting.effective_length)."""
    p.add_argument("--threshold", type=float, default=85.6,
                   help="RULER rule: effective length = longest length whose score and every shorter one's is above "
                   "this, on the 0-100 scale (results hold fractions 0-1 and are compared as percentages); "
                   "default 85.6, RULER's (Llama-2-7B-chat at 4K)")  # fmt: skip
    p.add_argument("--relative", type=float, default=0.9,
                   help="relative rule: above this fraction of the model's own score at its shortest length "
                   "(default 0.9)")  # fmt: skip


def rules_from_args(args: argparse.Namespace) -> list:
    """The checked rules (a threshold outside the scale is a user error: exit 2, naming the fix)."""
    from harness_ext.reporting.effective_length import default_rules

    return default_rules(args.threshold, args.relative)


def _leaderboard(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output, write_output
    from harness_ext.reporting import leaderboard as lb
    from harness_ext.reporting.plots import all_plots, length_plot
    from harness_ext.reporting.plots import available as plots_available

    checked = rules_from_args(args)  # even without --effective-length: a bad value is an error, used or not
    rules = checked if args.effective_length else None

    for path, what in ((args.output, "leaderboard CSV"), (args.pivot, "pivot CSV"), (args.markdown, "Markdown report"),
                       (args.html, "HTML report")):  # fmt: skip
        check_output(path, what)
    if args.plots_dir:
        check_output(Path(args.plots_dir) / "plot.png", "plot")
    if args.output:
        rows, changed = lb.export(args.inputs, Path(args.output), args.model_name, args.adapter_name, rules)
        print(f"{args.output}: {len(rows)} rows ({changed} added or changed)", file=sys.stderr)
    else:
        rows = lb.collect_rows(args.inputs, args.model_name, args.adapter_name, rules)
    if not rows:
        print("warning: no numeric metrics found in the inputs", file=sys.stderr)
    if args.pivot:
        write_output(args.pivot, lb.pivot_csv_text(rows), "pivot CSV")
    if args.markdown:
        text = lb.render_markdown(rows, args.title)
        sys.stdout.write(text) if args.markdown == "-" else write_output(args.markdown, text, "Markdown report")
    if args.html and not args.plots_dir and not plots_available():
        print("warning: matplotlib is not installed; the HTML page has no plots", file=sys.stderr)
        plots = {}
    else:
        plots = all_plots(rows) if (args.plots_dir or args.html) else {}
        if rules and (args.plots_dir or args.html):
            png = length_plot(rows, rules[0])
            if png is not None:
                plots["length"] = png
    if args.plots_dir:
        for name, png in plots.items():
            write_output(Path(args.plots_dir) / f"{name}.png", png, "plot")
    if args.html:
        write_output(args.html, lb.render_html(rows, args.title, plots), "HTML report")
    if not any((args.output, args.pivot, args.markdown, args.html, args.plots_dir)):
        sys.stdout.write(lb.to_csv_text(rows))  # no target: the tidy CSV goes to stdout
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "leaderboard",
        help="export lm-eval results to a tidy leaderboard CSV and render views",
        description="Read lm-eval output folders / results_*.json files (and leaderboard CSVs, e.g. the reference "
        "leaderboards in leaderboards/) and write a tidy long CSV, upserting into --output. Views: --pivot "
        "(wide CSV), --markdown, --html (self-contained page with plots), --plots-dir (PNG files).",
    )
    p.add_argument("inputs", nargs="+", help="lm-eval --output_path folders, results_*.json files or leaderboard CSVs")
    p.add_argument("-o", "--output", help="tidy CSV to create or upsert into (written atomically)")
    p.add_argument("--pivot", help="write the wide pivot (models x task/metric/length/position) as CSV")
    p.add_argument("--markdown", help="write a Markdown report ('-' for stdout)")
    p.add_argument("--html", help="write a self-contained HTML report")
    p.add_argument("--plots-dir", help="write PNG plots (mdqa.png, kv.png, niah.png, flenqa.png, as the data allows)")
    p.add_argument("--model-name", help="model name for runs (default: last path component of pretrained=)")
    p.add_argument("--adapter-name", help="adapter name for runs (default: from lora_local_path= / peft=)")
    p.add_argument("--title", default="lm-eval-needles leaderboard")
    p.add_argument("--effective-length", action="store_true",
                   help="add effective_length rows (RULER rule and relative rule, with a bootstrap over documents "
                   "where sample logs exist) and wavg_inc / wavg_dec rows from each run's length breakdown, and the "
                   "score-by-length plot (length.png); exit 2 when no input has a length breakdown")  # fmt: skip
    add_rule_flags(p)
    p.set_defaults(func=_leaderboard)
