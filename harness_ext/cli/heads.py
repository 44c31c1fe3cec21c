"""`needles heads`: retrieval-head scores, heatmap, knockout; `needles heads compare A.json B.json`;
`needles heads patch`: cross-model activation patching of chosen heads.

Every input is checked before anything slow starts or any file is written, so a mistake costs no model
load and leaves no partial output. Heavy imports (torch, transformers) happen inside the handlers so
that `needles --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness_ext.cli.heads_checks import (
    DEFAULT_MDQA,
    DEFAULT_NEEDLES,
    DEFAULT_THRESHOLD,
    SCORES_HELP,
    check_counts,
    check_depths,
    check_output_dir,
    check_output_file,
    check_threshold,
    eval_set,
    model_path,
    shared_needles,
    usage_error,
)
from harness_ext.cli.heads_patch import register_patch
from harness_ext.core.errors import NeedlesError
from harness_ext.heads.probes_qa import QA_PROBES, check_qa_metadata, parse_qa_metadata
from harness_ext.heads.probes_synth import (
    PROBE_DEFAULTS,
    SYNTH_PREFIX,
    ProbeChoices,
    check_synth_metadata,
    is_synth_probe,
    synth_probes,
)


def _mdqa_metadata(args: argparse.Namespace) -> dict:
    meta = dict(DEFAULT_MDQA)
    if args.mdqa_metadata:
        fix = 'pass a JSON object, e.g. --mdqa-metadata \'{"mdqa_num_documents": 10, "mdqa_positions": [1, 10]}\''
        try:
            extra = json.loads(args.mdqa_metadata)
        except ValueError as exc:
            raise NeedlesError(f"--mdqa-metadata is not valid JSON ({exc})", fix=fix) from None
        if not isinstance(extra, dict):
            raise NeedlesError("--mdqa-metadata is not a JSON object", fix=fix)
        if any(k.startswith("mdqa_task_") for k in extra):
            raise NeedlesError("--mdqa-metadata may not set mdqa_task_* (the sweep sets those)", fix=fix)
        meta.update(extra)
    return meta


def _check_run_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model: numbers, paths, JSON options."""
    check_counts(args, 1, ("lengths", "kv_lengths", "eval_lengths"), "give prompt lengths in tokens, e.g. 512")
    check_counts(
        args,
        1,
        ("kv_samples", "eval_samples", "draws", "batch_size", "probe_batch", "eval_max_new_tokens"),
        "use a positive whole number",
    )
    check_counts(args, 0, ("extra_tokens", "seed", "kv_seed", "eval_seed"), "use 0 or a positive whole number")
    check_depths(args, ("depths", "kv_depths", "eval_depths"))
    check_threshold(args.threshold)
    check_output_dir(Path(args.output_dir))
    check_synth_metadata(args.probes, _mdqa_metadata(args))
    check_qa_metadata([*args.probes, args.knockout_task], parse_qa_metadata(args.qa_metadata))


# ----------------------------------------------------------------------------------- detection
def _settings(args: argparse.Namespace) -> dict:
    """Everything that determines the probes and the decoding (recorded in the JSON)."""
    out = {"probes": sorted(args.probes), "extra_tokens": args.extra_tokens, "seed": args.seed}
    out["probe_batch"] = args.probe_batch
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
    for name in (n for n in QA_PROBES if n in args.probes):
        out[name] = parse_qa_metadata(args.qa_metadata)
    synth = [name for name in args.probes if is_synth_probe(name)]
    if synth:
        out["synth_mdqa"] = {"cells": sorted(synth), "metadata": {**PROBE_DEFAULTS, **_mdqa_metadata(args)}}
    return out


def _build_probes(lm, args: argparse.Namespace) -> list:
    from harness_ext.heads import probes as hp

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
    for name in (n for n in QA_PROBES if n in args.probes):
        from harness_ext.heads.probes_qa import qa_probes

        probes += qa_probes(lm.tokenizer, name, parse_qa_metadata(args.qa_metadata), lm.chat)
    for name in (n for n in args.probes if is_synth_probe(n)):
        probes += synth_probes(lm.tokenizer, name.removeprefix(SYNTH_PREFIX), _mdqa_metadata(args), lm.chat)
    return probes


def _detect(lm, probes: list, args: argparse.Namespace, out_dir: Path) -> dict:
    from harness_ext.core.atomic_io import write_atomic
    from harness_ext.heads import detect, report
    from harness_ext.heads.scorefile import write_json

    t0 = time.time()
    results = detect.detect(
        lm, probes, extra_tokens=args.extra_tokens, progress=not args.quiet, batch_size=args.probe_batch
    )
    rep = report.build_report(lm, results, _settings(args), args.threshold)
    write_json(out_dir / "heads.json", rep)
    try:
        report.write_heatmap(rep, out_dir / "heads.png")
    except NeedlesError as exc:  # the scores are written; only the picture is missing
        print(f"[needles heads] no heatmap: {exc.problem} ({exc.fix})", file=sys.stderr)
    write_atomic(out_dir / "retrieval_heads.txt", report.format_heads(rep) + "\n")
    print(f"[needles heads] {len(probes)} probes in {time.time() - t0:.0f} s", file=sys.stderr)
    return rep


