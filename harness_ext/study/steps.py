"""The work of each ``needles study`` step: finetune a variant, score it with lm_eval, detect its retrieval heads,
compare them with the reference variant's, knock heads out, patch heads in, correlate recall with score.

Head detection, comparison, knockout and patching run the ``needles heads`` commands themselves (passed in as
``Study.needles`` by the command line, which owns them), so the study uses exactly the code path a user runs by
hand; their outputs stay in each step's folder. Every step returns what its marker records: numbers and paths
relative to the study folder, never timings, so the report built from the markers is the same on any executor.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.study.config import BASE, DEFAULT_SETS, StudyConfig, Variant

ADAPTER_MODEL = {"lora": "adapter", "full": "model"}  # what finetuning leaves in OUT/runs/RUN/finetune/


@dataclass(frozen=True)
class Run:
    """One finetune of a variant with one seed, and everything measured on it (OUT/runs/NAME/)."""

    name: str
    variant: Variant
    seed: int
    reference: str  # the run of the reference variant with the same seed

    @property
    def is_reference(self) -> bool:
        return self.name == self.reference


@dataclass
class Study:
    """What every step needs: the config, the study folder, the base model, the runs and their finetune configs."""

    cfg: StudyConfig
    out: Path
    base: str
    runs: dict[str, Run]
    finetune: dict  # run name -> FinetuneConfig
    needles: Callable[[list[str]], int]  # runs a `needles` command in this process, returns its exit code
    log: Callable[[str], None]
    in_distribution: dict = field(default_factory=dict)  # run -> its held-out check (study.in_distribution)

    def folder(self, run: str, what: str) -> Path:
        """OUT/runs/RUN/WHAT; the base model's (``base``: its eval only) is OUT/base/WHAT."""
        return self.out / BASE / what if run == BASE else self.out / "runs" / run / what

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.out))

    def model_args(self, run: str) -> tuple[str, str | None]:
        """(model, adapter) of a finetuned run: the base with its LoRA adapter, or the finetuned model folder."""
        ft = self.finetune[run]
        tuned = Path(ft.output_dir) / ADAPTER_MODEL[ft.method]
        return (self.base, str(tuned)) if ft.method == "lora" else (str(tuned), None)


def make_runs(cfg: StudyConfig) -> dict[str, Run]:
    """Variant x seed; a run is named after its variant (``-sSEED`` appended when there are several seeds)."""
    runs = {}
    for seed in cfg.seeds:
        suffix = f"-s{seed}" if len(cfg.seeds) > 1 else ""
        for v in cfg.variants:
            runs[v.name + suffix] = Run(v.name + suffix, v, seed, cfg.reference_variant + suffix)
    return runs


def merged_finetune(cfg: StudyConfig, run: Run) -> dict:
    """Shared finetune keys < the variant's (``data`` merged key by key) < the run's seed."""
    values = json.loads(json.dumps(cfg.finetune))
    for key, value in run.variant.finetune.items():
        if key == "data" and isinstance(value, dict) and isinstance(values.get("data"), dict):
            values["data"] = {**values["data"], **value}
        else:
            values[key] = value
    values["seed"] = run.seed
    return values


def flags(options: dict, rename: dict | None = None) -> list[str]:
    """Option mapping -> `needles heads` flags: lists become several values, true a bare flag, mappings JSON."""
    argv: list[str] = []
    for key, value in options.items():
        key = (rename or {}).get(key, key)
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif key == "chat_template":
                argv.append("--no-chat-template")
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            argv += [flag, str(value)]
    return argv


