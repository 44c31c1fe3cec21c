"""``needles finetune`` (local LoRA/full, or OpenAI), ``needles export-openai`` and ``needles loop``."""

from __future__ import annotations

import argparse
import json
import sys

# flag -> config key (flags default to None so that a YAML file is only overridden by what is given)
_TOP_LEVEL = {
    "model": "model",
    "output_dir": "output_dir",
    "method": "method",
    "system_prompt": "system_prompt",
    "eval_tasks": "eval_tasks",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "warmup_ratio": "warmup_ratio",
    "lr_scheduler": "lr_scheduler",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "batching": "batching",
    "pack_tokens": "pack_tokens",
    "max_length": "max_length",
    "seed": "seed",
    "save_every": "save_every",
    "keep_checkpoints": "keep_checkpoints",
    "resume": "resume",
    "stop_after_steps": "stop_after_steps",
    "merge": "merge",
    "trust_remote_code": "trust_remote_code",
    "attn_implementation": "attn_implementation",
}
_DATA = {
    "variant": "variant",
    "answer_template": "answer_template",
    "num_samples": "num_samples",
    "data_seed": "seed",
    "lengths": "lengths",
    "num_dicts": "num_dicts",
    "depths": "depths",
}


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def overrides_from_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    for flag, key in _TOP_LEVEL.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    data = {key: getattr(args, flag) for flag, key in _DATA.items() if getattr(args, flag, None) is not None}
    if data:
        if "num_dicts" in data and "lengths" not in data:
            data["lengths"] = None  # a dictionary count replaces token targets
        out["data"] = data
    if getattr(args, "eval_metadata", None) is not None:
        out["eval_metadata"] = args.eval_metadata
    return out


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training data (same generator as the kv_retrieval tasks)")
    g.add_argument("--variant", choices=["simple", "multisubkey"])
    g.add_argument("--answer-template", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--num-samples", type=int, help="documents per length (default 350)")
    g.add_argument("--data-seed", type=int, help="generator seed (default 0; the eval tasks use 1000)")
    g.add_argument("--lengths", type=int, nargs="+", help="prompt token targets (default 256)")
    g.add_argument("--num-dicts", type=int, help="fixed dictionary count instead of token targets")
    g.add_argument("--depths", type=float, nargs="+", help="gold depths in [0,1] (default: uniform)")
    g.add_argument("--system-prompt", help="system message for every training example (default none)")
    g = p.add_argument_group("evaluation set (its documents are never trained on)")
    g.add_argument("--eval-tasks", nargs="+", help="default kv_retrieval_simple")
    g.add_argument("--eval-metadata", type=_json_arg, help="lm_eval --metadata JSON, e.g. '{\"lengths\":[256]}'")


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--model", help="local HF folder, downloaded hub id, or smollm2 (default)")
    p.add_argument("-o", "--output-dir", help="output folder (default outputs/finetune)")
    p.add_argument("--method", choices=["lora", "full"])
    add_data_flags(p)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--lora-dropout", type=float)
    g.add_argument("--target-modules", nargs="+")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--lr", type=float, help="default 2e-4 (LoRA), 5e-6 (full)")
    g.add_argument("--batch-size", type=int, help="micro-batch per device (default 4)")
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--batching", choices=["grouped", "padded", "packed"])
    g.add_argument("--pack-tokens", type=int)
    g.add_argument("--max-length", type=int, help="refuse data longer than this (never truncates)")
    g.add_argument("--seed", type=int, help="LoRA init, dropout and batch order (default 0)")
    g.add_argument("--attn-implementation", help="sdpa (default), eager, flash_attention_2")
    g.add_argument("--trust-remote-code", action="store_true", default=None)
    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    g.add_argument("--stop-after-steps", type=int, help="end this session after N steps (checkpointed)")
    g.add_argument("--merge", action="store_true", default=None, help="also save the merged model")
    g = p.add_argument_group("OpenAI backend (--backend openai)")
    g.add_argument("--backend", choices=["hf", "openai"], default="hf")
    g.add_argument("--openai-model", default="gpt-3.5-turbo-1106", help="base model to finetune")
    g.add_argument("--n-epochs", type=int, default=None, help="OpenAI epochs (default: the API's auto)")
    g.add_argument("--suffix", default="needles-kv")
    g.add_argument("--poll-interval", type=float, default=10.0)
    g.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the job")


def _finetune(args: argparse.Namespace) -> int:
    from harness_ext.finetune import finetune, load_config

    cfg = load_config(args.config, overrides_from_args(args))
    if args.backend == "openai":
        from harness_ext.openai_ft import finetune_openai

        result = finetune_openai(
            cfg,
            args.openai_model,
            n_epochs=args.n_epochs,
            suffix=args.suffix,
            poll_interval=args.poll_interval,
            timeout=args.timeout,
        )
        print(result["fine_tuned_model"])
        return 0
    manifest = finetune(cfg)
    if "eval_command" in manifest:
        print(manifest["eval_command"])
    return 0


def _export_openai(args: argparse.Namespace) -> int:
    from harness_ext.finetune import load_config
    from harness_ext.openai_ft import export_openai

    cfg = load_config(args.config, overrides_from_args(args))
    stats = export_openai(cfg, args.output, openai_model=args.openai_model, max_tokens=args.max_tokens)
    print(json.dumps(stats, indent=2))
    return 0


def _loop(args: argparse.Namespace) -> int:
    from harness_ext.loop import run_loop

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


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="finetune a model on synthetic KV data (LoRA by default; or OpenAI)",
        description="Finetune on synthetic KV-retrieval data and print the lm_eval command that "
        "scores the result. Multi-GPU: accelerate launch -m harness_ext.finetune [same flags].",
    )
    add_finetune_flags(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("export-openai", help="write the training data as OpenAI chat-finetuning JSONL")
    p.add_argument("--config", help="YAML file of options (its data/eval keys are used)")
    p.add_argument("--model", help="tokenizer used to size prompts (default smollm2)")
    add_data_flags(p)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m harness_ext.finetune`` / ``accelerate launch -m harness_ext.finetune``: the finetune flags."""
    from harness_ext.errors import NeedlesError

    parser = argparse.ArgumentParser(prog="harness_ext.finetune")
    add_finetune_flags(parser)
    args = parser.parse_args(argv)
    try:
        return _finetune(args)
    except NeedlesError as exc:
        print(f"needles: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
