"""Retrieval-head detection: ``needles heads`` vs the reference method of Wu et al., same probes and decoding.

Run: python benchmarks/bench_heads.py [--lengths 1024 2048 4096] [--depths 0.25 0.75] [--model DIR] [--batch 1 3]
[--profile DIR] [--interleaved ROUNDS] (wrap it in ``flock /tmp/needles-heavy.lock`` on a shared machine).

Reference method (github.com/nightdessert/Retrieval_Head, ``retrieval_head_detection.py``), re-implemented
in heads_reference.py: prefill all but the last prompt token with the fast attention kernel (the reference uses
flash-attention-2; on CPU that is SDPA), then decode greedily one token per step with transformers'
*eager* attention and ``output_attentions=True``; after each step, for every layer and head, take
``topk(1)`` of the head's last attention row, and when that position lies in the needle span and holds
the token just generated, add 1/needle_length to the head's score (the reference's Python double loop).
A probe's scores count when the reply's ROUGE-1 recall of the answer is above 50 (``rouge_score``, with
stemming, as the reference); a head's score is the mean over those probes. Decoding budget and stop rule
are ``needles heads``' (needle tokens + 24, stop at a newline or end of turn: the reference's newline stop
for SmolLM2's tokenizer), so both sides decode the same tokens.

``needles heads`` side: harness_ext.heads (model.load_model, probes.niah_probes, detect.detect,
detect.aggregate), i.e. SDPA prefill in 256-token blocks continued from the previous probe's shared prefix (LM
head on the last position only), eager attention plus an argmax per head on the decode steps. ``--batch N`` runs it with ``detect(batch_size=N)``: N probes decoded per forward pass
(one row per ``--batch`` value; 1 is the default, one probe at a time). ``--profile DIR`` writes a cProfile of
each side's detection to DIR/<side>-<length>[-b<N>].prof (read it with ``python -m pstats``).
``--interleaved ROUNDS`` instead measures near the floor of the work (code in bench_heads_floor.py):
every side in one process, alternating, best-of times (no memory figures). ``--num-needles N`` uses the first N
needles.

Each (side, length) runs in a fresh subprocess (same probes: the reference needles over the
deterministic filler, built by harness_ext.heads.probes). Wall time covers detection only (model load
and probe building excluded). Memory is the process's resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before detection): "peak" is the high-water mark during detection and
"working" that minus the resident set before it. tracemalloc is not used: it does not see torch's tensors.

Must: identical per-probe copy-paste counts, replies and head scores (exit 1 otherwise).
Goal (reported, not enforced): >= 5x faster and <= half the working memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads_reference import EXTRA_TOKENS, SHARED, reference_probe, warm_up  # noqa: E402


# ---------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the resident high-water mark to the current RSS; returns the RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


@contextmanager
def _profiled(folder: str | None, name: str) -> Iterator[None]:
    """cProfile the block into ``folder/name.prof`` (nothing when ``folder`` is None)."""
    if folder is None:
        yield
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        Path(folder).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(folder) / f"{name}.prof"))


def worker(
    side: str, model_dir: str, length: int, depths: list[float], needles_path: Path, batch: int, profile: str | None
) -> dict:
    import numpy as np
    import torch

    from harness_ext.heads import probes as hp
    from harness_ext.heads.prompts import encode

    needles = hp.load_needles(needles_path)
    if side == "ours":
        from harness_ext.heads.detect import aggregate, detect
        from harness_ext.heads.model import load_model

        lm = load_model(model_dir)
        probes = hp.niah_probes(lm.tokenizer, needles, [length], depths, lm.chat)
        tokens = [len(encode(lm.tokenizer, p, lm.chat)[0]) for p in probes]
        warm_up(lm.model)
        base_kb = reset_peak()
        t0 = time.perf_counter()
        with _profiled(profile, f"ours-{length}-b{batch}"):
            results = detect(lm, probes, extra_tokens=EXTRA_TOKENS, progress=False, batch_size=batch)
        seconds = time.perf_counter() - t0
        peak_kb = _status_kb("VmHWM")
        scores, _n = aggregate(results, lm.ctl.num_layers, lm.ctl.num_heads)
        per_probe = [(r.hits.tolist(), r.response, r.retrieved) for r in results]
    else:
        from rouge_score import rouge_scorer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from harness_ext.heads.model import stop_token_ids

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        chat = bool(getattr(tok, "chat_template", None))
        probes = hp.niah_probes(tok, needles, [length], depths, chat)
        encoded = [encode(tok, p, chat) for p in probes]
        tokens = [len(ids) for ids, _ in encoded]
        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        stop = stop_token_ids(tok)
        warm_up(model)
        base_kb = reset_peak()
        t0 = time.perf_counter()
        per_probe, good = [], []
        with _profiled(profile, f"reference-{length}"):
            for probe, (ids, span) in zip(probes, encoded):
                counts, score, output = reference_probe(model, tok, ids, span, span[1] - span[0] + EXTRA_TOKENS, stop)
                response = tok.decode(output, skip_special_tokens=True).strip()
                retrieved = scorer.score(probe.answer, response)["rouge1"].recall * 100 > 50
                if retrieved:
                    good.append(score)
                per_probe.append((counts.tolist(), response, retrieved))
        scores = np.mean(np.stack(good), axis=0) if good else np.zeros((len(counts), len(counts[0])))
        seconds = time.perf_counter() - t0
        peak_kb = _status_kb("VmHWM")
    return {
        "side": side,
        "length": length,
        "batch": batch,
        "probes": len(probes),
        "prompt_tokens": tokens,
        "seconds": seconds,
        "rss_before_mb": base_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "working_mb": (peak_kb - base_kb) / 1024,
        "scores": np.asarray(scores).tolist(),
        "per_probe": per_probe,
        "torch_threads": torch.get_num_threads(),
    }


def run_side(side: str, args: argparse.Namespace, length: int, batch: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--lengths", str(length), "--model", args.model]
    cmd += ["--depths", *map(str, args.depths), "--needles", str(args.needles), "--batch", str(batch)]
    if args.profile:
        cmd += ["--profile", args.profile]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} at {length} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    parser.add_argument("--model", help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--needles", type=Path, default=SHARED / "retrieval-head" / "needles.jsonl")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="needles heads' batch sizes (one row each)")
    parser.add_argument("--profile", help="write a cProfile of each side's detection into this folder")
    parser.add_argument(
        "--interleaved", type=int, metavar="ROUNDS", help="instead: both sides in one process, alternating"
    )
    parser.add_argument("--num-needles", type=int, default=3, help="the first N reference needles (default 3)")
    parser.add_argument("--out", help="also write the measurements as JSON here")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from harness_ext.data.models import smollm2_path

        args.model = str(smollm2_path())
    if args.worker:
        w = worker(args.worker, args.model, args.lengths[0], args.depths, args.needles, args.batch[0], args.profile)
        print(json.dumps(w))
        return 0

    if args.interleaved:
        from bench_heads_floor import run_floor  # benchmarks/ is this script's folder, hence on sys.path

        return run_floor(args)
    import numpy as np

    rows, ok = [], True
    for length, batch in ((n, b) for n in args.lengths for b in args.batch):
        ours = run_side("ours", args, length, batch)
        if rows and rows[-1][0] == length:
            ref = rows[-1][2]  # the reference does not depend on our batch size: measured once per length
        else:
            ref = run_side("reference", args, length)
        same_counts = all(a[0] == b[0] for a, b in zip(ours["per_probe"], ref["per_probe"]))
        same_replies = all(a[1:] == b[1:] for a, b in zip(ours["per_probe"], ref["per_probe"]))
        max_diff = float(np.abs(np.asarray(ours["scores"]) - np.asarray(ref["scores"])).max())
        same = same_counts and same_replies and max_diff <= 1e-9
        ok &= same
        rows.append((length, ours, ref, same_counts, same_replies, max_diff))
        print(
            f"{length} (batch {batch}): ours {ours['seconds']:.1f}s / {ours['working_mb']:.0f} MB, "
            f"reference {ref['seconds']:.1f}s / {ref['working_mb']:.0f} MB, identical={same}",
            file=sys.stderr,
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps([r[1:3] for r in rows], indent=1), encoding="utf-8")

    n = rows[0][1]["probes"]
    print(f"\nRetrieval-head detection, {n} NIAH probes per length (depths {args.depths}), {Path(args.model).name}\n")
    print(
        "| length (prompt tokens) | batch | needles heads s | reference s | speed-up | needles heads working / peak MB "
        "| reference working / peak MB | memory ratio | retrieved | identical counts, replies | max score diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for length, o, r, sc, sr, diff in rows:
        toks = f"{min(o['prompt_tokens'])}-{max(o['prompt_tokens'])}"
        retrieved = sum(p[2] for p in o["per_probe"])
        print(
            f"| {length} ({toks}) | {o['batch']} | {o['seconds']:.1f} | {r['seconds']:.1f} "
            f"| {r['seconds'] / o['seconds']:.1f}x "
            f"| {o['working_mb']:.0f} / {o['peak_mb']:.0f} | {r['working_mb']:.0f} / {r['peak_mb']:.0f} "
            f"| {o['working_mb'] / max(r['working_mb'], 1e-9):.2f} | {retrieved}/{o['probes']} | {sc}, {sr} | {diff:.1e} |"
        )
    print(f"\nmust (identical counts, replies and scores at every length and batch): {'PASS' if ok else 'FAIL'}")
    for batch in args.batch:
        mine = [r for r in rows if r[1]["batch"] == batch]
        fast = all(r[2]["seconds"] >= 5 * r[1]["seconds"] for r in mine)
        small = all(r[1]["working_mb"] <= 0.5 * r[2]["working_mb"] for r in mine)
        print(
            f"batch {batch}: goal >= 5x faster: {'met' if fast else 'not met'}; "
            f"goal <= half the working memory: {'met' if small else 'not met'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
