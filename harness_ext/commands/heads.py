"""`needles heads`: retrieval-head scores, heatmap, knockout; `needles heads compare A.json B.json`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_NEEDLES = "retrieval-head/needles.jsonl"
DEFAULT_THRESHOLD = 0.1  # = harness_ext.heads.DEFAULT_THRESHOLD; not imported so `needles --help` needs no torch
DEFAULT_MDQA = {"mdqa_num_documents": 10, "mdqa_positions": [1, 5, 10], "mdqa_num_questions": 4}


def _shared_needles() -> Path:
    import os

    root = Path(os.environ.get("NEEDLES_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    return root / DEFAULT_NEEDLES


def _model_path(name: str) -> str:
    if name == "smollm2":
        from harness_ext.models import smollm2_path

        return str(smollm2_path())
    return name


def _settings(args: argparse.Namespace) -> dict:
    """Everything that determines the probes and the decoding (recorded in the JSON)."""
    out = {"probes": sorted(args.probes), "extra_tokens": args.extra_tokens, "seed": args.seed}
    if "niah" in args.probes:
        out["niah"] = {"needles": str(args.needles), "lengths": args.lengths, "depths": args.depths}
    if "kv" in args.probes:
        out["kv"] = {
            "lengths": args.kv_lengths,
            "depths": args.kv_depths,
            "num_samples": args.kv_samples,
            "seed": args.kv_seed,
            "answer_template": args.kv_answer_template,
        }
    if "mdqa" in args.probes:
        out["mdqa"] = _mdqa_metadata(args)
    return out


def _mdqa_metadata(args: argparse.Namespace) -> dict:
    meta = dict(DEFAULT_MDQA)
    if args.mdqa_metadata:
        meta.update(json.loads(args.mdqa_metadata))
    return meta


def _build_probes(lm, args: argparse.Namespace) -> list:
    from harness_ext import heads_probes as hp

    probes = []
    if "niah" in args.probes:
        needles = hp.load_needles(args.needles)
        probes += hp.niah_probes(lm.tokenizer, needles, args.lengths, args.depths, lm.chat, args.seed)
    if "kv" in args.probes:
        docs = hp.kv_docs(
            lm.tokenizer,
            args.kv_lengths,
            args.kv_depths,
            args.kv_samples,
            args.kv_seed,
            answer_template=args.kv_answer_template,
        )
        probes += hp.kv_probes(lm.tokenizer, docs, lm.chat)
    if "mdqa" in args.probes:
        probes += hp.mdqa_probes(lm.tokenizer, hp.mdqa_docs(_mdqa_metadata(args)), lm.chat)
    return probes


def _detect(lm, args: argparse.Namespace, out_dir: Path) -> dict:
    from harness_ext import heads
    from harness_ext.errors import NeedlesError

    probes = _build_probes(lm, args)
    t0 = time.time()
    results = heads.detect(lm, probes, extra_tokens=args.extra_tokens, progress=not args.quiet)
    from harness_ext.atomic_io import write_atomic

    report = heads.build_report(lm, results, _settings(args), args.threshold)
    heads.write_json_atomic(out_dir / "heads.json", report)
    try:
        heads.write_heatmap(report, out_dir / "heads.png")
    except NeedlesError as exc:  # the scores are written; only the picture is missing
        print(f"[needles heads] no heatmap: {exc.problem} ({exc.fix})", file=sys.stderr)
    write_atomic(out_dir / "retrieval_heads.txt", heads.format_heads(report) + "\n")
    print(f"[needles heads] {len(probes)} probes in {time.time() - t0:.0f} s", file=sys.stderr)
    return report


def _run(args: argparse.Namespace) -> int:
    from harness_ext import heads
    from harness_ext.errors import NeedlesError

    out_dir = Path(args.output_dir)
    specs = _knockout_specs(args)
    if args.scores and not specs:
        raise NeedlesError(
            "--scores without --knockout has nothing to do",
            fix="add --knockout top:K (or drop --scores to detect heads)",
        )
    lm = heads.load_model(_model_path(args.model), args.adapter, args.dtype, args.chat_template)
    if args.scores:
        report = heads.load_report(args.scores)
    else:
        report = _detect(lm, args, out_dir)
        print(heads.format_heads(report, limit=20))
        print(f"wrote {out_dir / 'heads.json'}, {out_dir / 'heads.png'}, {out_dir / 'retrieval_heads.txt'}")
    if specs:
        _knockout(lm, report, specs, args, out_dir)
    return 0


def _knockout_specs(args: argparse.Namespace) -> list:
    from harness_ext.heads_knockout import parse_knockout

    return [parse_knockout(s) for s in args.knockout or []]


def _knockout(lm, report: dict, specs: list, args: argparse.Namespace, out_dir: Path) -> None:
    from harness_ext import heads
    from harness_ext import heads_knockout as hk
    from harness_ext import heads_probes as hp

    if [report["num_layers"], report["num_heads"]] != [lm.ctl.num_layers, lm.ctl.num_heads]:
        from harness_ext.errors import NeedlesError

        raise NeedlesError("the scores file was computed on a model of another shape", fix="use scores of this model")
    if args.knockout_task == "niah":
        # A haystack seed of its own, so the eval prompts are not the probes the heads were found on.
        probes = hp.niah_probes(
            lm.tokenizer, hp.load_needles(args.needles), args.eval_lengths, args.eval_depths, lm.chat, args.eval_seed
        )
        evalset = hk.niah_eval_set(probes, max_new_tokens=args.eval_max_new_tokens + 16)
    else:
        docs = hp.kv_docs(
            lm.tokenizer,
            args.eval_lengths,
            args.eval_depths,
            args.eval_samples,
            args.eval_seed,
            answer_template=args.kv_answer_template,
        )
        evalset = hk.kv_eval_set(lm, docs, args.eval_max_new_tokens)
    result = hk.run_knockouts(
        lm, heads.scores_of(report), specs, evalset, args.draws, args.seed, args.batch_size, progress=not args.quiet
    )
    result["scores_file"] = str(args.scores) if args.scores else str(out_dir / "heads.json")
    result["model"] = {k: lm.info[k] for k in sorted(lm.info)}
    result["eval"] = {
        "task": args.knockout_task,
        "lengths": args.eval_lengths,
        "depths": args.eval_depths,
        "num_samples": args.eval_samples,
        "seed": args.eval_seed,
        "answer_template": args.kv_answer_template,
    }
    heads.write_json_atomic(out_dir / "knockout.json", result)
    print(hk.format_knockout(result))
    print(f"wrote {out_dir / 'knockout.json'}")


def _compare(args: argparse.Namespace) -> int:
    from harness_ext import heads
    from harness_ext.heads_compare import compare, format_compare

    result = compare(heads.load_report(args.a), heads.load_report(args.b), args.threshold, args.top_k)
    result["files"] = {"a": str(args.a), "b": str(args.b)}
    print(format_compare(result))
    if args.output:
        heads.write_json_atomic(Path(args.output), result)
        print(f"wrote {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "heads",
        help="retrieval-head scores of every (layer, head), heatmap, knockout (Wu et al.)",
        description="Detect retrieval heads (copy-paste score during greedy decoding on needle prompts), "
        "optionally knock out top/random heads and measure KV-retrieval accuracy. "
        "`needles heads compare A.json B.json` compares two score files.",
    )
    p.add_argument("--model", default="smollm2", help="HF model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="peft LoRA adapter folder, merged into the model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--chat-template",
        dest="chat_template",
        action="store_true",
        default=None,
        help="format prompts with the tokenizer's chat template (default: when it has one)",
    )
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    p.add_argument("-o", "--output-dir", default="heads-out", help="heads.json, heads.png, retrieval_heads.txt")
    p.add_argument("--probes", nargs="+", default=["niah", "kv"], choices=["niah", "kv", "mdqa"])
    p.add_argument("--needles", default=None, help=f"needles JSONL (default: $NEEDLES_SHARED_DATA/{DEFAULT_NEEDLES})")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="NIAH input tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="NIAH needle depths")
    p.add_argument("--kv-lengths", type=int, nargs="+", default=[512], help="KV probe prompt tokens")
    p.add_argument("--kv-depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--kv-samples", type=int, default=10, help="KV base samples per length (x depths probes)")
    p.add_argument("--kv-seed", type=int, default=7, help="KV probe data seed (differs from the eval seed)")
    p.add_argument("--kv-answer-template", action="store_true", help="KV prompts that ask for the answer template")
    p.add_argument(
        "--mdqa-metadata",
        help="JSON for kv_tasks.mdqa data (mdqa_num_documents, mdqa_positions, "
        f"mdqa_num_questions, mdqa_mirror, allow_unofficial_data); default {json.dumps(DEFAULT_MDQA)}",
    )
    p.add_argument("--seed", type=int, default=0, help="haystack seed and random-knockout seed")
    p.add_argument("--extra-tokens", type=int, default=24, help="decode up to needle tokens + this many")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="retrieval head: score > threshold")
    p.add_argument("--scores", help="reuse a heads.json instead of detecting (with --knockout)")
    p.add_argument(
        "--knockout",
        action="append",
        metavar="top:K|random:K",
        help="knock out heads and report the task accuracy (repeatable)",
    )
    p.add_argument("--draws", type=int, default=5, help="random:K draws to average")
    p.add_argument("--knockout-task", choices=["kv", "niah"], default="kv", help="task scored under knockout")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[512], help="knockout eval: prompt tokens")
    p.add_argument("--eval-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--eval-samples", type=int, default=12, help="knockout eval (kv): base samples per length")
    p.add_argument(
        "--eval-seed",
        type=int,
        default=1000,
        help="knockout eval data seed (kv: the task's default; niah: haystack seed)",
    )
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-probe progress lines")
    p.set_defaults(func=_run_checked)

    sub2 = p.add_subparsers(dest="heads_command", metavar="[compare]")
    c = sub2.add_parser("compare", help="overlap and rank agreement of two heads.json files")
    c.add_argument("a", help="reference scores (e.g. the base model)")
    c.add_argument("b", help="scores to compare (e.g. the finetuned model)")
    c.add_argument("--threshold", type=float, default=None, help="override both files' thresholds")
    c.add_argument("--top-k", type=int, default=10)
    c.add_argument("-o", "--output", help="write the comparison as JSON")
    c.set_defaults(func=_compare)


def _run_checked(args: argparse.Namespace) -> int:
    if args.needles is None:
        args.needles = str(_shared_needles())
    return _run(args)
