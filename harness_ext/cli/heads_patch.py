"""``needles heads patch``: cross-model activation patching per attention head (parser and handler)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness_ext.cli.heads_checks import (
    DEFAULT_NEEDLES,
    SCORES_HELP,
    check_counts,
    check_depths,
    check_output_dir,
    check_threshold,
    eval_set,
    model_path,
    shared_needles,
    usage_error,
)


def _patch(args: argparse.Namespace) -> int:
    """Cross-model activation patching: every input, both head files and the two models' configs and
    tokenizers are checked before any weights load."""
    check_counts(
        args, 1, ("eval_lengths", "eval_samples", "draws", "eval_max_new_tokens"), "use a positive whole number"
    )
    check_counts(args, 0, ("seed", "eval_seed"), "use 0 or a positive whole number")
    check_depths(args, ("eval_depths",))
    check_threshold(args.threshold)
    check_output_dir(Path(args.output_dir))
    from harness_ext.heads import patch_sets as ps
    from harness_ext.heads import probes as hp
    from harness_ext.heads.model import check_adapter_path, check_model_path, load_model
    from harness_ext.heads.patch_compat import check_compatible
    from harness_ext.heads.patch_report import format_patch
    from harness_ext.heads.patching import run_patching
    from harness_ext.heads.probes_qa import check_qa_metadata, parse_qa_metadata
    from harness_ext.heads.rope_window import check_probe_lengths, config_kwargs, probed_rope
    from harness_ext.heads.scorefile import load_head_scores, write_json

    check_qa_metadata([args.task], parse_qa_metadata(args.qa_metadata))
    specs = ps.parse_sets(args.sets)
    source_scores, target_scores = load_head_scores(args.source_heads), load_head_scores(args.target_heads)
    source, target = model_path(args.source), model_path(args.target)
    for model, adapter in ((source, args.source_adapter), (target, args.target_adapter)):
        check_model_path(model)
        if adapter:
            check_adapter_path(adapter)
    arch = check_compatible(source, target)
    ps.check_grids(source_scores, target_scores, arch["num_layers"], arch["num_heads"])
    sets = ps.resolve_sets(specs, source_scores, target_scores, args.draws, args.seed, args.threshold)
    if args.task == "niah" or args.needles:  # a given file is checked even where this task would not read it
        args.needles = args.needles or str(shared_needles())
        hp.load_needles(args.needles)  # a missing needles file should not wait for the models

    def rope_for(model: Path, adapter: str | None) -> tuple[dict, dict]:
        # an adapter trained with an extended RoPE is loaded with it (its finetune manifest), never on the plain base
        overrides, info = probed_rope(model, adapter, None)
        check_probe_lengths(
            {"--eval-lengths": args.eval_lengths}, args.eval_max_new_tokens, info, model, takes_overrides=False
        )
        return config_kwargs(overrides, model), info

    tgt_kwargs, tgt_rope = rope_for(target, args.target_adapter)
    src_kwargs, src_rope = rope_for(source, args.source_adapter)
    tgt = load_model(target, args.target_adapter, args.dtype, args.chat_template, tgt_kwargs)
    src = load_model(source, args.source_adapter, args.dtype, args.chat_template, src_kwargs)
    tgt.info["rope_window"], src.info["rope_window"] = tgt_rope, src_rope
    evalset = eval_set(tgt, args, args.task)
    result = run_patching(src, tgt, evalset, sets, args.site, args.continuation, args.seed, progress=not args.quiet)
    result["source"] = {k: src.info[k] for k in sorted(src.info)}
    result["target"] = {k: tgt.info[k] for k in sorted(tgt.info)}
    result["architecture"] = arch
    result["head_files"] = {
        "source": {"file": str(args.source_heads), **source_scores.describe()},
        "target": {"file": str(args.target_heads), **target_scores.describe()},
        "threshold_override": args.threshold,
    }
    result["eval"] = {
        "task": args.task,
        "lengths": args.eval_lengths,
        "depths": args.eval_depths,
        "num_samples": args.eval_samples,
        "seed": args.eval_seed,
        "answer_template": args.kv_answer_template,
    }
    if args.task in ("musique", "summhay"):
        result["eval"]["qa_metadata"] = parse_qa_metadata(args.qa_metadata)
    out = Path(args.output_dir) / "patch.json"
    write_json(out, result)
    print(format_patch(result))
    print(f"wrote {out}")
    return 0


def register_patch(sub2: argparse._SubParsersAction) -> None:
    c = sub2.add_parser(
        "patch",
        help="patch attention heads from a source model into a target model and score the task",
        description="Cross-model activation patching per attention head (Zhao, Yin, Durrett 2025): run each "
        "eval prompt through the source (e.g. the real-data finetune) and the target (e.g. a synthetic-data "
        "finetune); in the target, replace the chosen heads' output by the source's at every position of the "
        "prompt and of the continuation; score the task per item and report each set's paired delta vs the "
        "unpatched target with a 95% bootstrap interval. Source and target must share architecture and tokenizer.",
    )
    c.add_argument("--source", required=True, help="model the head outputs are taken from (HF folder)")
    c.add_argument("--source-adapter", help="peft LoRA adapter merged into the source")
    c.add_argument("--target", required=True, help="model that is patched (HF folder)")
    c.add_argument("--target-adapter", help="peft LoRA adapter merged into the target")
    c.add_argument("--source-heads", required=True, help=f"the source's head scores: {SCORES_HELP}")
    c.add_argument("--target-heads", required=True, help=f"the target's head scores: {SCORES_HELP}")
    c.add_argument(
        "--sets",
        nargs="+",
        default=["intersection", "complement", "random:10"],
        metavar="SET",
        help="head sets to patch: intersection (source and target heads), complement (source heads not in the "
        "target's set), random:K (K heads outside both sets, --draws draws), top:K (source's top K), or a list "
        "L-H,L-H (default: intersection complement random:10)",
    )
    c.add_argument("--threshold", type=float, default=None, help="retrieval head: score > this (default: each file's)")
    c.add_argument("--draws", type=int, default=5, help="random:K draws to average")
    c.add_argument("--seed", type=int, default=0, help="random:K draw seed and bootstrap seed")
    c.add_argument(
        "--site",
        choices=["result", "z"],
        default="result",
        help="result: the head's contribution to the residual stream (its o_proj slice applied; default); "
        "z: the head's slice of the input to o_proj",
    )
    c.add_argument(
        "--continuation",
        choices=["teacher-forced", "regenerate"],
        default="teacher-forced",
        help="teacher-forced (default): feed the unpatched target's greedy tokens, score the patched argmax at "
        "each position; regenerate: greedy decoding of the patched target, the source re-run on the same tokens",
    )
    c.add_argument(
        "--task",
        choices=["kv", "niah", "musique", "summhay"],
        default="kv",
        help="task scored (kv: value_acc; niah: ROUGE; musique: answer F1; summhay: citation F1)",
    )
    c.add_argument(
        "--qa-metadata",
        help="JSON for --task musique / summhay: the tasks' --metadata keys and data mirrors (as `needles heads`)",
    )
    c.add_argument("--needles", default=None, help=f"needles JSONL for --task niah (default: {DEFAULT_NEEDLES})")
    c.add_argument("--eval-lengths", type=int, nargs="+", default=[512], help="eval prompt tokens")
    c.add_argument("--eval-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    c.add_argument("--eval-samples", type=int, default=12, help="eval (kv): base samples per length")
    c.add_argument("--eval-seed", type=int, default=1000, help="eval data seed (kv: the task's default)")
    c.add_argument("--eval-max-new-tokens", type=int, default=32)
    c.add_argument("--kv-answer-template", action="store_true", help="KV prompts that ask for the answer template")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.add_argument("--chat-template", dest="chat_template", action="store_true", default=None)
    c.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    c.add_argument("-o", "--output-dir", default="heads-out", help="where patch.json is written")
    c.add_argument("-q", "--quiet", action="store_true", help="no per-item progress lines")
    c.set_defaults(func=_patch)
    c.error = usage_error(c)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------- parser
