"""What a study will cost, printed by ``needles study --dry-run`` (and before a run): training tokens per run,
lm_eval prompts per evaluation, and the prompts the head steps decode (detection, knockout, patching).

Counted from the config alone, no model or data loaded, with the rules of :mod:`harness_ext.workflow.cost`:
prompts whose length is a target (KV, NIAH, MuSiQue, SummHay: at most the target) are counted at the target; the
prompts of data read at run time (MDQA, FLenQA, general tasks) are counted as items without tokens.
"""

from __future__ import annotations

from harness_ext.study.steps import Study, merged_finetune
from harness_ext.workflow.cost import eval_cost_line, training_text

_KNOCKOUT_DEFAULTS = {
    "task": "kv",
    "eval_lengths": [512],
    "eval_depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "eval_samples": 12,
}
_PATCH_PASSES = 2  # the unpatched target and the source, before any patched set


def _items(task: str, options: dict, niah_needles: int | None) -> tuple[int | None, int | None]:
    """(items, prompt tokens) of a knockout / patching eval set; None where it depends on data read at run time."""
    from harness_ext.heads.probes_qa import placements_of

    lengths, depths = options.get("eval_lengths", [512]), options.get("eval_depths", _KNOCKOUT_DEFAULTS["eval_depths"])
    if task in ("musique", "summhay"):
        n = options.get("eval_samples", 12) * len(lengths) * len(placements_of(depths))
    elif task == "niah":
        if niah_needles is None:
            return None, None
        n = niah_needles * len(lengths) * len(depths)
    else:
        n = options.get("eval_samples", 12) * len(lengths) * len(depths)
    return n, n * sum(lengths) // len(lengths)


def _probes(heads: dict, niah_needles: int | None) -> tuple[int | None, int | None]:
    """(probes, prompt tokens) of one detection step (None: counted at run time)."""
    from harness_ext.heads.defaults import DEFAULT_MDQA
    from harness_ext.heads.probes_qa import PROBE_DEFAULTS

    n = tokens = 0
    unknown = False
    for probe in heads.get("probes", ["niah", "kv"]):
        if probe == "kv":
            lengths = heads.get("kv_lengths", [512])
            k = heads.get("kv_samples", 10) * len(lengths) * len(heads.get("kv_depths", [0.0, 0.5, 1.0]))
            n, tokens = n + k, tokens + k * sum(lengths) // len(lengths)
        elif probe == "niah" and niah_needles is not None:
            lengths = heads.get("lengths", [512, 1024])
            k = niah_needles * len(lengths) * len(heads.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0]))
            n, tokens = n + k, tokens + k * sum(lengths) // len(lengths)
        elif probe in PROBE_DEFAULTS:
            meta = {**PROBE_DEFAULTS[probe], **heads.get("qa_metadata", {})}
            lengths = meta[f"{probe}_lengths"]
            count = meta.get("musique_num_questions" if probe == "musique" else "summhay_num_insights")
            k = count * len(lengths) * len(meta.get(f"{probe}_placements", ["early", "spread", "late"]))
            n, tokens = n + k, tokens + k * sum(lengths) // len(lengths)
        elif probe == "mdqa":
            meta = {**DEFAULT_MDQA, **heads.get("mdqa_metadata", {})}
            n += meta["mdqa_num_questions"] * len(meta["mdqa_positions"])
            unknown = True
        else:
            unknown = True
    return n, None if unknown else tokens


def estimate(study: Study, niah_needles: int | None = None) -> dict:
    """The study's cost: per run training tokens; per evaluation lm_eval rows; head-step items and passes."""
    from harness_ext.workflow.cost import estimate as experiment_estimate
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask

    cfg = study.cfg
    suite = [SuiteTask(t.task, "target", t.metric, filter=t.filter, label=t.name) for t in cfg.targets]
    training = {}
    for name, run in study.runs.items():
        exp = ExperimentConfig(name, cfg.model, suite, merged_finetune(cfg, run), cfg.metadata, limit=cfg.limit)
        est = experiment_estimate(exp, study.finetune[name])
        training[name] = {k: est[k] for k in ("training_tokens", "training_rows", "optimizer_steps", "epochs")}
    per_eval = experiment_estimate(exp, study.finetune[name])  # the targets are the same for every run
    runs = len(study.runs)
    head = {"runs": runs, "training": training, "evaluations": runs + 1, "eval": per_eval["eval"]}
    head["eval_not_estimated"] = per_eval["not_estimated"]
    if not cfg.head_steps:
        return {**head, "heads": None, "knockout": None, "patching": None}
    probes, probe_tokens = _probes(cfg.heads, niah_needles)
    ko = {**_KNOCKOUT_DEFAULTS, **cfg.knockout}
    ko_items, ko_tokens = _items(ko["task"], ko, niah_needles)
    draws = cfg.knockout.get("draws", cfg.draws)
    patch = {**_KNOCKOUT_DEFAULTS, **cfg.patching}
    p_items, p_tokens = _items(patch["task"], patch, niah_needles)
    sets = cfg.patching.get("sets", ["intersection", "complement", "random"])
    p_passes = _PATCH_PASSES + sum(cfg.patching.get("draws", cfg.draws) if s.startswith("random") else 1 for s in sets)
    return {
        **head,
        "heads": {"steps": runs, "probes": probes, "prompt_tokens": probe_tokens},
        "knockout": {"steps": runs, "items": ko_items, "prompt_tokens": ko_tokens, "passes": 2 + draws},
        "patching": {"steps": runs - len(cfg.seeds), "items": p_items, "prompt_tokens": p_tokens, "passes": p_passes},
    }


def _n(value: int | None, unit: str = "") -> str:
    return "? (read at run time)" if value is None else f"{value:,}{unit}"


def format_study_cost(est: dict) -> str:
    """The estimate as the lines ``needles study --dry-run`` prints."""
    lines = [f"[needles study] cost estimate ({est['runs']} finetuned runs + the base model; counted from the config)"]
    for name, t in est["training"].items():
        lines.append(f"  finetune:{name}: {training_text(t)}")
    for r in est["eval"]:
        lines.append(f"  eval x{est['evaluations']}: {eval_cost_line(r, 'prompts')} per evaluation")
    if est["eval_not_estimated"]:
        lines.append(f"  eval: not estimated (data read at run time): {', '.join(est['eval_not_estimated'])}")
    h = est["heads"]
    if h is None:
        return "\n".join([*lines, "  heads, knockout, patching: none (heads: false)"])
    lines.append(f"  heads x{h['steps']}: {_n(h['probes'])} probes, ~{_n(h['prompt_tokens'])} prompt tokens each step")
    for kind in ("knockout", "patching"):
        k = est[kind]
        lines.append(
            f"  {kind} x{k['steps']}: {_n(k['items'])} items x {k['passes']} decoding passes, "
            f"~{_n(k['prompt_tokens'])} prompt tokens per pass"
        )
    return "\n".join(lines)
