"""The cross-model patching result: per-side summaries, intersection minus random (paired per item), and the
printed table. The statistics are harness_ext.core.stats' (via knockout's paired 95% bootstrap interval)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harness_ext.core.stats import mean_stderr
from harness_ext.heads.knockout import paired_ci95
from harness_ext.heads.patch_sets import HeadSet
from harness_ext.heads.scores import rounded


def se(x: np.ndarray) -> float:
    """Standard error of a mean as written to JSON (0 below two items)."""
    return rounded(mean_stderr(x) or 0.0)


def side(x: np.ndarray, replies: list[str]) -> dict:
    """One unpatched side (target or source): its score, stderr, and per-item scores and replies."""
    return {
        "accuracy": rounded(x.mean()),
        "accuracy_stderr": se(x),
        "per_item": [rounded(v) for v in x],
        "replies": replies,
    }


def minus_random(per_set: dict[str, np.ndarray], sets: Sequence[HeadSet], seed: int) -> list[dict]:
    """score(intersection) - score(random:K), paired per item, for every random:K set that was run."""
    inter = per_set.get("intersection")
    if inter is None:
        return []
    out = []
    for s in sets:
        if s.kind == "random":
            diff = inter - per_set[s.name]
            out.append(
                {
                    "random": s.name,
                    "delta": rounded(diff.mean()),
                    "stderr": se(diff),
                    "ci95": paired_ci95(diff, seed),
                }
            )
    return out


def format_patch(result: dict) -> str:
    """The patching result as a table: target, source, each set's score and delta with its 95% CI."""
    b, r = result["target_baseline"], result["source_reference"]
    lines = [
        f"{result['task']} {result['metric']} on {result['num_items']} items "
        f"(site {result['site']}, {result['continuation']})",
        f"  {'condition':>22}  {'heads':>5}  {'score':>13}  {'delta vs target':>34}  gap closed",
        f"  {'target (unpatched)':>22}  {'':>5}  {b['accuracy']:.3f} ± {b['accuracy_stderr']:.3f}",
        f"  {'source':>22}  {'':>5}  {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f}  "
        f"{r['accuracy'] - b['accuracy']:+.3f}",
    ]
    for s in result["sets"]:
        name = s["set"] if s["draws"] == 1 else f"{s['set']} ({s['draws']} draws)"
        gap = "n/a" if s["gap_closed"] is None else f"{s['gap_closed']:.2f}"
        lines.append(
            f"  {name[:22]:>22}  {s['num_heads']:>5}  {s['accuracy']:.3f} ± {s['accuracy_stderr']:.3f}  "
            f"{s['delta']:+.3f} ± {s['delta_stderr']:.3f} (95% CI {s['delta_ci95'][0]:+.3f}..{s['delta_ci95'][1]:+.3f})"
            f"  {gap}"
        )
    for t in result["intersection_minus_random"]:
        lines.append(
            f"  intersection - {t['random']}: {t['delta']:+.3f} ± {t['stderr']:.3f} "
            f"(95% CI {t['ci95'][0]:+.3f}..{t['ci95'][1]:+.3f})"
        )
    return "\n".join(lines)
