"""Long-sequence LoRA training: `needles finetune` vs TRL's ``SFTTrainer`` vs a plain Trainer + peft, per length.

Per training length L (default 4K / 8K / 16K tokens) every side trains the same model with
the same LoRA (bench_finetune.LORA) on the same chat-formatted KV documents (the very token ids, each just under
L tokens), loss on the answer tokens only, batch 1, the same optimizer steps (``--steps`` documents, one epoch),
lr, schedule and warmup, gradient checkpointing on (``--no-gc`` turns it off on every side). Past the model's
native window every side loads the same YaRN config that ``needles finetune --context-length L --rope-type
yarn`` writes (factor ceil(L / native)).

- needles: ``needles finetune`` (grouped batching; the LM head projects the answer positions only), and again
  with gradient checkpointing off (``needles:no-gc``): the goal takes the fastest needles run whose peak memory
  is no more than TRL's;
- TRL: ``SFTTrainer`` on a tokenized prompt-completion dataset (``input_ids`` + ``completion_mask``,
  ``completion_only_loss=True``), ``padding_free=True`` (default; or ``packing`` bfd with ``max_length`` L),
  its default gradient checkpointing, ``max_length=None`` (nothing truncated);
- baseline: transformers ``Trainer`` + peft, labels -100 on the prompt, the model's own loss.

Each run is its own subprocess, so its peak memory is its own: peak RSS from ``wait4`` (the kernel's
``ru_maxrss`` of that child) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A watchdog kills a run whose
RSS passes ``--kill-above`` GiB (reported as not fitting). tokens/s = real tokens / seconds of the training
loop (model loading excluded); final loss = mean of the last 10 step losses, as in bench_finetune. With ``--json``
the runs are written after each one, and a rerun with the same arguments reuses the finished ones (resumes).

    .venv/bin/python benchmarks/bench_finetune_long.py --lengths 4096 8192 16384 --steps 2 --json long.json
    .venv/bin/python benchmarks/bench_finetune_long.py --fit-memory 24 --lengths 2048 4096 8192 --confirm
    .venv/bin/python benchmarks/bench_finetune_long.py --fit-memory 24 --fit-from long.json   # no new runs

``--fit-memory GIB``: needles alone, one step per length with gradient checkpointing on and off; fits
peak = c0 + c1 L + c2 L^2 (a line with two lengths) and reports the longest multiple of 1,024 tokens whose
predicted peak is under GIB (arithmetic); ``--confirm`` then trains one step at the longest length under the memory
a process can have here (GIB, at most MemTotal - 2 GiB) with the watchdog at that limit (measured).

Goal: needles >= 1.5x TRL's tokens/s at every length, at no more peak memory, final loss within 5%
(needles <= TRL x 1.05). Exit 1 when a length misses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_finetune_long_sides as long_sides  # noqa: E402

from harness_ext.core.atomic_io import write_json_atomic  # noqa: E402

RATIO_REQUIRED = 1.5
SPEED_TOOL = HERE.parent.parent / "shared" / "tools" / "machine_speed.py"
GIB = 2**30


def machine_speed() -> str:
    """The project's speed probe (fp32 GFLOP/s, Python loop), printed beside every time."""
    if not SPEED_TOOL.is_file():
        return "machine_speed.py not found"
    got = subprocess.run([sys.executable, str(SPEED_TOOL)], capture_output=True, text=True, check=False)
    lines = (got.stdout.strip() or got.stderr.strip()).splitlines()
    return lines[-1] if lines else "machine_speed.py printed nothing"


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(spec: dict, kill_above: float | None) -> dict:
    """One side at one length in a fresh process; its result plus peak RSS (wait4) and whether it was killed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sys.stderr)  # the Trainer's log lines stay out of the table
        killed = {"at": 0}
        done = threading.Event()

        def watch() -> None:  # the kernel's peak comes from wait4; this only stops a run past the limit
            while not done.wait(0.5):
                rss = _rss_bytes(proc.pid)
                if kill_above and rss > kill_above * GIB:
                    killed["at"] = rss
                    proc.kill()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        done.set()
        watcher.join()
        result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(
        side=spec["side"],
        length=spec["length"],
        gc=spec["gc"],
        rc=proc.returncode,
        wall_s=time.perf_counter() - t0,
        peak_rss=usage.ru_maxrss * 1024,  # Linux: KiB
        killed_at=killed["at"] or None,
    )
    return result


def peak_of(r: dict) -> int:
    """The memory the goal compares: CUDA peak allocation on a GPU, else the run's peak RSS."""
    return r.get("cuda_peak") or r["peak_rss"]


