"""KV data generation speed vs lm-eval's built-in RULER niah_single_1, same tokenizer and sizes.

Run: python benchmarks/bench_kv_generation.py [--lengths 4096 8192 16384 32768] [--samples 500]

Prints, per length: RULER seconds, needles seconds (fresh, no cache), the ratio, the worst
length error of our prompts (exact re-tokenization), and the cached second run via the lm-eval
task's dataset function. Both generators get the tokenizer preloaded, so only generation is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: embedded SmolLM2)")
    args = parser.parse_args()

    from harness_ext.data.models import smollm2_path

    tok_path = args.tokenizer or str(smollm2_path())
    os.environ["NEEDLES_CACHE_DIR"] = tempfile.mkdtemp(prefix="needles-bench-")  # cold cache

    from lm_eval.tasks.ruler import niah_utils
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec
    from harness_ext.tasklib.token_budget import count_tokens
    from kv_tasks.kv_retrieval import utils as kv_utils

    tok = get_tokenizer(tokenizer=tok_path)  # RULER's own cached loader; we use the same object
    rows = []
    for length in args.lengths:
        t0 = time.perf_counter()
        ruler = niah_utils.niah_single_1(tokenizer=tok_path, max_seq_lengths=[length])
        t_ruler = time.perf_counter() - t0
        assert len(ruler["test"]) == args.samples, len(ruler["test"])

        t0 = time.perf_counter()
        gen = KVGenerator(KVSpec(num_samples=args.samples, lengths=(length,), depths=None), tok)
        docs = gen.generate()
        t_ours = time.perf_counter() - t0
        exact = count_tokens(tok, [d["prompt"] for d in docs])
        over = sum(n > length for n in exact)
        worst_gap = max((length - n) / length for n in exact)

        meta = {"pretrained": tok_path, "lengths": [length], "depths": None, "num_samples": args.samples}
        kv_utils.simple(**meta)  # fill the cache
        t0 = time.perf_counter()
        kv_utils.simple(**meta)
        t_cached = time.perf_counter() - t0
        rows.append((length, t_ruler, t_ours, t_ruler / t_ours, over, worst_gap, t_cached))
        print(f"{length}: ruler {t_ruler:.2f}s, needles {t_ours:.2f}s, cached {t_cached:.2f}s", file=sys.stderr)

    print(f"\nKV generation, {args.samples} samples per length, tokenizer {Path(tok_path).name}\n")
    print(
        "| length | RULER niah_single_1 (s) | needles (s) | speed-up | prompts over target | max shortfall | "
        "needles cached (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length, tr, to, ratio, over, gap, tc in rows:
        print(f"| {length} | {tr:.2f} | {to:.2f} | {ratio:.1f}x | {over} | {gap:.1%} | {tc:.2f} |")
    ok = all(r[3] >= 5 and r[4] == 0 for r in rows)
    print(
        f"\nmust (>=5x at every length, no prompt over target): {'PASS' if ok else 'FAIL'}; "
        f"goal (>=10x): {'PASS' if all(r[3] >= 10 for r in rows) else 'not met'}; "
        f"cached run under 1 s: {'PASS' if all(r[6] < 1 for r in rows) else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
