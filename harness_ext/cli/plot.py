"""``needles plot {mdqa,kv,niah,passkey,flenqa,loss,length} RESULTS... -o out.png``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from harness_ext.cli.leaderboard import add_rule_flags, rules_from_args
from harness_ext.core.errors import NeedlesError

_WHAT = {
    "mdqa": "MDQA per-position results (tasks mdqa<N>_pos<P>, or <metric>_pos<P> keys; baselines mdqa_closedbook)",
    "kv": "KV-retrieval length x depth breakdowns (<metric>_len<N>_depth<F> keys)",
    "niah": "NIAH length x depth breakdowns (tasks niah*, <metric>_len<N>_depth<F> keys)",
    "passkey": "passkey length x depth breakdowns (task needles_passkey, passkey_acc_len<N>_depth<F> keys)",
    "loss": "continuation loss by context length (task needles_long_ppl, nll_len<P> / ppl_len<P> keys)",
    "flenqa": "FLenQA length breakdowns (tasks flenqa_monorel/pir/ruletaker, <metric>_ctx<N> or _len<N> keys)",
    "length": "score by input length per family (any length breakdown: our tasks, lm-eval ruler, babilong runs), "
    "with the effective-length threshold, each model's effective length and its native window",
}


def _plot(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output, write_output
    from harness_ext.reporting import plots
    from harness_ext.reporting.leaderboard import collect_rows
    from harness_ext.tasklib import breakdowns as names

    check_output(args.output, "plot")
    rules_from_args(args)  # bad --threshold / --relative / --native are refused for every kind, used or not
    if args.native is not None and args.native <= 0:
        raise NeedlesError(f"--native {args.native} is not a context length", fix="give the window in tokens")
    if args.kind == "length":
        return _length(args)
    rows = collect_rows(args.inputs)
    default = {
        "mdqa": names.MDQA_METRIC,
        "kv": names.KV_METRIC,
        "niah": names.NIAH_METRIC,
        "passkey": names.PASSKEY_METRIC,
        "flenqa": names.FLENQA_METRIC,
        "loss": names.LOSS_METRICS[0],
    }[args.kind]
    metric = args.metric or default
    png = plots.PLOTS[args.kind](rows, metric, args.filter)
    if png is None:
        found = sorted({f"{r['task']}:{r['metric']}" for r in rows})
        raise NeedlesError(
            f"nothing to plot: the inputs hold no {_WHAT[args.kind]} for metric {metric!r}; "
            f"found {found[:12]}{' ...' if len(found) > 12 else ''}",
            fix="pass the right results, or choose --metric",
        )
    write_output(args.output, png, "plot")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _length(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import write_output
    from harness_ext.reporting import plots
    from harness_ext.reporting.leaderboard import collect_rows
    from harness_ext.reporting.length_curves import require_curves

    rule = rules_from_args(args)[0]
    rows = collect_rows(args.inputs)
    native = {label: args.native for label in {r["model"] + (f" + {r['adapter']}" if r["adapter"] else "")
                                               for r in rows}} if args.native else None  # fmt: skip
    png = plots.length_plot(rows, rule, native, [args.metric] if args.metric else None)
    if png is None:
        require_curves([], rows, "nothing to plot")
    write_output(args.output, png, "plot")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="plot accuracy by position (MDQA), length x depth (KV, NIAH, passkey), length (FLenQA) "
        "or loss by context length",
    )
    p.add_argument("kind", choices=sorted(_WHAT), help="; ".join(f"{k}: {v}" for k, v in _WHAT.items()))
    p.add_argument("inputs", nargs="+", help="lm-eval output folders, results_*.json files or leaderboard CSVs")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument(
        "--metric", help="metric to plot (default: best_subspan_em / both_acc / niah_success / passkey_acc / acc / nll)"
    )
    p.add_argument("--filter", help="lm-eval filter to plot (default: none, else the first one)")
    p.add_argument("--native", type=int, help="length: the models' native context window in tokens (default: "
                   "max_model_len / max_length of the run's model_args, or a claimed_length row)")  # fmt: skip
    add_rule_flags(p)
    p.set_defaults(func=_plot)