def _run(args: argparse.Namespace) -> int:
    _check_run_args(args)
    out_dir = Path(args.output_dir)
    specs = _knockout_specs(args)
    if args.scores and not specs:
        raise NeedlesError(
            "--scores without --knockout has nothing to do",
            fix="add --knockout top:K (or drop --scores to detect heads)",
        )
    from harness_ext.heads import probes as hp
    from harness_ext.heads.knockout import check_knockout
    from harness_ext.heads.model import load_model
    from harness_ext.heads.scorefile import from_report, load_head_scores

    saved = load_head_scores(args.scores) if args.scores else None
    if (not saved and "niah" in args.probes) or (specs and args.knockout_task == "niah"):
        hp.load_needles(args.needles)  # a missing needles file should not wait for the model
    from harness_ext.heads.rope_window import NO_MANIFEST, check_probe_lengths, config_kwargs, probed_rope

    # an extended model is probed with the RoPE it is served with; lengths past that window are refused unloaded
    overrides, window = probed_rope(model_path(args.model), args.adapter, args.hf_overrides)
    if window["source"] == NO_MANIFEST:
        print(
            f"[needles heads] {args.adapter} has no needles finetune manifest beside it: probed with the model's "
            f"RoPE (window {window['window']}); if it was trained with a RoPE extension, pass that RoPE with "
            "--hf-overrides",
            file=sys.stderr,
        )
    lengths = {"--eval-lengths": args.eval_lengths} if specs else {}
    if not saved:
        lengths |= {"--lengths": args.lengths} if "niah" in args.probes else {}
        lengths |= {"--kv-lengths": args.kv_lengths} if "kv" in args.probes else {}
    check_probe_lengths(lengths, max(args.extra_tokens, args.eval_max_new_tokens), window, model_path(args.model))
    kwargs = config_kwargs(overrides, model_path(args.model))
    lm = load_model(model_path(args.model), args.adapter, args.dtype, args.chat_template, kwargs)
    lm.info["rope_window"] = window
    grid = (saved.num_layers, saved.num_heads) if saved else (lm.ctl.num_layers, lm.ctl.num_heads)
    if grid != (lm.ctl.num_layers, lm.ctl.num_heads):
        raise NeedlesError(
            f"the scores file has a {grid[0]}x{grid[1]} head grid, the model {lm.ctl.num_layers}x{lm.ctl.num_heads}",
            fix="use scores of this model",
        )
    for spec in specs:
        check_knockout(spec, grid[0] * grid[1])
    # Inputs are built before any file is written, so their errors leave no partial output.
    probes = _build_probes(lm, args) if not saved else []
    evalset = eval_set(lm, args) if specs else None
    if saved is None:
        rep = _detect(lm, probes, args, out_dir)
        print(_format_heads(rep))
        print(f"wrote {out_dir / 'heads.json'}, {out_dir / 'heads.png'}, {out_dir / 'retrieval_heads.txt'}")
        saved = from_report(rep)
    if specs:
        _knockout(lm, saved, specs, evalset, args, out_dir)
    return 0


def _format_heads(rep: dict) -> str:
    from harness_ext.heads.report import format_heads

    return format_heads(rep, limit=20)


def _knockout_specs(args: argparse.Namespace) -> list:
    from harness_ext.heads.knockout import parse_knockout

    return [parse_knockout(s) for s in args.knockout or []]


def _knockout(lm, saved, specs: list, evalset, args: argparse.Namespace, out_dir: Path) -> None:
    from harness_ext.heads import knockout as hk
    from harness_ext.heads.scorefile import write_json

    result = hk.run_knockouts(
        lm, saved.scores, specs, evalset, args.draws, args.seed, args.batch_size, progress=not args.quiet
    )
    result["scores_file"] = str(args.scores) if args.scores else str(out_dir / "heads.json")
    result["scores_format"] = saved.format
    result["model"] = {k: lm.info[k] for k in sorted(lm.info)}
    result["eval"] = {
        "task": args.knockout_task,
        "lengths": args.eval_lengths,
        "depths": args.eval_depths,
        "num_samples": args.eval_samples,
        "seed": args.eval_seed,
        "answer_template": args.kv_answer_template,
    }
    if args.knockout_task in QA_PROBES:
        result["eval"]["qa_metadata"] = parse_qa_metadata(args.qa_metadata)
    write_json(out_dir / "knockout.json", result)
    print(f"scores: {result['scores_file']} ({saved.format_name})")
    print(hk.format_knockout(result))
    print(f"wrote {out_dir / 'knockout.json'}")


