"""Data generation speed vs lm-eval's built-in RULER niah_single_1, same tokenizer, sizes and run.

Run: python benchmarks/bench_kv_generation.py [--lengths 4096 8192 16384 32768] [--samples 500]
    [--families kv niah]

Prints, per length: RULER seconds, needles seconds (fresh, no cache), the ratio, the worst
length error of our prompts (exact re-tokenization), and the cached second run via the lm-eval
task's dataset function. Both generators get the tokenizer preloaded, so only generation is timed.

Families: ``kv`` (kv_retrieval_simple's generator) and ``niah`` (niah_single: the reference needles
in book text, the natural-language counterpart of RULER's task; ``--samples`` prompts per length as
samples/5 draws x 5 depths, the task's own dataset function on a cold cache, then cached). The NIAH
data are the retrieval-head files under ``$NEEDLES_SHARED_DATA`` (default ../shared/data), copied into
an upstream-layout mirror.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NIAH_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: embedded SmolLM2)")
    parser.add_argument("--families", nargs="+", choices=["kv", "niah"], default=["kv", "niah"])
    args = parser.parse_args()

    from harness_ext.data.models import smollm2_path

    tok_path = args.tokenizer or str(smollm2_path())
    work = Path(tempfile.mkdtemp(prefix="needles-bench-"))
    os.environ["NEEDLES_CACHE_DIR"] = str(work / "cache")  # cold cache

    from lm_eval.tasks.ruler import niah_utils
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec
    from harness_ext.tasklib.token_budget import count_tokens
    from kv_tasks.kv_retrieval import utils as kv_utils
    from kv_tasks.niah import utils as niah_utils_ours

    tok = get_tokenizer(tokenizer=tok_path)  # RULER's own cached loader; we use the same object
    niah_meta = {"pretrained": tok_path, "niah_mirror": str(niah_mirror(work / "niah-mirror"))}
    rows = []
    for length in args.lengths:
        t0 = time.perf_counter()
        ruler = niah_utils.niah_single_1(tokenizer=tok_path, max_seq_lengths=[length])
        t_ruler = time.perf_counter() - t0
        assert len(ruler["test"]) == args.samples, len(ruler["test"])

        for family in args.families:
            if family == "kv":
                t0 = time.perf_counter()
                gen = KVGenerator(KVSpec(num_samples=args.samples, lengths=(length,), depths=None), tok)
                prompts = [d["prompt"] for d in gen.generate()]
                t_ours = time.perf_counter() - t0
                meta = {"pretrained": tok_path, "lengths": [length], "depths": None, "num_samples": args.samples}
                kv_utils.simple(**meta)  # fill the cache
                t0 = time.perf_counter()
                kv_utils.simple(**meta)
                t_cached = time.perf_counter() - t0
            else:
                meta = {
                    **niah_meta,
                    "niah_lengths": [length],
                    "niah_depths": NIAH_DEPTHS,
                    "niah_num_samples": max(1, args.samples // len(NIAH_DEPTHS)),
                }
                niah_utils_ours.niah_single(**{**meta, "niah_lengths": [128]})  # loads the tokenizer and haystack
                t0 = time.perf_counter()
                prompts = niah_utils_ours.niah_single(**meta)["test"]["prompt"]
                t_ours = time.perf_counter() - t0
                t0 = time.perf_counter()
                niah_utils_ours.niah_single(**meta)
                t_cached = time.perf_counter() - t0
            exact = count_tokens(tok, prompts)
            over = sum(n > length for n in exact)
            worst_gap = max((length - n) / length for n in exact)
            rows.append((family, length, len(prompts), t_ruler, t_ours, t_ruler / t_ours, over, worst_gap, t_cached))
            print(
                f"{family} {length}: ruler {t_ruler:.2f}s, needles {t_ours:.2f}s, cached {t_cached:.2f}s",
                file=sys.stderr,
            )
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nData generation, {args.samples} RULER samples per length, tokenizer {Path(tok_path).name}\n")
    print(
        "| family | length | prompts | RULER niah_single_1 (s) | needles (s) | speed-up | prompts over target "
        "| max shortfall | needles cached (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for family, length, n, tr, to, ratio, over, gap, tc in rows:
        print(f"| {family} | {length} | {n} | {tr:.2f} | {to:.2f} | {ratio:.1f}x | {over} | {gap:.1%} | {tc:.2f} |")
    kv = [r for r in rows if r[0] == "kv"]
    ok = all(r[5] >= 5 for r in kv) and all(r[6] == 0 for r in rows)
    print(
        f"\nmust (kv >=5x at every length; no prompt of any family over target): {'PASS' if ok else 'FAIL'}; "
        f"goal (>=10x, every family): {'PASS' if all(r[5] >= 10 for r in rows) else 'not met'}; "
        f"cached run under 1 s: {'PASS' if all(r[8] < 1 for r in rows) else 'FAIL'}"
    )
    return 0 if ok else 1


def niah_mirror(out: Path) -> Path:
    """The retrieval-head files in the upstream layout (the shared copy keeps needles.jsonl at its root)."""
    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES

    shared = Path(os.environ.get("NEEDLES_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    for rel in RETRIEVAL_HEAD.files:
        src = shared / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    return out


if __name__ == "__main__":
    sys.exit(main())
