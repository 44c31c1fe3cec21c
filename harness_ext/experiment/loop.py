"""The paper's central loop in one call: score the base model, finetune it, score the result, compare.

Both scores come from the real ``lm_eval --model vllm`` on the same held-out documents (the
finetuning data uses another generator seed and is hash-checked against them); the adapter run
uses exactly the command the finetune manifest prints (``lora_local_path`` + ``max_lora_rank``).
The comparison is paired: per-document outcomes joined on ``doc_id`` (document hashes must
match), an exact one-sided McNemar test on the discordant pairs (harness_ext.core.stats).

The training recipe and the held-out evaluation set are the packaged
``harness_ext/finetune/configs/smollm2_kv_lora.yaml`` (also shipped as
examples/finetune/smollm2_kv_lora.yaml for ``needles finetune --config``).
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Callable
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic, write_json_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.core.stats import mcnemar_one_sided
from harness_ext.finetune.config import packaged_config, read_yaml

LOOP_CONFIG = "smollm2_kv_lora.yaml"
# keys of the packaged recipe that the loop sets itself (model, folders, the task it scores)
_SET_BY_THE_LOOP = ("model", "output_dir", "method", "eval_tasks", "eval_metadata")


def _packaged_defaults() -> tuple[dict, dict]:
    values = read_yaml(packaged_config(LOOP_CONFIG))
    return {k: v for k, v in values.items() if k not in _SET_BY_THE_LOOP}, dict(values["eval_metadata"])


# LoRA that fits ~5 minutes of CPU training for SmolLM2-135M, and the held-out evaluation set
DEFAULT_TRAINING, DEFAULT_EVAL_METADATA = _packaged_defaults()


def mcnemar_exact(b: int, c: int) -> dict:
    """Exact McNemar on discordant pairs: b = base right / new wrong, c = base wrong / new right.

    ``p_greater``: one-sided P(X >= c) for X ~ Binomial(b + c, 1/2) (the new model is better);
    ``p_two_sided``: twice the smaller tail, capped at 1.
    """
    # core.stats tests "candidate worse than baseline": with the base model as that candidate, its
    # losses are the c pairs only the finetuned model got right
    p_greater = mcnemar_one_sided(losses=c, wins=b)
    p_less = mcnemar_one_sided(losses=b, wins=c)
    return {"b": b, "c": c, "p_greater": p_greater, "p_two_sided": min(1.0, 2 * min(p_greater, p_less))}


def load_samples(output_path: Path, task: str) -> list[dict]:
    """The per-document rows lm_eval logged for ``task`` under ``output_path`` (--log_samples)."""
    found = sorted(glob.glob(str(Path(output_path) / "**" / f"samples_{task}_*.jsonl"), recursive=True))
    if not found:
        raise NeedlesError(f"no samples_{task}_*.jsonl under {output_path}", fix="run lm_eval with --log_samples")
    with open(found[-1], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def paired_outcomes(base_rows: list[dict], new_rows: list[dict], metric: str) -> list[tuple[float, float]]:
    """Per-document (base, new) metric values joined on doc_id; refuses different documents."""
    base = {r["doc_id"]: r for r in base_rows}
    new = {r["doc_id"]: r for r in new_rows}
    if base.keys() != new.keys():
        raise NeedlesError("the two runs scored different document ids", fix="use the same task metadata and --limit")
    pairs = []
    for doc_id in sorted(base):
        a, b = base[doc_id], new[doc_id]
        if a.get("doc_hash") != b.get("doc_hash"):
            raise NeedlesError(f"document {doc_id} differs between the runs (doc_hash)", fix="use the same metadata")
        if metric not in a or metric not in b:
            raise NeedlesError(f"metric {metric!r} is not in the logged samples", fix="use value_acc or both_acc")
        pairs.append((float(a[metric]), float(b[metric])))
    return pairs


def compare(
    base_rows: list[dict], new_rows: list[dict], metrics: list[str], test_metric: str, alpha: float = 0.05
) -> dict:
    """Per metric: both accuracies, the paired McNemar test and, where it is not significant at ``alpha``, the
    minimal detectable effect at the observed n and discordance (``mde``, ``mde_text``: the experiment's
    ``harness_ext.workflow.mde.beside``; the loop has one target, so Holm's first step is ``alpha`` itself).
    ``p_value`` is the test metric's one-sided p."""
    from harness_ext.workflow.mde import beside

    out = {"n": len(base_rows), "metrics": {}}
    for metric in metrics:
        pairs = paired_outcomes(base_rows, new_rows, metric)
        n = len(pairs)
        b = sum(1 for x, y in pairs if x > y)
        c = sum(1 for x, y in pairs if y > x)
        row = {"base": sum(x for x, _ in pairs) / n, "finetuned": sum(y for _, y in pairs) / n, **mcnemar_exact(b, c)}
        if row["p_greater"] >= alpha:
            # what this n could have detected, so "not significant" is not read as "no effect"
            found = beside([x for x, _ in pairs], [y for _, y in pairs], alpha)
            row["mde"], row["mde_text"] = found["mde"], found["text"]
        out["metrics"][metric] = row
    out["test_metric"] = test_metric
    out["p_value"] = out["metrics"][test_metric]["p_greater"]
    return out


def format_table(comparison: dict, base_name: str, alpha: float) -> str:
    """The comparison as a Markdown table (the test metric starred) and its verdict."""
    lines = [
        f"Paired comparison on {comparison['n']} held-out documents "
        f"(exact one-sided McNemar, alpha={alpha}; b = only base right, c = only finetuned right)",
        "",
        f"| metric | {base_name} | finetuned | delta | b | c | p (one-sided) |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, r in comparison["metrics"].items():
        star = " *" if metric == comparison["test_metric"] else ""
        lines.append(
            f"| {metric}{star} | {r['base']:.3f} | {r['finetuned']:.3f} | {r['finetuned'] - r['base']:+.3f} | "
            f"{r['b']} | {r['c']} | {r['p_greater']:.2g} |"
        )
    lines.append("")
    test = comparison["metrics"][comparison["test_metric"]]
    verdict = "significant" if comparison["p_value"] < alpha else "NOT significant"
    if comparison["p_value"] >= alpha and test.get("mde_text"):
        verdict += f" ({test['mde_text']})"
    lines.append(f"* test metric: {comparison['test_metric']}, p = {comparison['p_value']:.3g} -> {verdict}")
    return "\n".join(lines)


def run_loop(
    model: str = "smollm2",
    output_dir: str | Path = "outputs/loop",
    task: str = "kv_retrieval_simple",
    eval_metadata: dict | None = None,
    config: str | Path | None = None,
    overrides: dict | None = None,
    metric: str = "value_acc",
    alpha: float = 0.05,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Score base -> LoRA-finetune -> score adapter -> paired comparison: ``needles experiment`` with a one-task
    suite (same steps, same resumable folders), reported per KV metric. Returns a result dict.

    ``overrides``: FinetuneConfig fields over DEFAULT_TRAINING (and over ``config``, a YAML file),
    e.g. ``{"data": {"num_samples": 200}, "max_steps": 40}`` for a smaller training budget.
    Writes OUTPUT_DIR/{eval_base,finetune,eval_finetuned}/ and OUTPUT_DIR/comparison.{json,md}.
    """
    from harness_ext.experiment.run import run_experiment
    from harness_ext.workflow.suite import ExperimentConfig, SuiteTask

    out = Path(output_dir).expanduser().resolve()
    eval_metadata = dict(DEFAULT_EVAL_METADATA if eval_metadata is None else eval_metadata)
    if config:
        values = {**(overrides or {}), "recipe": str(config)}
    else:
        values = {**DEFAULT_TRAINING, **(overrides or {})}
        values["data"] = {**DEFAULT_TRAINING["data"], **((overrides or {}).get("data") or {})}
    for key in ("model", "output_dir", "eval_tasks", "eval_metadata"):
        values.pop(key, None)
    experiment = ExperimentConfig(
        name="loop",
        model=model,
        suite=[SuiteTask(task=task, role="target", metric=metric)],
        finetune=values,
        metadata=eval_metadata,
        alpha=alpha,
    )
    run_experiment(
        experiment, out, log=log or (lambda msg: print(f"[needles loop] {msg}", file=sys.stderr, flush=True))
    )
    return loop_report(out, task, eval_metadata, metric, alpha)


def loop_report(out: Path, task: str, eval_metadata: dict, metric: str = "value_acc", alpha: float = 0.05) -> dict:
    """The loop's per-metric report (value/dict/both accuracy, exact McNemar each) of a finished experiment folder."""
    out = Path(out)
    plan = {s["name"]: s for s in json.loads((out / "plan.json").read_text(encoding="utf-8"))["steps"]}
    manifest = json.loads((out / "finetune" / "manifest.json").read_text(encoding="utf-8"))
    base_rows, new_rows = load_samples(out / "eval_base", task), load_samples(out / "eval_finetuned", task)
    metrics = [m for m in ("value_acc", "dict_acc", "both_acc") if m in base_rows[0]] or [metric]
    comparison = compare(base_rows, new_rows, metrics, metric, alpha)
    table = format_table(comparison, "base", alpha)
    timings = {}
    for name in ("eval_base", "finetune", "eval_finetuned"):
        marker = json.loads((out / "steps" / f"{name}.json").read_text(encoding="utf-8"))
        timings[f"{name}_s"] = marker["seconds"]
    result = {
        "task": task,
        "eval_metadata": eval_metadata,
        "model": manifest["base_model"],
        "adapter": manifest["outputs"]["adapter"],
        "final_loss": manifest["final_loss"],
        "training": manifest["training"],
        "comparison": comparison,
        "significant": comparison["p_value"] < alpha,
        "alpha": alpha,
        "commands": {"base": plan["eval_base"]["command"], "finetuned": plan["eval_finetuned"]["command"]},
        "timings": timings,
        "table": table,
    }
    write_json_atomic(out / "loop.json", result)
    write_atomic(out / "loop.md", table + "\n")
    print(table)
    return result
