"""Synthetic lm-eval runs for the reporting tests: a results JSON in lm-eval 0.4's schema and its sample log.

Small and fast on purpose (no model runs); the real lm-eval output is covered by test_leaderboard_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

DATE_ID = "2026-01-01T00-00-00.000000"


def write_run(
    folder: Path,
    values: list[float],
    model: str = "SmolLM2",
    task: str = "kv_retrieval",
    metric: str = "value_acc",
    date: float = 1795240155.5,
    extra_results: dict | None = None,
    samples: bool = True,
) -> Path:
    """A results_<date_id>.json (and samples_<task>_<date_id>.jsonl) with one metric scored per document."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(values)
    mean = sum(values) / n
    block = {"alias": task, f"{metric},none": mean, f"{metric}_stderr,none": 0.05, **(extra_results or {})}
    data = {
        "results": {task: block},
        "configs": {task: {"task": task, "metadata": {"needles_data_sha256": "ab" * 32}}},
        "versions": {task: 1.0},
        "n-shot": {task: 0},
        "higher_is_better": {task: {metric: True}},
        "n-samples": {task: {"original": n, "effective": n}},
        "config": {"model": "vllm", "model_args": {"pretrained": model}},
        "date": date,
    }
    results = folder / f"results_{DATE_ID}.json"
    results.write_text(json.dumps(data), encoding="utf-8")
    if samples:
        lines = [
            json.dumps(
                {
                    "doc_id": i,
                    "filter": "none",
                    "doc_hash": f"d{i}",
                    "prompt_hash": f"p{i}",
                    "target_hash": f"t{i}",
                    metric: v,
                }  # fmt: skip
            )
            for i, v in enumerate(values)
        ]
        (folder / f"samples_{task}_{DATE_ID}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return results