# ----------------------------------------------------------------------------------- compare
def _compare(args: argparse.Namespace) -> int:
    check_threshold(args.threshold)
    check_counts(args, 1, ("top_k",), "use a positive whole number")
    if args.output:
        check_output_file(Path(args.output))
    from harness_ext.heads.compare import compare, format_compare
    from harness_ext.heads.scorefile import load_head_scores, write_json

    result = compare(load_head_scores(args.a), load_head_scores(args.b), args.threshold, args.top_k)
    result["files"] = {"a": str(args.a), "b": str(args.b)}
    print(format_compare(result))
    if args.output:
        write_json(Path(args.output), result)
        print(f"wrote {args.output}")
    return 0


# ----------------------------------------------------------------------------------- patch
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heads",
        help="retrieval-head scores of every (layer, head), heatmap, knockout (Wu et al.)",
        description="Detect retrieval heads (copy-paste score during greedy decoding on needle prompts), "
        "optionally knock out top/random heads and measure KV-retrieval accuracy. "
        "`needles heads compare A.json B.json` compares two score files.",
    )
    p.add_argument("--model", default="smollm2", help="HF model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="peft LoRA adapter folder, merged into the model")
    p.add_argument(
        "--hf-overrides",
        help="JSON RoPE override to probe an extended model with, as lm_eval's hf_overrides (the training-free "
        "variant); default: the adapter's finetune manifest, else the model's config",
    )
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
    p.add_argument(
        "--probes",
        nargs="+",
        default=["niah", "kv"],
        choices=ProbeChoices(["niah", "kv", "mdqa", *QA_PROBES]),
        metavar="PROBES",
        help="niah, kv, mdqa, musique, summhay and synth_mdqa:CELL for a cell of `needles data list families` "
        "(default: niah kv)",
    )
    p.add_argument(
        "--needles",
        default=None,
        help=f"needles JSONL (default: $NEEDLES_SHARED_DATA/{DEFAULT_NEEDLES}, else the niah task's needles file)",
    )
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
        f"mdqa_num_questions, mdqa_mirror, allow_unofficial_data); default {json.dumps(DEFAULT_MDQA)}; "
        "synth_mdqa:CELL probes read their synth_* keys here too",
    )
    p.add_argument(
        "--qa-metadata",
        help="JSON for the musique / summhay probes and knockout items: the tasks' --metadata keys (musique_lengths, "
        "summhay_num_insights, ...) and data mirrors (musique_mirror, summhay_mirror, allow_unofficial_data)",
    )
    p.add_argument("--seed", type=int, default=0, help="haystack seed and random-knockout seed")
    p.add_argument("--extra-tokens", type=int, default=24, help="decode up to needle tokens + this many")
    p.add_argument(
        "--probe-batch",
        type=int,
        default=1,
        help="probes decoded per forward pass: 1 (default) is exact; more is faster on CPU and equal up to float "
        "round-off (benchmarks/README.md)",
    )
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="retrieval head: score > threshold")
    p.add_argument("--scores", help=f"reuse scores instead of detecting (with --knockout): {SCORES_HELP}")
    p.add_argument(
        "--knockout",
        action="append",
        metavar="top:K|random:K",
        help="knock out heads and report the task accuracy (repeatable)",
    )
    p.add_argument("--draws", type=int, default=5, help="random:K draws to average")
    p.add_argument(
        "--knockout-task", choices=["kv", "niah", *QA_PROBES], default="kv", help="task scored under knockout"
    )
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
    p.error = usage_error(p)  # type: ignore[method-assign]

    sub2 = p.add_subparsers(dest="heads_command", metavar="[compare|patch]")
    c = sub2.add_parser(
        "compare",
        help="overlap and rank agreement of two head-score files",
        description="Compare two head-score files of the same head grid. Each is "
        f"{SCORES_HELP}; the output names the format of each.",
    )
    c.add_argument("a", help="reference scores (e.g. the base model)")
    c.add_argument("b", help="scores to compare (e.g. the finetuned model)")
    c.add_argument("--threshold", type=float, default=None, help="override both files' thresholds")
    c.add_argument("--top-k", type=int, default=10)
    c.add_argument("-o", "--output", help="write the comparison as JSON")
    c.set_defaults(func=_compare)
    c.error = usage_error(c)  # type: ignore[method-assign]
    register_patch(sub2)


def _run_checked(args: argparse.Namespace) -> int:
    if args.needles is None:
        args.needles = str(shared_needles())
    return _run(args)
