"""Compare two retrieval-head score files (e.g. a base model and its LoRA-finetuned version).

Set overlap follows Zhao et al.: recall of B's heads in A = |H_A ∩ H_B| / |H_B|; Jaccard =
|H_A ∩ H_B| / |H_A ∪ H_B|. Rank agreement is Spearman's rho (average ranks for ties) over all heads,
and over the union of both head sets (most heads score ~0, which inflates the all-heads value).

Either file may be our heads.json or a published head_score file (harness_ext.heads.scorefile). Heads
are matched by (layer, head) index, so the two grids must have the same shape; otherwise the
comparison is refused. Equal shapes of two different models (e.g. Llama-2-7B and Mistral-7B, both
32x32) are compared, with a note that the same index need not be the same head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.stats import spearman_rho
from harness_ext.heads.scorefile import FORMAT_NAMES, NEEDLES, PUBLISHED, HeadScores
from harness_ext.heads.scores import Head, head_set, ranked_heads, rounded


def compare(a: HeadScores, b: HeadScores, threshold: float | None = None, top_k: int = 10) -> dict:
    """Overlap and rank agreement of two head-score grids of the same shape (A: reference, B: compared)."""
    sa, sb = a.scores, b.scores
    if sa.shape != sb.shape:
        raise NeedlesError(
            f"head grids differ: A is {_shape(sa)} ({a.format_name}), B is {_shape(sb)} ({b.format_name}); "
            "heads are matched by (layer, head), so only grids of one shape can be compared",
            fix="compare score files of the same architecture (e.g. a base model and its adapter)",
        )
    ta = a.threshold if threshold is None else threshold
    tb = b.threshold if threshold is None else threshold
    ha, hb = head_set(sa, ta), head_set(sb, tb)
    inter, union = ha & hb, ha | hb
    top_a, top_b = set(ranked_heads(sa)[:top_k]), set(ranked_heads(sb)[:top_k])
    union_idx = sorted(union)
    rho_union = (
        spearman_rho(np.array([sa[h] for h in union_idx]), np.array([sb[h] for h in union_idx])) if union else None
    )

    def row(h: Head) -> dict:
        return {
            "layer": h[0],
            "head": h[1],
            "score_a": rounded(sa[h]),
            "score_b": rounded(sb[h]),
            "change": rounded(sb[h] - sa[h]),
        }

    def by_change(hs: set[Head]) -> list[dict]:
        return sorted((row(h) for h in hs), key=lambda r: (-abs(r["change"]), r["layer"], r["head"]))

    return {
        "a": a.describe(),
        "b": b.describe(),
        "threshold_a": ta,
        "threshold_b": tb,
        "num_heads_a": len(ha),
        "num_heads_b": len(hb),
        "num_shared": len(inter),
        "recall_b_in_a": rounded(len(inter) / len(hb)) if hb else None,
        "recall_a_in_b": rounded(len(inter) / len(ha)) if ha else None,
        "jaccard": rounded(len(inter) / len(union)) if union else None,
        "spearman_all_heads": _opt(spearman_rho(sa, sb)),
        "spearman_union_heads": _opt(rho_union),
        f"top{top_k}_overlap": len(top_a & top_b),
        "mean_score_a": rounded(sa.mean()),
        "mean_score_b": rounded(sb.mean()),
        "appeared": by_change(hb - ha),  # retrieval heads in B only
        "disappeared": by_change(ha - hb),  # retrieval heads in A only
        "shared": by_change(inter),
        "notes": _notes(a, b),
    }


def _shape(scores: np.ndarray) -> str:
    return f"{scores.shape[0]} layers x {scores.shape[1]} heads"


def _notes(a: HeadScores, b: HeadScores) -> list[str]:
    """What a reader must know to interpret the numbers (provenance, not statistics)."""
    notes = []
    for name, s in (("A", a), ("B", b)):
        if s.format == PUBLISHED:
            notes.append(
                f"{name} is a published head_score file: a head's score is the mean over the reference's "
                f"{s.num_retrieved or 'unknown number of'} successful tests; its probes are not recorded"
            )
    if a.format == b.format != PUBLISHED and a.probes_sha256 != b.probes_sha256:
        notes.append("the two files were computed on different probes")
    if a.model and b.model and Path(a.model).name != Path(b.model).name:
        notes.append(
            f"A and B name different models ({Path(a.model).name} vs {Path(b.model).name}): heads are matched "
            "by index only, and the same (layer, head) of two separately trained models need not be the same head"
        )
    return notes


def _opt(x: float | None) -> float | None:
    return None if x is None else rounded(x)


def format_compare(c: dict) -> str:
    """The comparison as text: both sides, overlap, rank agreement, notes, changed heads."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    def side(name: str) -> str:
        key = name.lower()
        d = c[key]
        adapter = f" + {d['adapter']}" if d["adapter"] else ""
        fmt = FORMAT_NAMES.get(d.get("format", NEEDLES), d.get("format"))
        return f"{name}: {d['model']}{adapter}  ({c['num_heads_' + key]} heads > {c['threshold_' + key]}; {fmt})"

    lines = [
        side("A"),
        side("B"),
        f"shared {c['num_shared']}; recall of B's heads in A {f(c['recall_b_in_a'])}; Jaccard {f(c['jaccard'])}",
        f"Spearman rho: all heads {f(c['spearman_all_heads'])}, union of head sets {f(c['spearman_union_heads'])}",
    ]
    lines += [f"note: {n}" for n in c.get("notes", [])]
    for key in ("appeared", "disappeared", "shared"):
        rows = c[key]
        lines.append(f"{key} ({len(rows)}):" + ("" if rows else " none"))
        for r in rows:
            lines.append(
                f"  L{r['layer']:>2} H{r['head']:>2}  {r['score_a']:.3f} -> {r['score_b']:.3f} ({r['change']:+.3f})"
            )
    return "\n".join(lines)
