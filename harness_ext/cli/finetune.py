"""``needles finetune`` (local LoRA/full, or OpenAI), ``needles export-openai`` and ``needles loop``.

The finetune options are generated from the config dataclasses (harness_ext/finetune/args.py):
a new FinetuneConfig field is a new flag of all three commands without a line here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from harness_ext.finetune.args import (
    add_dataclass_flags,
    add_finetune_flags,
    overrides_from_args,
    run_finetune,
)
from harness_ext.finetune.config import GROUP_DATA, GROUP_EVAL, FinetuneConfig


def _export_openai(args: argparse.Namespace) -> int:
    from harness_ext.finetune.config import load_config
    from harness_ext.finetune.openai_ft import export_openai

    cfg = load_config(args.config, overrides_from_args(args))
    stats = export_openai(cfg, args.output, openai_model=args.openai_model, max_tokens=args.max_tokens)
    print(json.dumps(stats, indent=2))
    return 0


def _loop(args: argparse.Namespace) -> int:
    from harness_ext.core.errors import NeedlesError
    from harness_ext.experiment.loop import run_loop
    from harness_ext.finetune.args import options_from_args
    from harness_ext.finetune.config import check_bounds
    from harness_ext.finetune.openai_ft import OpenAIJobOptions

    job = options_from_args(OpenAIJobOptions, args)
    check_bounds(job)  # the loop shares finetune's flags: a bad value is refused even where it is unused
    if job.backend != "hf":
        raise NeedlesError(
            "--backend openai cannot be scored locally by the loop", fix="drop --backend for `needles loop`"
        )
    overrides = overrides_from_args(args)
    overrides.pop("output_dir", None)
    overrides.pop("eval_metadata", None)
    result = run_loop(
        model=args.model or "smollm2",
        output_dir=args.output_dir,
        task=args.task,
        eval_metadata=args.eval_metadata,
        config=args.config,
        overrides=overrides,
        metric=args.metric,
    )
    return 0 if result["significant"] or not args.require_significant else 1


def register(sub: Any) -> None:
    """Add ``finetune``, ``export-openai`` and ``loop`` to the ``needles`` subcommands."""
    p = sub.add_parser(
        "finetune",
        help="finetune a model on synthetic KV data (LoRA by default; or OpenAI)",
        description="Finetune on synthetic KV-retrieval data and print the lm_eval command that "
        "scores the result. Multi-GPU: accelerate launch -m harness_ext.finetune [same flags].",
    )
    add_finetune_flags(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("export-openai", help="write the training data as OpenAI chat-finetuning JSONL")
    p.add_argument("--config", help="YAML file of options (its data/eval keys are used)")
    p.add_argument("--model", help="tokenizer used to size prompts (default smollm2)")
    add_dataclass_flags(p, FinetuneConfig, groups=(GROUP_DATA, GROUP_EVAL), top_level=False)
    p.add_argument("--openai-model", default="gpt-3.5-turbo-1106", help="sets the per-example token limit")
    p.add_argument("--max-tokens", type=int, help="per-example token limit (default: the model's)")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write")
    p.set_defaults(func=_export_openai)

    p = sub.add_parser("loop", help="score the base model, LoRA-finetune it, score the adapter, compare (paired)")
    add_finetune_flags(p)
    p.set_defaults(output_dir="outputs/loop")
    p.add_argument("--task", default="kv_retrieval_simple", help="the kv_retrieval task that scores both")
    p.add_argument("--metric", default="value_acc", help="metric of the paired test (value_acc, both_acc, ...)")
    p.add_argument("--require-significant", action="store_true", help="exit 1 unless the gain is significant")
    p.set_defaults(func=_loop)
