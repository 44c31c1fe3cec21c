"""lm-eval results files and sample logs written by hand (what `lm_eval --log_samples` leaves), for the workflow
tests: every value is chosen, so floor, ceiling and pairing are known."""

from __future__ import annotations

import json
from pathlib import Path

DATE = "2026-01-01T00-00-00.000000"


def plant_run(
    folder: Path,
    per_task: dict[str, tuple[str, list[tuple[str, int | None, float]]]],
    length_key: str = "target_tokens",
) -> Path:
    """{task: (metric, [(doc key, length or None, value)])} -> results_<date>.json and samples_<task>_<date>.jsonl;
    ``length_key``: the document field holding the length (needles_long_ppl's is ``context_tokens``)."""
    folder.mkdir(parents=True, exist_ok=True)
    results, configs = {}, {}
    for task, (metric, docs) in per_task.items():
        mean = sum(v for _, _, v in docs) / len(docs)
        results[task] = {"alias": task, f"{metric},none": mean, f"{metric}_stderr,none": 0.05}
        configs[task] = {"task": task, "metadata": {"needles_data_sha256": "ab" * 32}}
        rows = [
            {"doc_id": i, "filter": "none", "doc_hash": f"{task}:{key}", "prompt_hash": f"p{key}",
             "target_hash": f"t{key}", "doc": {length_key: length}, "metrics": [metric], metric: value}
            for i, (key, length, value) in enumerate(docs)
        ]  # fmt: skip
        (folder / f"samples_{task}_{DATE}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {
        "results": results,
        "configs": configs,
        "versions": dict.fromkeys(per_task, 1.0),
        "n-shot": dict.fromkeys(per_task, 0),
        "higher_is_better": {t: {m: m not in ("nll", "ppl")} for t, (m, _) in per_task.items()},
        "n-samples": {t: {"original": len(d), "effective": len(d)} for t, (_, d) in per_task.items()},
        "config": {"model": "vllm", "model_args": "pretrained=/models/m"},
        "date": 1795240155.5,
    }
    path = folder / f"results_{DATE}.json"
    path.write_text(json.dumps(data))
    return path


def values(task: str, metric: str, vals: list[float], length: int | None = None, start: int = 0) -> dict:
    """One task's entry of :func:`plant_run`: documents start.. with these values."""
    return {task: (metric, [(str(start + i), length, v) for i, v in enumerate(vals)])}
