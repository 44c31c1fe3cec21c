"""``needles scorecard MODEL``: the long-context report card of one model; ``needles scorecard --compare A B``: two
scorecards side by side with paired tests per length."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harness_ext.core.errors import NeedlesError

if TYPE_CHECKING:
    from harness_ext.scorecard.endpoint import Endpoint

COMPARE_FIX = "needles scorecard --compare BASE_FOLDER NEW_FOLDER (score the other model first: needles scorecard MODEL -o FOLDER)"


def _log(msg: str) -> None:
    print(f"[needles scorecard] {msg}", file=sys.stderr, flush=True)


def _rules(args: argparse.Namespace) -> list:
    from harness_ext.reporting.effective_length import default_rules

    return default_rules(args.threshold, args.relative)  # outside the scale: exit 2 before anything runs


def _card(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.finetune.modeling import resolve_model
    from harness_ext.scorecard.plan import format_cost, make_plan
    from harness_ext.scorecard.run import run_scorecard

    rules = _rules(args)
    endpoint = _endpoint(args)
    served = args.model if endpoint else resolve_model(args.model)
    plan = make_plan(args.model, served, args.budget, args.max_model_len, args.lengths, args.name, endpoint=endpoint)
    out = Path(args.output or Path("outputs") / f"scorecard-{Path(served.rstrip('/')).name}")
    check_output_dir(out, "scorecard folder")
    print(format_cost(plan, args.seconds_per_kilotoken), file=sys.stderr)
    reproduce = ["needles", "scorecard", args.model, "-o", str(out), "--budget", args.budget]
    if endpoint:  # never the key: it stays in the environment
        reproduce += ["--base-url", endpoint.base_url, "--tokenizer", endpoint.tokenizer]
    if args.max_model_len:
        reproduce += ["--max-model-len", str(args.max_model_len)]
    if args.lengths:
        reproduce += ["--lengths", *map(str, args.lengths)]
    if args.name:
        reproduce += ["--name", args.name]
    if args.dry_run:
        from harness_ext.scorecard.run import eval_argv, shell_line

        for run in plan.runs:
            print(f"# {run.family}: {run.what}\n{shell_line(eval_argv(plan, run, out.resolve(), args.on_gpu))}")
        return 0
    if endpoint:
        from harness_ext.scorecard.endpoint import check_endpoint

        served_len = check_endpoint(endpoint, plan.window)["max_model_len"]  # reachable, key, model, window
        _log(
            f"endpoint {endpoint.base_url} serves {endpoint.model}"
            + (f" (max_model_len {served_len})" if served_len else "")
        )
    card = run_scorecard(plan, out, reproduce, rules, on_gpu=args.on_gpu, log=_log)
    for e in card["effective_length"]:
        outcomes = ", ".join(f"{r['rule']} {r['outcome']}" + (f" (90% bootstrap {r['bootstrap']})" if r["bootstrap"] else "")
                             for r in e["rules"])  # fmt: skip
        print(f"{e['task']}: effective length {outcomes}")
    print(f"scorecard: {out / 'scorecard.html'} (data: scorecard.json, scorecard.csv)")
    return 0


def _endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The OpenAI-compatible endpoint of ``--base-url`` (None: vLLM serves MODEL), every option checked."""
    from harness_ext.scorecard.endpoint import make_endpoint

    if args.base_url is None:
        if args.tokenizer:
            raise NeedlesError(
                "--tokenizer is for an endpoint (--base-url)", fix="drop --tokenizer: vLLM loads MODEL's own"
            )
        return None
    if args.on_gpu:
        raise NeedlesError("--on-gpu chooses vLLM's options; an endpoint is served elsewhere", fix="drop --on-gpu")
    return make_endpoint(args.base_url, args.model, args.tokenizer)


