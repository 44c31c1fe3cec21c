"""Data generation speed vs lm-eval's built-in RULER niah_single_1 and niah_single_2, same tokenizer, sizes and run.

Run: python benchmarks/bench_kv_generation.py [--lengths 4096 16384 65536 131072] [--samples 500]
    [--repeats 3] [--families kv niah] [--ruler niah_single_1 niah_single_2]

Per length, in one process and one run: each RULER task's seconds, then per family our cold seconds
(the lm-eval task's dataset function with the cache bypassed: generation, cache write, ``Dataset``;
the median of ``--repeats`` runs, as our seconds are short and the shared cores noisy), the ratio to
each RULER task, the cached second call, and the worst length error of our prompts (every
prompt re-tokenized, outside the timings). All generators get the tokenizer preloaded.

RULER side: the installed task functions (``lm_eval.tasks.ruler.niah_utils.niah_single_1/2``), with
``num_samples`` set to ``--samples`` (they hard-code 500). Offline substitutes, said in the output:
``niah_single_2``'s Paul Graham essays (a Hub download) are replaced by our book haystack's words,
prepared as RULER prepares the essays, and nltk's ``punkt_tab`` (a download), when absent, by a regex
sentence splitter, which is faster than punkt, so RULER's seconds there are a lower bound.

Families: ``kv`` (kv_retrieval_simple) and ``niah`` (niah_single: the reference needles in book text;
``--samples`` prompts per length as samples/5 draws x 5 depths). The NIAH data are the retrieval-head
files under ``$NEEDLES_SHARED_DATA`` (default ../shared/data), copied into an upstream-layout mirror.
``machine_speed.py`` (../shared/tools) is run before and after, when present. Exit 1 when a must
fails: KV >= 5x every RULER task at every length, no prompt of any family over its target. The goals
(KV >= 10x, NIAH >= 2x) are printed, met or not.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NIAH_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
RULER_TASKS = ("niah_single_1", "niah_single_2")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEEDLES_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--samples", type=int, default=500, help="prompts per length and side (RULER's is 500)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: embedded SmolLM2)")
    parser.add_argument("--families", nargs="+", choices=["kv", "niah"], default=["kv", "niah"])
    parser.add_argument("--repeats", type=int, default=3, help="cold runs of ours per cell; the median is reported")
    parser.add_argument("--ruler", nargs="+", choices=RULER_TASKS, default=list(RULER_TASKS))
    args = parser.parse_args()
    began, load0 = time.perf_counter(), os.getloadavg()
    speed0 = machine_speed()

    from harness_ext.data.models import smollm2_path

    tok_path = args.tokenizer or str(smollm2_path())
    work = Path(tempfile.mkdtemp(prefix="needles-bench-"))
    os.environ["NEEDLES_CACHE_DIR"] = str(work / "cache")  # cold cache

    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    from harness_ext.tasklib.niah_haystack import load_haystack
    from kv_tasks.kv_retrieval import utils as kv_utils
    from kv_tasks.niah import utils as niah_utils_ours

    tok = get_tokenizer(tokenizer=tok_path)  # RULER's own cached loader; we use the same object
    niah_meta = {"pretrained": tok_path, "niah_mirror": str(niah_mirror(work / "niah-mirror"))}
    book, _ = load_haystack("text", niah_meta)
    notes = patch_ruler(args.samples, book)
    # Warm-up: both of our tasks load the tokenizer and (NIAH) the haystack once, as RULER's loader is warm.
    kv_utils.simple(pretrained=tok_path, lengths=[128], depths=None, num_samples=1)
    niah_utils_ours.niah_single(**niah_meta, niah_lengths=[128], niah_depths=[0.5], niah_num_samples=1)

    rows = []
    for length in args.lengths:
        ruler = {task: timed_ruler(task, tok_path, length, args.samples) for task in args.ruler}
        for family in args.families:
            if family == "kv":
                meta = {"pretrained": tok_path, "lengths": [length], "depths": None, "num_samples": args.samples}
                call = functools.partial(kv_utils.simple, **meta)
            else:
                meta = {
                    **niah_meta,
                    "niah_lengths": [length],
                    "niah_depths": NIAH_DEPTHS,
                    "niah_num_samples": max(1, args.samples // len(NIAH_DEPTHS)),
                }
                call = functools.partial(niah_utils_ours.niah_single, **meta)
            colds = []
            for _ in range(args.repeats):  # a rebuild each time (cache bypassed, still written): cold
                os.environ["NEEDLES_NO_CACHE"] = "1"
                t0 = time.perf_counter()
                ds = call()
                colds.append(time.perf_counter() - t0)
                del os.environ["NEEDLES_NO_CACHE"]
            t_cold = statistics.median(colds)
            t0 = time.perf_counter()
            call()
            t_cached = time.perf_counter() - t0
            over, gap = length_check(tok, ds["test"]["prompt"], length)
            rows.append((family, length, len(ds["test"]), ruler, t_cold, over, gap, t_cached))
            ratios = ", ".join(f"{t}: {s:.2f}s ({s / t_cold:.1f}x)" for t, s in ruler.items())
            runs = "/".join(f"{t:.2f}" for t in colds)
            print(f"{family} {length}: cold {t_cold:.2f}s ({runs}), cached {t_cached:.2f}s; {ratios}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    report(args, tok_path, rows, notes, load0, began, speed0)
    kv_must = all(min(r[3].values()) / r[4] >= 5 for r in rows if r[0] == "kv")  # the must; 10x is the goal
    return 0 if kv_must and all(r[5] == 0 for r in rows) else 1


def patch_ruler(samples: int, book: str) -> list[str]:
    """The RULER task functions with ``num_samples`` = ``samples`` and the offline substitutes; notes on them."""
    import nltk
    from lm_eval.tasks.ruler import niah_utils, prepare_niah

    generate, haystack = niah_utils.generate_samples, niah_utils.get_haystack
    niah_utils.generate_samples = lambda *a, **kw: generate(*a, **{**kw, "num_samples": samples})
    # RULER's essay preparation (prepare_niah.get_haystack), applied to our book instead of the essays.
    # Three copies: one (72,639 words) is short of 128K tokens, and RULER would stop at its end.
    words = re.sub(r"\s+", " ", book).split(" ") * 3
    niah_utils.get_haystack = lambda type_haystack: words if type_haystack == "essay" else haystack(type_haystack)
    notes = [f"niah_single_2: our book text, 3 copies ({len(words):,} words), in place of the Paul Graham essays"]
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        prepare_niah.cached_sent_tokenize = functools.lru_cache(maxsize=1024)(
            lambda text: re.split(r"(?<=[.!?])\s+", text)
        )
        notes.append("niah_single_2: nltk punkt_tab absent, sentences split by a regex (faster than punkt)")
    return notes


def timed_ruler(task: str, tok_path: str, length: int, samples: int) -> float:
    from lm_eval.tasks.ruler import niah_utils

    t0 = time.perf_counter()
    got = getattr(niah_utils, task)(tokenizer=tok_path, max_seq_lengths=[length])
    seconds = time.perf_counter() - t0
    assert len(got["test"]) == samples, (task, length, len(got["test"]))
    print(f"ruler {task} {length}: {seconds:.2f}s", file=sys.stderr, flush=True)
    return seconds


def length_check(tok, prompts: list[str], length: int) -> tuple[int, float]:
    """(prompts over ``length``, worst shortfall as a fraction), by exact re-tokenization in batches."""
    from harness_ext.tasklib.token_budget import count_tokens

    exact = [n for i in range(0, len(prompts), 50) for n in count_tokens(tok, prompts[i : i + 50])]
    return sum(n > length for n in exact), max((length - n) / length for n in exact)


def machine_speed() -> str:
    tool = SHARED.parent / "tools" / "machine_speed.py"
    if not tool.is_file():
        return "machine_speed.py not found"
    got = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, check=False)
    return (got.stdout.strip() or got.stderr.strip()).splitlines()[-1]


def report(args, tok_path: str, rows: list, notes: list[str], load0, began: float, speed0: str) -> None:
    speed1, load1 = machine_speed(), os.getloadavg()
    print(f"\nData generation, {args.samples} prompts per length and side, tokenizer {Path(tok_path).name}")
    print(f"before: {speed0}; load average {load0[0]:.2f}")
    print(f"after:  {speed1}; load average {load1[0]:.2f}; whole script {time.perf_counter() - began:.0f} s")
    for note in notes:
        print(f"note: {note}")
    tasks = list(rows[0][3]) if rows else []
    print(
        "\n| family | length | prompts | "
        + " | ".join(f"RULER {t} (s)" for t in tasks)
        + f" | needles cold, median of {args.repeats} (s) | "
        + " | ".join(f"vs {t}" for t in tasks)
        + " | over target | max shortfall | needles cached (s) |"
    )
    print("|---|---:|---:|" + "---:|" * (2 * len(tasks) + 4))
    for family, length, n, ruler, cold, over, gap, cached in rows:
        print(
            f"| {family} | {length} | {n} | "
            + " | ".join(f"{s:.2f}" for s in ruler.values())
            + f" | {cold:.2f} | "
            + " | ".join(f"{s / cold:.1f}x" for s in ruler.values())
            + f" | {over} | {gap:.1%} | {cached:.2f} |"
        )
    goals = {"kv": 10.0, "niah": 2.0}
    for family in args.families:
        mine = [r for r in rows if r[0] == family]
        worst = min((min(r[3].values()) / r[4] for r in mine), default=float("nan"))
        verdict = "met" if worst >= goals[family] else "NOT met"
        print(f"goal {family} >= {goals[family]:g}x every RULER task at every length: {verdict} (worst {worst:.1f}x)")
    print(f"must, no prompt over target: {'yes' if all(r[5] == 0 for r in rows) else 'NO'}")


def niah_mirror(out: Path) -> Path:
    """The retrieval-head files in the upstream layout (the shared copy keeps needles.jsonl at its root)."""
    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES

    for rel in RETRIEVAL_HEAD.files:
        src = SHARED / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    return out


if __name__ == "__main__":
    sys.exit(main())
