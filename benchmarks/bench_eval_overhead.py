"""Evaluation overhead: lm-eval + this plugin vs raw vLLM on one engine, same prompts, same sampling.

Run: python benchmarks/bench_eval_overhead.py [--sizes 4 8] [--tasks kv1k kv4k niah mdqa kv8k kv16k] [--out FILE.json]
(mdqa = the 20-document setting on the fixture built from the real oracle file, as the test suite does;
kv8k / kv16k = 7,680 / 15,872-token prompts, not in the default set: the 16K one serves SmolLM2 past its 8K window
with the training-free YaRN override ``needles`` suggests, ``harness_ext.core.rope.suggested_overrides``)
(wrap it in ``flock /tmp/needles-heavy.lock`` on a shared machine: it starts vLLM).

Tasks that need another engine window (4K, 8K, 16K + RoPE override) run in one child process per window, so each
engine starts clean and its memory goes with it; the parent merges the children's measurements.

One ``vllm.LLM`` per window is built once (engine start not timed) with the project's CPU engine options
(harness_ext.plugin.runner.VLLM_CPU_ARGS, and the ``max_num_seqs`` cap its eval commands add for long windows)
inside lm-eval's own ``VLLM`` model class, the object
``lm_eval run --model vllm`` builds. Per task and workload size:

* harness: ``lm_eval.simple_evaluate(model=<that VLLM>, tasks=[task], metadata=..., apply_chat_template=True,
  log_samples=True)`` as a user calls it (a fresh TaskManager each call). The engine's ``generate`` is
  wrapped to capture the exact token prompts and SamplingParams lm-eval sends, and to time it.
* raw: ``LLM.generate`` on the captured prompts and sampling parameters, nothing else. The captured
  prompts are checked against the logged samples (the tokenized ``arguments`` lm-eval recorded), and the
  replies of both sides are compared. vLLM's prefix cache is reset before every timed run of either side.

The first run of each task uses an empty ``NEEDLES_CACHE_DIR`` (cold: data generation included); the
fit uses the cached runs. With harness time T_h(n) and raw time T_r(n) for n prompts, the two-size fit
gives fixed cost per run and marginal cost per prompt of each side. Must: marginal(harness) <= 1.10 x
marginal(raw) for every task (exit 1 otherwise). Phase timers split the harness run: lm-eval's
TaskManager index, task building (of which this plugin's data loading), the plugin's length guard, the
engine, and the rest of lm-eval (request building, tokenization, metrics).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEEDLES_SHARED_DATA", REPO.parent / "shared" / "data"))
MUST_RATIO = 1.10
MAX_MODEL_LEN = 4608  # 4K prompts + max_gen_toks fit (the plugin's length guard refuses what does not)
DEFAULT_TASKS = ("kv1k", "kv4k", "niah", "mdqa")
# label -> engine window (max_model_len); a window past the model's own gets the suggested RoPE override
WINDOWS = {"kv8k": 8192, "kv16k": 16384}

# label -> (lm-eval task, metadata for n prompts, default sizes)
TASKS = {
    "kv1k": ("kv_retrieval_simple", lambda n: {"lengths": [1024], "depths": [0.5], "num_samples": n}, (2, 4)),
    "kv4k": ("kv_retrieval_simple", lambda n: {"lengths": [4096], "depths": [0.5], "num_samples": n}, (1, 2)),
    "niah": (
        "niah_single",
        lambda n: {"niah_lengths": [1024], "niah_depths": [0.5], "niah_num_samples": n},
        (2, 4),
    ),
    "mdqa": (  # the mdqa20 setting: 20 documents, gold in the middle, on the fixture built from the real oracle
        "mdqa_sweep",
        lambda n: {
            "mdqa_num_documents": 20,
            "mdqa_positions": [10],
            "mdqa_num_questions": n,
            "allow_unofficial_data": True,
        },
        (2, 4),
    ),
    # the lengths of the extension experiment (examples/experiments/smollm2_extend_cpu.yaml): a window minus room
    # for the reply and the chat template
    "kv8k": ("kv_retrieval_simple", lambda n: {"lengths": [7680], "depths": [0.5], "num_samples": n}, (1, 2)),
    "kv16k": ("kv_retrieval_simple", lambda n: {"lengths": [15872], "depths": [0.5], "num_samples": n}, (1, 2)),
}


class PhaseTimer:
    """Seconds spent inside wrapped callables, per phase (outermost call only, so recursion is not double-counted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = self._depth.get(phase, 0)
            self._depth[phase] = depth + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[phase] = depth
                if depth == 0:
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


class EngineCapture:
    """Replaces ``llm.generate`` on the instance: records prompts, sampling params and replies; times the engine."""

    def __init__(self, llm, timer: PhaseTimer) -> None:
        self.original = llm.generate
        self.calls: list[tuple[list[dict], list]] = []
        self.replies: list[str] = []
        llm.generate = timer.wrap("engine generate", self._generate)

    def _generate(self, prompts, sampling_params=None, **kwargs):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append(([dict(p) for p in prompts], [p.clone() for p in params]))
        out = self.original(prompts, sampling_params=sampling_params, **kwargs)
        self.replies.extend(o.outputs[0].text for o in out)
        return out

    def reset(self) -> None:
        self.calls, self.replies = [], []


def raw_generate(llm, original_generate, calls) -> tuple[float, list[str]]:
    """vLLM alone on the captured requests (same batching as lm-eval: one generate call per captured call)."""
    from vllm.inputs import TokensPrompt

    batches = [([TokensPrompt(**p) for p in prompts], [sp.clone() for sp in params]) for prompts, params in calls]
    llm.reset_prefix_cache()
    replies = []
    t0 = time.perf_counter()
    for prompts, params in batches:
        out = original_generate(prompts, sampling_params=params, use_tqdm=False)
        replies.extend(o.outputs[0].text for o in out)
    return time.perf_counter() - t0, replies


def logged_prompts(results: dict, task: str) -> list[str]:
    return [args[0] for s in results["samples"][task] for args in s["arguments"]]  # (context, gen_kwargs)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (fixed, per-prompt) over (n, seconds) points."""
    n_mean = sum(n for n, _ in points) / len(points)
    t_mean = sum(t for _, t in points) / len(points)
    var = sum((n - n_mean) ** 2 for n, _ in points)
    slope = sum((n - n_mean) * (t - t_mean) for n, t in points) / var
    return t_mean - slope * n_mean, slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--sizes", type=int, nargs="+", help="workload sizes (prompts per run) for every task")
    parser.add_argument("--model", help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--out", help="also write the measurements as JSON here")
    args = parser.parse_args()
    groups: dict[int, list[str]] = {}
    for label in args.tasks:
        groups.setdefault(WINDOWS.get(label, MAX_MODEL_LEN), []).append(label)
    if len(groups) > 1:
        return run_children(args, list(groups.values()))

    from harness_ext.plugin.runner import lm_eval_env, vllm_model_args

    os.environ.update(lm_eval_env())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    work = Path(tempfile.mkdtemp(prefix="needles-bench-eval-"))
    if "mdqa" in args.tasks and "NEEDLES_MDQA_MIRROR" not in os.environ:
        # the shared copy of Lost in the Middle holds the oracle file, not the 20-document files
        from harness_ext.tasklib.mdqa_fixture import build_fixture

        oracle = SHARED / "lost-in-the-middle" / "qa_data" / "nq-open-oracle.jsonl.gz"
        build_fixture(oracle, work / "mdqa", settings=(20,), num_questions=50, progress=False)
        os.environ["NEEDLES_MDQA_MIRROR"] = str(work / "mdqa")
    os.environ.setdefault("NEEDLES_NIAH_MIRROR", str(niah_mirror(work / "niah-mirror")))

    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    from harness_ext.data.models import smollm2_path
    from harness_ext.plugin import registration
    from harness_ext.plugin.task_base import NeedlesTask

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    timer = PhaseTimer()
    TaskManager.__init__ = timer.wrap("TaskManager index (lm-eval)", TaskManager.__init__)
    TaskManager.load = timer.wrap("task build (lm-eval + plugin)", TaskManager.load)
    NeedlesTask.download = timer.wrap("data load (plugin)", NeedlesTask.download)
    registration.check_prompt_lengths = timer.wrap("length guard (plugin)", registration.check_prompt_lengths)

    model = args.model or str(smollm2_path())
    window = next(iter(groups))
    engine_args, overrides = engine_options(model, window)
    t0 = time.perf_counter()
    extra = {"batch_size": "auto", **({"hf_overrides": overrides} if overrides else {})}
    lm = VLLM.create_from_arg_string(vllm_model_args(model, window, engine_args), extra)
    print(f"engine start (not timed below): {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    capture = EngineCapture(lm.model, timer)

    report: dict = {
        "model": model,
        "tasks": {},
        "engines": {str(window): {"args": engine_args, "hf_overrides": overrides}},
    }
    ok = True
    for label in args.tasks:
        task, meta_for, default_sizes = TASKS[label]
        sizes = sorted(args.sizes or default_sizes)
        os.environ["NEEDLES_CACHE_DIR"] = str(work / f"cache-{label}")  # cold for this task's first run
        runs = []
        for i, n in enumerate([sizes[0], *sizes]):
            cold = i == 0
            meta = {"pretrained": model, **meta_for(n)}
            capture.reset()
            timer.take()
            lm.model.reset_prefix_cache()  # the previous run's prompts must not be served from vLLM's prefix cache
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], metadata=meta, apply_chat_template=True, log_samples=True
            )
            t_harness = time.perf_counter() - t0
            phases = timer.take()
            prompts = [p["prompt_token_ids"] for call, _ in capture.calls for p in call]
            sent = sorted(lm.tok_encode(logged_prompts(res, task)))
            row = {"n": len(prompts), "cold": cold, "harness_s": t_harness, "phases": phases}
            row["prompts_match_logged_samples"] = sorted(prompts) == sent
            ok &= row["prompts_match_logged_samples"]
            if not cold:
                t_raw, replies = raw_generate(lm.model, capture.original, capture.calls)
                row.update(raw_s=t_raw, same_replies=sum(a == b for a, b in zip(replies, capture.replies)))
            row["prompt_tokens"] = sum(map(len, prompts))
            runs.append(row)
            print(f"{label} n={n} {'cold' if cold else 'cached'}: {json.dumps(row)}", file=sys.stderr, flush=True)
            if args.out:  # partial results survive a failure later in the run
                Path(args.out).write_text(json.dumps({**report, "partial": {label: runs}}, indent=1), encoding="utf-8")
        warm = [r for r in runs if not r["cold"]]
        h_fixed, h_marg = fit([(r["n"], r["harness_s"]) for r in warm])
        r_fixed, r_marg = fit([(r["n"], r["raw_s"]) for r in warm])
        ratio = h_marg / r_marg
        ok &= ratio <= MUST_RATIO
        report["tasks"][label] = {
            "task": task,
            "runs": runs,
            "harness_fixed_s": h_fixed,
            "harness_per_prompt_s": h_marg,
            "raw_fixed_s": r_fixed,
            "raw_per_prompt_s": r_marg,
            "marginal_ratio": ratio,
            "cold_minus_cached_s": runs[0]["harness_s"] - warm[0]["harness_s"],
        }
    shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\nmust (marginal harness <= {MUST_RATIO:.2f}x raw vLLM per prompt, every task): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def engine_options(model: str, window: int) -> tuple[str, dict | None]:
    """What the plugin's eval commands add for this window on CPU: the ``max_num_seqs`` cap (runner.cpu_max_num_seqs)
    and, past the model's own window, the training-free YaRN override a user would try first."""
    from harness_ext.core.rope import read_config_json, rope_window, suggested_overrides
    from harness_ext.plugin.runner import cpu_max_num_seqs

    config = read_config_json(model) or {}
    cap = cpu_max_num_seqs(config, window)
    native = rope_window(config)
    overrides = suggested_overrides(config, window) if native and window > native else None
    return (f"max_num_seqs={cap}" if cap else ""), overrides


def run_children(args: argparse.Namespace, groups: list[list[str]]) -> int:
    """One child process per engine window; merge their reports (exit 1 when any child's must fails)."""
    report: dict = {"tasks": {}, "engines": {}}
    ok = True
    with tempfile.TemporaryDirectory(prefix="needles-bench-eval-") as tmp:
        for i, labels in enumerate(groups):
            out = Path(tmp) / f"child{i}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--tasks", *labels, "--out", str(out)]
            cmd += [
                *(["--sizes", *map(str, args.sizes)] if args.sizes else []),
                *(["--model", args.model] if args.model else []),
            ]
            print(f"[bench_eval_overhead] {' '.join(labels)} in their own engine", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd, stdout=sys.stderr).returncode
            if not out.is_file() or "partial" in (child := json.loads(out.read_text(encoding="utf-8"))):
                print(f"[bench_eval_overhead] the child for {' '.join(labels)} failed (exit {rc})", file=sys.stderr)
                return 1
            ok &= rc == 0
            report["model"] = child["model"]
            report["tasks"].update(child["tasks"])
            report["engines"].update(child["engines"])
            if args.out:
                Path(args.out).write_text(json.dumps({**report, "partial": True}, indent=1), encoding="utf-8")
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\nmust (marginal harness <= {MUST_RATIO:.2f}x raw vLLM per prompt, every task): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def print_report(report: dict) -> None:
    print(
        "\n| task | n (cached runs) | harness s | raw vLLM s | total ratio | harness fixed s | harness s/prompt "
        "| raw s/prompt | marginal ratio | same replies | cold run s (n) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---|---|")
    for label, t in report["tasks"].items():
        warm = [r for r in t["runs"] if not r["cold"]]
        cold = t["runs"][0]
        print(
            f"| {label} ({t['task']}) | {_join(warm, '{n}')} | {_join(warm, '{harness_s:.1f}')} "
            f"| {_join(warm, '{raw_s:.1f}')} | {_join(warm, '{ratio:.2f}x')} | {t['harness_fixed_s']:.1f} "
            f"| {t['harness_per_prompt_s']:.2f} | {t['raw_per_prompt_s']:.2f} | {t['marginal_ratio']:.2f}x "
            f"| {_join(warm, '{same_replies}/{n}')} | {cold['harness_s']:.1f} ({cold['n']}) |"
        )
    print("\nWhere a cached harness run's seconds go (mean over the cached runs of each task):\n")
    names = sorted({p for t in report["tasks"].values() for r in t["runs"] for p in r["phases"]})
    print("| task | total | " + " | ".join(names) + " | rest of lm-eval |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for label, t in report["tasks"].items():
        warm = [r for r in t["runs"] if not r["cold"]]
        total = sum(r["harness_s"] for r in warm) / len(warm)
        ph = {p: sum(r["phases"].get(p, 0.0) for r in warm) / len(warm) for p in names}
        top = (
            "TaskManager index (lm-eval)",
            "task build (lm-eval + plugin)",
            "engine generate",
            "length guard (plugin)",
        )
        rest = total - sum(ph.get(p, 0.0) for p in top)  # data load runs inside task build
        print(f"| {label} | {total:.2f} | " + " | ".join(f"{ph[p]:.2f}" for p in names) + f" | {rest:.2f} |")


def _join(rows: list[dict], fmt: str) -> str:
    return " / ".join(fmt.format(ratio=r.get("harness_s", 0) / r.get("raw_s", 1), **r) for r in rows)


def niah_mirror(out: Path) -> Path:
    """The retrieval-head files in the upstream layout (the shared copy keeps needles.jsonl at its root)."""
    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES

    src_root = SHARED / "retrieval-head"
    for rel in RETRIEVAL_HEAD.files:
        src = src_root / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    return out


if __name__ == "__main__":
    sys.exit(main())