def _compare(args: argparse.Namespace) -> int:
    from harness_ext.core.atomic_io import write_atomic, write_json_atomic
    from harness_ext.core.output_files import check_output_dir
    from harness_ext.reporting.scorecard_compare import compare, load_side, to_markdown
    from harness_ext.reporting.scorecard_compare_html import render_compare

    if len(args.compare) != 2:
        given = "one input" if len(args.compare) == 1 else f"{len(args.compare)} inputs"
        raise NeedlesError(f"--compare takes exactly two scorecards (or results), {given} given", fix=COMPARE_FIX)
    if args.model:
        raise NeedlesError("give either MODEL or --compare A B, not both", fix=COMPARE_FIX)
    if args.base_url or args.tokenizer:
        raise NeedlesError("--base-url and --tokenizer score a model; --compare reads two scorecards", fix=COMPARE_FIX)
    rules = _rules(args)
    a, b = (load_side(p, w) for p, w in zip(args.compare, ("A", "B"), strict=True))
    if a.label == b.label:
        a.label, b.label = f"A: {a.label}", f"B: {b.label}"
    out = Path(args.output or "scorecard-compare")
    check_output_dir(out, "comparison folder")
    result = compare(a, b, rules, args.alpha, args.effect, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["command"] = shlex.join(["needles", "scorecard", "--compare", *args.compare, "-o", str(out)])
    out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(result)
    write_json_atomic(out / "compare.json", result)
    write_atomic(out / "compare.md", text)
    write_atomic(out / "compare.html", render_compare(result, a, b, rules[0]))
    print(text)
    print(f"comparison: {out / 'compare.html'}")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag, used by this mode or not: a bad value is an error before anything runs."""
    if not 0 < args.alpha < 1:
        raise NeedlesError(f"--alpha {args.alpha:g} is not a significance level in (0, 1)", fix="e.g. --alpha 0.05")
    if not 0 < args.effect < 1:
        raise NeedlesError(f"--effect {args.effect:g} is not a change of accuracy in (0, 1)", fix="e.g. --effect 0.1")
    if args.seconds_per_kilotoken is not None and not args.seconds_per_kilotoken > 0:
        raise NeedlesError(
            f"--seconds-per-kilotoken {args.seconds_per_kilotoken:g} is not a positive time",
            fix="measure a run and pass its seconds per 1,000 prompt tokens, e.g. --seconds-per-kilotoken 3.5",
        )
    _rules(args)


def _scorecard(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if args.compare is not None:
        return _compare(args)
    if not args.model:
        raise NeedlesError("no model given", fix="needles scorecard MODEL (a folder, a hub id or smollm2)")
    return _card(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scorecard",
        help="the long-context report card of one model (effective length per family, curves, heatmaps, MDQA "
        "positions, loss by position, beside RULER and Lost in the Middle); --compare A B: what changed, paired per length",
        description="Score MODEL (a folder, a hub id or smollm2) through lm_eval --model vllm on a curated long-context "
        "suite at lengths up to its served window: KV retrieval (simple, multi-key), NIAH, passkey, MDQA on real "
        "NQ-Open questions, FLenQA, and the continuation loss by context length (its own call, no chat template); "
        "families whose data cannot be had are left out with the reason. Prints the cost first; "
        "rerun into the same folder to resume. Writes scorecard.html (self-contained), scorecard.json and "
        "scorecard.csv. With --base-url URL: MODEL is the name an OpenAI-compatible endpoint serves, scored through "
        "lm_eval --model local-chat-completions (key from OPENAI_API_KEY; prompts sized with --tokenizer). With "
        "--compare A B: paired tests per task and length between two scorecards, Holm, the "
        "minimal detectable effect beside every 'no significant change'. Exit 2 on invalid input.",
    )
    p.add_argument(
        "model", nargs="?", help="model folder, hub id, or smollm2 (the embedded SmolLM2-135M-Instruct); with "
        "--base-url: the model's name on the endpoint"
    )  # fmt: skip
    p.add_argument("-o", "--output", help="output folder (default outputs/scorecard-NAME; scorecard-compare)")
    p.add_argument(
        "--budget", default="default", help="tiny, small, default or full: samples per cell (default: default)"
    )
    p.add_argument("--lengths", type=int, nargs="+", help="input lengths instead of the budget's ladder")
    p.add_argument("--name", help="how the page names the model (default: the folder's or hub id's last part)")
    p.add_argument(
        "--max-model-len", type=int, help="serve (and score) at this window instead of the model's own; with "
        "--base-url: the window the endpoint serves (default: the tokenizer folder's config.json)"
    )  # fmt: skip
    p.add_argument("--threshold", type=float, default=85.6, help="RULER threshold, 0-100 scale (default 85.6)")
    p.add_argument("--relative", type=float, default=0.9, help="relative rule: fraction of the shortest-length score")
    p.add_argument("--on-gpu", action="store_true", help="vLLM's GPU options instead of the CPU engine's")
    p.add_argument(
        "--base-url", help="an OpenAI-compatible endpoint instead of vLLM: its base URL, e.g. http://localhost:8000/v1 "
        "(the API key is read from OPENAI_API_KEY, never a flag)"
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", help="--base-url: the served model's tokenizer (folder or downloaded hub id) that sizes every "
        "prompt; default MODEL when it is a local folder"
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the cost estimate and the commands, run nothing")
    p.add_argument(
        "--seconds-per-kilotoken", type=float, help="your machine's measured prefill cost, for a time estimate"
    )
    p.add_argument("--compare", nargs="+", metavar="RUN", help="two scorecard folders (or lm-eval results): A B")
    p.add_argument("--alpha", type=float, default=0.05, help="--compare: family-wise two-sided level (default 0.05)")
    p.add_argument(
        "--effect", type=float, default=0.10, help="--compare: the change to detect, for the MDE marks (0.10)"
    )
    p.set_defaults(func=_scorecard)