def call_needles(study: Study, argv: list[str], log_file: Path) -> None:
    """Run ``needles ARGV`` in this process, its output in ``log_file``; a failure names the command and the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            code = study.needles(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    if code != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8").splitlines()[-15:])
        raise NeedlesError(
            f"`needles {shlex.join(argv)}` exited with {code}:\n{tail}",
            fix=f"read {log_file}; fix the study config's option, then rerun the study (finished steps are kept)",
        )


# ----------------------------------------------------------------------------------- finetune and lm_eval
def finetune_run(study: Study, run: str) -> dict:
    """Train the run (resuming its checkpoints); a finished run of the same options and data means it is done."""
    from harness_ext.finetune.finished import finished_or_trained

    ft = study.finetune[run]
    manifest = finished_or_trained(ft)
    return {"manifest": study.rel(Path(ft.output_dir) / "manifest.json"), "final_loss": manifest.get("final_loss")}


def eval_model(study: Study, run: str) -> tuple[str, str | None, int | None]:
    """(model, adapter, LoRA rank) the eval step of ``run`` scores: the base model alone for ``base``."""
    if run == BASE:
        return study.base, None, None
    model, adapter = study.model_args(run)
    ft = study.finetune[run]
    if adapter and ft.merge:  # the merged model: no LoRA kernels in vLLM (1.8x faster on CPU, same weights)
        return str(Path(ft.output_dir) / "merged"), None, None
    return model, adapter, ft.lora_r if adapter else None


def held_out_tasks(checks: dict, run: str) -> list[str]:
    """The held-out tasks the eval step of ``run`` scores besides the targets (``base``: every run's)."""
    return list(dict.fromkeys(c["task"] for name, c in checks.items() if c["task"] and run in (BASE, name)))


def eval_argv(study: Study, run: str) -> list[str]:
    """The lm_eval command that scores a finetuned run (or ``base``) on the targets (vLLM, or transformers)."""
    cfg = study.cfg
    model, adapter, rank = eval_model(study, run)
    out = study.folder(run, "eval")
    # the targets, and the held-out tasks of the in-distribution check (base: every run's; a run: its own)
    tasks = list(dict.fromkeys([t.task for t in cfg.targets] + held_out_tasks(study.in_distribution, run)))
    if cfg.backend == "vllm":
        from harness_ext.plugin.runner import vllm_eval_command
        from harness_ext.study.context import run_overrides

        argv = vllm_eval_command(
            model,
            tasks,
            cfg.metadata,
            cfg.max_model_len,
            Path(adapter) if adapter else None,
            None,
            out,
            cfg.on_gpu,
            rank,
            hf_overrides=run_overrides(study, run, adapter),  # the RoPE the adapter was trained with
        )
    else:
        args = f"pretrained={model},dtype=float32,max_length={cfg.max_model_len}" + (
            f",peft={adapter}" if adapter else ""
        )
        argv = ["lm_eval", "run", "--tasks", ",".join(tasks), "--model", "hf", "--model_args", args]
        argv += ["--apply_chat_template", "--batch_size", str(cfg.batch_size), "--log_samples"]
        if cfg.metadata:
            argv += ["--metadata", json.dumps(cfg.metadata, separators=(",", ":"))]
        argv += ["--output_path", str(out)]
    if cfg.gen_kwargs:
        argv += ["--gen_kwargs", cfg.gen_kwargs]
    if cfg.limit:
        argv += ["--limit", str(cfg.limit)]
    return argv


def eval_run(study: Study, run: str) -> dict:
    """Score the run (or ``base``) with the real lm_eval CLI; the marker keeps each target's metric and stderr."""
    from harness_ext.plugin.runner import load_results
    from harness_ext.workflow.eval_step import run_eval

    out = study.folder(run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    path = run_eval(eval_argv(study, run), out, log_file=out / "lm_eval.log", progress=f"eval:{run}")
    results = load_results(path)
    scores = {}
    for t in study.cfg.targets:
        row = results.get("results", {}).get(t.task, {})
        if t.key not in row:
            have = sorted(k for k in row if "_stderr" not in k and k != "alias")
            raise NeedlesError(
                f"lm_eval reported no {t.key} for {t.task} (it has {have[:12]})",
                fix=f"set the target's metric (and filter) to one of those, e.g. metric: {have[0].split(',')[0]}"
                if have
                else "check the task name",
            )
        stderr = row.get(f"{t.metric}_stderr,{t.filter}")
        n = results.get("n-samples", {}).get(t.task, {}).get("effective")
        scores[t.name] = {
            "value": round(float(row[t.key]), 6),
            "stderr": round(float(stderr), 6) if isinstance(stderr, (int, float)) else None,
            "n": n,
        }
    return {"results": study.rel(path), "scores": scores}


# ----------------------------------------------------------------------------------- retrieval heads
def heads_argv(study: Study, run: str) -> list[str]:
    model, adapter = study.model_args(run)
    argv = ["heads", "--model", model, *(["--adapter", adapter] if adapter else [])]
    return [*argv, "-o", str(study.folder(run, "heads")), "-q", *flags(study.cfg.heads)]


def heads_run(study: Study, run: str) -> dict:
    from harness_ext.heads.scorefile import load_head_scores
    from harness_ext.heads.scores import head_set

    folder = study.folder(run, "heads")
    call_needles(study, heads_argv(study, run), folder / "needles.log")
    saved = load_head_scores(folder / "heads.json")
    report = json.loads((folder / "heads.json").read_text(encoding="utf-8"))
    heads = sorted(head_set(saved.scores, saved.threshold))
    return {
        "heads_file": study.rel(folder / "heads.json"),
        "threshold": saved.threshold,
        "num_heads": len(heads),
        "heads": [list(h) for h in heads],
        "grid": [saved.num_layers, saved.num_heads],
        "probes_retrieved": [report.get("num_retrieved"), len(report.get("probes", []))],
        "scores": saved.scores.round(6).tolist(),
    }


def compare_argv(study: Study, run: str) -> list[str]:
    ref = study.runs[run].reference
    a, b = study.folder(ref, "heads") / "heads.json", study.folder(run, "heads") / "heads.json"
    return ["heads", "compare", str(a), str(b), "-o", str(study.folder(run, "recall") / "compare.json")]


def recall_run(study: Study, run: str) -> dict:
    """Overlap with the reference run's heads (A = reference, B = this run): Zhao et al.'s recall is
    |H_run ∩ H_ref| / |H_ref| (``recall_a_in_b`` of ``needles heads compare``)."""
    folder = study.folder(run, "recall")
    call_needles(study, compare_argv(study, run), folder / "needles.log")
    c = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    return {
        "compare": study.rel(folder / "compare.json"),
        "recall": c["recall_a_in_b"],
        "precision": c["recall_b_in_a"],
        "jaccard": c["jaccard"],
        "spearman_all_heads": c["spearman_all_heads"],
        "num_shared": c["num_shared"],
    }


def knockout_argv(study: Study, run: str) -> list[str]:
    cfg, (model, adapter) = study.cfg, study.model_args(run)
    k, seed = cfg.k, study.runs[run].seed
    argv = ["heads", "--model", model, *(["--adapter", adapter] if adapter else [])]
    argv += ["--scores", str(study.folder(run, "heads") / "heads.json"), "--knockout", f"top:{k}"]
    argv += ["--knockout", f"random:{k}", "--draws", str(cfg.knockout.get("draws", cfg.draws)), "--seed", str(seed)]
    options = {key: v for key, v in cfg.knockout.items() if key != "draws"}
    return [*argv, "-o", str(study.folder(run, "knockout")), "-q", *flags(options, {"task": "knockout_task"})]


def _heads_report(study: Study, run: str, kind: str, argv: list[str]) -> tuple[dict, dict]:
    """Run one `needles heads` step (``kind``: knockout, patch) into the run's folder of that name: (its report
    ``<kind>.json``, the record's first fields: where the report is and what it scored)."""
    folder = study.folder(run, kind)
    call_needles(study, argv, folder / "needles.log")
    r = json.loads((folder / f"{kind}.json").read_text(encoding="utf-8"))
    return r, {kind: study.rel(folder / f"{kind}.json"), **{key: r[key] for key in ("task", "metric", "num_items")}}


def knockout_run(study: Study, run: str) -> dict:
    r, record = _heads_report(study, run, "knockout", knockout_argv(study, run))
    cond = {c["kind"]: c for c in r["conditions"]}
    tvr = r["top_vs_random"][0] if r["top_vs_random"] else None
    return {
        **record,
        "baseline": r["baseline"]["accuracy"],
        "top": {key: cond["top"][key] for key in ("accuracy", "delta", "delta_ci95")},
        "random": {key: cond["random"][key] for key in ("accuracy", "delta", "delta_ci95", "draws")},
        "top_minus_random": {"delta": tvr["delta_top_minus_random"], "ci95": tvr["ci95"]} if tvr else None,
    }


def patch_sets(study: Study) -> list[str]:
    """The configured sets, ``random``/``top`` taking the study's K."""
    k = study.cfg.k
    return [f"{s}:{k}" if s in ("random", "top") else s for s in study.cfg.patching.get("sets", list(DEFAULT_SETS))]


def patch_argv(study: Study, run: str, sets: list[str]) -> list[str]:
    cfg, ref = study.cfg, study.runs[run].reference
    (src, src_adapter), (tgt, tgt_adapter) = study.model_args(ref), study.model_args(run)
    argv = ["heads", "patch", "--source", src, *(["--source-adapter", src_adapter] if src_adapter else [])]
    argv += ["--target", tgt, *(["--target-adapter", tgt_adapter] if tgt_adapter else [])]
    argv += ["--source-heads", str(study.folder(ref, "heads") / "heads.json")]
    argv += ["--target-heads", str(study.folder(run, "heads") / "heads.json"), "--sets", *sets]
    argv += ["--draws", str(cfg.patching.get("draws", cfg.draws)), "--seed", str(study.runs[run].seed)]
    options = {key: v for key, v in cfg.patching.items() if key not in ("sets", "draws")}
    return [*argv, "-o", str(study.folder(run, "patch")), "-q", *flags(options)]


def patch_run(study: Study, run: str) -> dict:
    """Patch the reference run's heads into this run. A set that is empty for these two head files (e.g. no
    shared heads) is recorded with the reason and left out; the others are patched."""
    from harness_ext.heads.patch_sets import parse_set, resolve_sets
    from harness_ext.heads.scorefile import load_head_scores

    ref = study.runs[run].reference
    source = load_head_scores(study.folder(ref, "heads") / "heads.json")
    target = load_head_scores(study.folder(run, "heads") / "heads.json")
    threshold = study.cfg.patching.get("threshold")
    feasible, skipped = [], {}
    for text in patch_sets(study):
        try:
            resolve_sets([parse_set(text)], source, target, 1, 0, threshold)
            feasible.append(text)
        except NeedlesError as exc:
            skipped[text] = exc.problem
    folder = study.folder(run, "patch")
    folder.mkdir(parents=True, exist_ok=True)
    if not feasible:
        return {"patch": None, "sets": {}, "skipped": skipped, "intersection_minus_random": []}
    r, record = _heads_report(study, run, "patch", patch_argv(study, run, feasible))
    keep = ("num_heads", "accuracy", "delta", "delta_ci95", "gap_closed", "draws")
    return {
        **record,
        "target_baseline": r["target_baseline"]["accuracy"],
        "source_reference": r["source_reference"]["accuracy"],
        "sets": {s["set"]: {key: s.get(key) for key in keep} for s in r["sets"]},
        "skipped": skipped,
        "intersection_minus_random": [
            {key: t[key] for key in ("random", "delta", "ci95")} for t in r["intersection_minus_random"]
        ],
    }


# ----------------------------------------------------------------------------------- across variants
def correlation(study: Study, done: dict[str, dict]) -> dict:
    """Spearman's rho of recall (vs the reference's heads) with each target's score, across the non-reference
    runs, with a 95% percentile bootstrap interval over runs (harness_ext.core.stats)."""
    from harness_ext.core.stats import spearman_bootstrap

    points = [r for r in study.runs.values() if not r.is_reference]
    out = {"runs": [r.name for r in points], "targets": {}}
    for t in study.cfg.targets:
        pairs = [
            (done[f"recall:{r.name}"]["recall"], done[f"eval:{r.name}"]["scores"][t.name]["value"]) for r in points
        ]
        usable = [(x, y) for x, y in pairs if x is not None]
        res = spearman_bootstrap(
            [x for x, _ in usable], [y for _, y in usable], iters=study.cfg.bootstrap_iters, seed=0
        )
        out["targets"][t.name] = {
            "recall": [x for x, _ in pairs],
            "score": [y for _, y in pairs],
            "n": res.n,
            "spearman": None if res.rho is None else round(res.rho, 6),
            "ci95": None if res.ci is None else [round(res.ci[0], 6), round(res.ci[1], 6)],
            "bootstrap_defined": res.defined,
            "note": _why_undefined(len(pairs), len(usable), res.rho),
        }
    return out


def _why_undefined(n: int, usable: int, rho: float | None) -> str | None:
    if rho is not None:
        return None
    if usable < n:
        return f"{n - usable} of {n} runs have no recall (the reference run has no retrieval heads)"
    if usable < 2:
        return f"{usable} non-reference run(s): a correlation needs at least two (three for an interval)"
    return "recall or score is the same for every run"