def fit(xs: list[float], ys: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients, lowest power first (numpy-free: tiny normal equations)."""
    n = degree + 1
    a = [[sum(x ** (i + j) for x in xs) for j in range(n)] for i in range(n)]
    b = [sum(y * x**i for x, y in zip(xs, ys)) for i in range(n)]
    for c in range(n):  # Gauss-Jordan with partial pivoting
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        for r in range(n):
            if r != c and a[c][c]:
                f = a[r][c] / a[c][c]
                a[r] = [u - f * v for u, v in zip(a[r], a[c])]
                b[r] -= f * b[c]
    return [b[i] / a[i][i] if a[i][i] else 0.0 for i in range(n)]


def attention_share(rows: list[dict]) -> dict[int, float]:
    """Seconds per token = a + b L (the weights' cost per token is flat, causal attention's grows with L):
    the share b L / (a + b L) at each measured L. Needs two lengths or more."""
    pts = sorted((r["length"], r["seconds"] / r["real_tokens"]) for r in rows if r.get("seconds"))
    if len({L for L, _ in pts}) < 2:
        return {}
    a, b = fit([L for L, _ in pts], [s for _, s in pts], 1)
    if b <= 0 or a < 0:  # time per token did not grow (noise, fixed costs): no share to read
        return {}
    return {L: b * L / (a + b * L) for L, _ in pts}


def flop_share(model: str, L: int) -> dict[str, float]:
    """Attention's share of the forward FLOPs per token at length L, by arithmetic from config.json: weights
    2 x (q, k, v, o, MLP) per layer (+ the LM head 2 x d x V on every position for TRL and the baseline, on the
    answer only for needles), causal attention 2 x 2 x d x L/2 per layer (scores and values, mean row L/2)."""
    from harness_ext.core.rope import read_config_json
    from harness_ext.finetune.modeling import resolve_model

    c = read_config_json(resolve_model(model)) or {}
    d, n, inter = c.get("hidden_size", 0), c.get("num_hidden_layers", 0), c.get("intermediate_size", 0)
    heads = c.get("num_attention_heads") or 1
    kv = (c.get("num_key_value_heads") or heads) * (c.get("head_dim") or d // heads)
    weights = 2 * n * (2 * d * d + 2 * d * kv + 3 * d * inter)
    attn = 2 * d * L * n
    head = 2 * d * c.get("vocab_size", 0)
    return {"answer_only_head": attn / (weights + attn), "full_head": attn / (weights + attn + head)}


def bench(args: argparse.Namespace) -> int:
    gc = not args.no_gc
    # (label, side, TRL setting, gradient checkpointing); needles also without it: with the LM head on the answer
    # only, its peak may stay under TRL's with checkpointing, which saves the recomputed forward
    sides = [("needles", "needles", None, gc)]
    if gc and not args.needles_gc_only:
        sides.append(("needles:no-gc", "needles", None, False))
    sides += [(f"trl:{s}", "trl", s, gc) for s in args.trl]
    sides += [] if args.no_baseline else [("baseline", "baseline", None, gc)]
    print(f"machine before: {machine_speed()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    began = time.perf_counter()
    rows: list[dict] = []
    done = previous_runs(args.json)
    for L in args.lengths:
        for label, side, setting, side_gc in sides:
            spec = dict(
                side=side, trl_setting=setting, model=args.model, length=L, steps=args.steps,
                gc=side_gc, lr=args.lr, threads=args.threads, margin=args.margin,
            )  # fmt: skip
            if (r := done.get(json.dumps(spec, sort_keys=True))) is not None:
                print(f"[{L}] {label}: done before ({args.json}), reused: {_brief(r)}", file=sys.stderr, flush=True)
                rows.append(r)
                continue
            print(f"[{L}] {label} (gc {'on' if side_gc else 'off'}) ...", file=sys.stderr, flush=True)
            r = run_child(spec, args.kill_above)
            r.update(label=label, spec=spec)
            rows.append(r)
            print(f"  -> {_brief(r)}", file=sys.stderr, flush=True)
            if args.json:  # after every run, so an interrupted benchmark resumes where it stopped
                write_json_atomic(Path(args.json), {"args": vars(args), "runs": [*others(done, rows), *rows]})
    print(f"machine after: {machine_speed()}; load average {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - began:.0f} s in all", flush=True)  # fmt: skip
    ok = report(rows, args)
    if args.json:
        write_json_atomic(Path(args.json), {"args": vars(args), "runs": [*others(done, rows), *rows]})
    return 0 if ok else 1


def previous_runs(path: str | None) -> dict[str, dict]:
    """The successful runs an earlier invocation wrote to ``--json``, by their exact spec (model, length, steps,
    side, settings): a rerun with the same arguments skips them. A failed run is run again."""
    if not path or not Path(path).is_file():
        return {}
    runs = json.loads(Path(path).read_text()).get("runs", [])
    return {
        json.dumps(r["spec"], sort_keys=True): r for r in runs if "spec" in r and r["rc"] == 0 and not r.get("error")
    }


def load_runs(path: str) -> list[dict]:
    """The runs of an earlier ``--json``; exit 2 naming the problem when the file is not one."""
    try:
        runs = json.loads(Path(path).read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: --fit-from {path}: not a --json file of this benchmark ({type(e).__name__}: {e})\n"
              f"  fix: pass the file a run with --json wrote", file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    return runs


def others(done: dict[str, dict], rows: list[dict]) -> list[dict]:
    """The earlier runs this invocation did not reuse (other lengths or settings): they stay in the file."""
    return [r for r in done.values() if not any(r is x for x in rows)]


def _brief(r: dict) -> str:
    if r.get("error") or r["rc"] != 0:
        why = f"killed at {r['killed_at'] / GIB:.1f} GiB" if r.get("killed_at") else r.get("error", f"rc {r['rc']}")
        return f"FAILED ({why}), peak RSS {r['peak_rss'] / GIB:.2f} GiB"
    return (f"{r['tokens_per_s']:.1f} tokens/s, {r['seconds'] / r['steps']:.1f} s/step, peak {peak_of(r) / GIB:.2f} GiB, "
            f"final loss {r['final_loss']:.4f}")  # fmt: skip


def _row(r: dict, ref: dict | None) -> str:
    """One table row; the ratios are against the fastest correct TRL run at the same length."""
    per_step = r["seconds"] / r["steps"]
    vs_speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
    vs_mem = f"{peak_of(r) / peak_of(ref):.2f}x" if ref else ""
    vs_loss = f"{r['final_loss'] / ref['final_loss'] - 1:+.1%}" if ref else ""
    return (f"| {r['length']} | {r['label']} | {r['real_tokens']} ({r['longest']}) | {r['steps']} | {per_step:.1f} | "
            f"{r['tokens_per_s']:.1f} | {vs_speed} | {peak_of(r) / GIB:.2f} | {vs_mem} | {r['final_loss']:.4f} | "
            f"{vs_loss} |")  # fmt: skip


def verdict(L: int, mine: list[dict], ref: dict | None, tol: float) -> bool:
    """Print the goal's verdict at one length: speed ratio, peak memory, final loss, same tokens. Ours is the
    fastest needles variant at no more peak memory than TRL (else the fastest, which then misses on memory)."""
    within = [r for r in mine if ref and peak_of(r) <= peak_of(ref)]
    ours = max(within or mine, key=lambda r: r["tokens_per_s"]) if mine else None
    if ours is None or ref is None:
        print(f"\n{L}: no verdict (needles or a correct TRL run missing)\n")
        return False
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
    mem = peak_of(ours) <= peak_of(ref)
    loss = ours["final_loss"] <= ref["final_loss"] * (1 + tol)
    same = ours["real_tokens"] == ref["real_tokens"]
    met = ratio >= RATIO_REQUIRED and mem and loss and same
    print(f"\n{L}: {ours['label']} / TRL {ref['label'][4:]} = {ratio:.2f}x tokens/s (goal >= {RATIO_REQUIRED}x), peak "
          f"{peak_of(ours) / GIB:.2f} vs {peak_of(ref) / GIB:.2f} GiB, final loss {ours['final_loss']:.4f} vs "
          f"{ref['final_loss']:.4f} (goal <= +{tol:.0%}), same tokens {same}: {'MET' if met else 'MISSED'}\n")  # fmt: skip
    return met


def growth(good: list[dict]) -> None:
    """Per side: how time per token and peak memory grow from one length to the next, and the attention share."""
    for side in dict.fromkeys(r["label"] for r in good):
        mine = sorted((r for r in good if r["label"] == side), key=lambda r: r["length"])
        steps = []
        for a, b in zip(mine, mine[1:]):
            t = (b["seconds"] / b["real_tokens"]) / (a["seconds"] / a["real_tokens"])
            steps.append(f"{a['length']}->{b['length']}: time/token x{t:.2f}, peak x{peak_of(b) / peak_of(a):.2f}")
        shares = ", ".join(f"{L}: {s:.0%}" for L, s in attention_share(mine).items())
        fitted = f"attention share (a + bL fit) {shares}" if shares else "no a + bL fit (time/token did not grow)"
        print(f"{side}: {'; '.join(steps) or 'one length'}; {fitted}")


def report(rows: list[dict], args: argparse.Namespace) -> bool:
    """The per-length table, the goal's verdict per length and the growth with length; True when all met."""
    good = [r for r in rows if r["rc"] == 0 and not r.get("error")]
    print("\n| length | side | tokens (longest) | steps | s/step | tokens/s | vs TRL | peak memory GiB | vs TRL | "
          "final loss | vs TRL |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    ok = True
    for L in args.lengths:
        here = {r["label"]: r for r in good if r["length"] == L}
        trl = [r for k, r in here.items() if k.startswith("trl:") and r.get("correct")]
        ref = max(trl, key=lambda r: r["tokens_per_s"]) if trl else None
        for r in (r for r in rows if r["length"] == L):
            print(_row(r, ref) if r in good else f"| {L} | {r['label']} | | | | | | | | {_brief(r)} | |")
        ok = verdict(L, [r for k, r in here.items() if k.startswith("needles")], ref, args.loss_tol) and ok
    growth(good)
    for L in args.lengths:
        f = flop_share(args.model, L)
        print(f"{L}: attention share of forward FLOPs (arithmetic) {f['answer_only_head']:.0%} with the LM head on "
              f"the answer only (needles), {f['full_head']:.0%} with it on every position (TRL, baseline)")  # fmt: skip
    return ok


def predict(coef: list[float], n: float) -> float:
    return sum(k * n**i for i, k in enumerate(coef))


def longest_under(coef: list[float], limit: float, cap: int) -> int:
    """The longest multiple of the grain (1,024 tokens; 64 when ``cap`` is under 8,192) up to ``cap`` whose fitted
    peak stays under ``limit`` bytes; 0 when none does."""
    grain = 1024 if cap >= 8192 else 64
    L = 0
    while L + grain <= cap and predict(coef, L + grain) <= limit:
        L += grain
    return L


def step_seconds(rows: list[dict], L: int) -> float:
    """One step at L tokens from the measured steps: L x (a + bL) seconds (time per token grows with attention),
    or L x the slowest measured time per token where the fit does not grow."""
    per_token = [r["seconds"] / r["real_tokens"] for r in rows]
    a, b = fit([r["longest"] for r in rows], per_token, 1)
    return L * (a + b * L) if a >= 0 and b >= 0 else L * max(per_token)


def mem_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        return int(f.readline().split()[1]) * 1024  # MemTotal, kB


def fit_memory(args: argparse.Namespace) -> int:
    """The longest length under ``--fit-memory`` GiB for needles, gradient checkpointing on and off: arithmetic
    from one step per length (or, with ``--fit-from``, from the needles rows of an earlier run's ``--json``), then
    (``--confirm``) one step at the longest length under the memory a process can really have here (MemTotal less
    2 GiB), stopped by the watchdog if it passes that."""
    print(f"machine before: {machine_speed()}", flush=True)
    usable = min(args.fit_memory * GIB, mem_total() - 2 * GIB)
    earlier = load_runs(args.fit_from) if args.fit_from else None
    for gc in (True, False):
        mode = f"gc {'on' if gc else 'off'}"
        spec = dict(side="needles", trl_setting=None, model=args.model, steps=1, gc=gc, lr=args.lr,
                    threads=args.threads, margin=args.margin)  # fmt: skip
        if earlier is not None:  # the main run's needles rows: same model, same data, peak of the same process
            found = [r for r in earlier if r.get("side") == "needles" and bool(r.get("gc")) == gc]
            print(f"  {mode}: {len(found)} needles rows from {args.fit_from}", file=sys.stderr, flush=True)
        else:
            found = []
            for L in args.lengths:
                found.append(run_child({**spec, "length": L}, args.kill_above))
                print(f"  {mode} {L}: {_brief(found[-1])}", file=sys.stderr, flush=True)
        rows = [r for r in found if r["rc"] == 0 and not r.get("error")]
        if len(rows) < 2:
            print(f"{mode}: fewer than two lengths ran; no fit")
            continue
        xs = [r["longest"] for r in rows]
        coef = fit(xs, [peak_of(r) for r in rows], 2 if len(rows) >= 3 else 1)
        if coef[-1] < 0 or (len(coef) == 3 and coef[2] < 0):  # a falling curve would never reach the limit
            coef = fit(xs, [peak_of(r) for r in rows], 1)
        L, L_usable = (longest_under(coef, x, args.fit_max) for x in (args.fit_memory * GIB, usable))
        if not L_usable:
            print(f"{mode}: even the shortest length is predicted over the limit ({predict(coef, 1024) / GIB:.2f} GiB)")
            continue
        terms = " + ".join(f"{k / GIB:.3g}" + (f" L^{i}" if i else "") for i, k in enumerate(coef))
        print(f"{mode}: peak GiB = {terms} (measured at {xs}: {[round(peak_of(r) / GIB, 2) for r in rows]}); "
              f"longest under {args.fit_memory:g} GiB: {L} tokens (arithmetic, predicted peak "
              f"{predict(coef, L) / GIB:.2f} GiB, one step ~{step_seconds(rows, L):.0f} s)")  # fmt: skip
        if not args.confirm:
            continue
        step_s = step_seconds(rows, L_usable)
        if step_s > args.confirm_budget:
            print(f"{mode}: no confirming run at {L_usable} (one step ~{step_s:.0f} s > --confirm-budget)")
            continue
        r = run_child({**spec, "length": L_usable}, usable / GIB)
        fits = r["rc"] == 0 and not r.get("error")
        print(f"{mode}: confirming run at {L_usable} tokens under {usable / GIB:.1f} GiB (the limit, at most MemTotal - 2 GiB): "
              f"{_brief(r)} -> {'fits (measured)' if fits else 'does NOT fit'}")  # fmt: skip
    print(f"machine after: {machine_speed()}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 or a local model folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="training lengths L")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (= documents, batch 1) per run")
    ap.add_argument("--margin", type=int, default=96, help="data target = L - margin (chat template + answer)")
    ap.add_argument("--trl", nargs="+", default=["padding_free"], choices=list(long_sides.TRL_LONG))
    ap.add_argument("--no-baseline", action="store_true", help="leave out Trainer + peft")
    ap.add_argument("--no-gc", action="store_true", help="gradient checkpointing off on every side")
    ap.add_argument("--needles-gc-only", action="store_true", help="leave out the needles run without it")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--loss-tol", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--kill-above", type=float, help="GiB of RSS at which a run is stopped (MemTotal - 1.5)")
    ap.add_argument("--fit-memory", type=float, help="GiB: find the longest length that fits (needles)")
    ap.add_argument("--fit-from", help="with --fit-memory: fit the needles rows of this earlier --json (no new runs)")
    ap.add_argument("--fit-max", type=int, default=262144, help="with --fit-memory: the longest length searched")
    ap.add_argument("--confirm-budget", type=float, default=3600, help="skip a confirming step predicted longer (s)")
    ap.add_argument("--confirm", action="store_true", help="with --fit-memory: one confirming run per setting")
    ap.add_argument("--json", help="also write the runs here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return long_sides.child_main(json.loads(args.child), Path(args.child_out))
    if args.kill_above is None:  # before the kernel's OOM killer, which would take the parent too
        args.kill_above = round(mem_total() / GIB - 1.5, 1)
    return fit_memory(args) if args.fit_memory else bench(args)


if __name__ == "__main__":
    sys.exit(main())
