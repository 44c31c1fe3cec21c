"""Compare two retrieval-head score files (e.g. a base model and its LoRA-finetuned version).

Set overlap follows Zhao et al.: recall of B's heads in A = |H_A ∩ H_B| / |H_B|; Jaccard =
|H_A ∩ H_B| / |H_A ∪ H_B|. Rank agreement is Spearman's rho (average ranks for ties) over all heads,
and over the union of both head sets (most heads score ~0, which inflates the all-heads value).
"""

from __future__ import annotations

import numpy as np

from harness_ext.errors import NeedlesError
from harness_ext.heads import _r, ranked_heads, scores_of


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho; None when either side is constant (undefined)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def head_set(scores: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    return {(int(la), int(h)) for la, h in zip(*np.nonzero(scores > threshold))}


def compare(a: dict, b: dict, threshold: float | None = None, top_k: int = 10) -> dict:
    """Overlap and rank agreement of two `needles heads` reports (same model shape)."""
    sa, sb = scores_of(a), scores_of(b)
    if sa.shape != sb.shape:
        raise NeedlesError(
            f"head grids differ: {sa.shape} vs {sb.shape}",
            fix="compare score files of the same architecture (e.g. a base model and its adapter)",
        )
    ta = a.get("threshold", 0.1) if threshold is None else threshold
    tb = b.get("threshold", 0.1) if threshold is None else threshold
    ha, hb = head_set(sa, ta), head_set(sb, tb)
    inter, union = ha & hb, ha | hb
    top_a, top_b = set(ranked_heads(sa)[:top_k]), set(ranked_heads(sb)[:top_k])
    union_idx = sorted(union)
    rho_union = spearman(np.array([sa[h] for h in union_idx]), np.array([sb[h] for h in union_idx])) if union else None

    def row(h: tuple[int, int]) -> dict:
        return {"layer": h[0], "head": h[1], "score_a": _r(sa[h]), "score_b": _r(sb[h]), "change": _r(sb[h] - sa[h])}

    def by_change(hs):
        return sorted((row(h) for h in hs), key=lambda r: (-abs(r["change"]), r["layer"], r["head"]))

    return {
        "a": _describe(a),
        "b": _describe(b),
        "threshold_a": ta,
        "threshold_b": tb,
        "num_heads_a": len(ha),
        "num_heads_b": len(hb),
        "num_shared": len(inter),
        "recall_b_in_a": _r(len(inter) / len(hb)) if hb else None,
        "recall_a_in_b": _r(len(inter) / len(ha)) if ha else None,
        "jaccard": _r(len(inter) / len(union)) if union else None,
        "spearman_all_heads": _opt(spearman(sa, sb)),
        "spearman_union_heads": _opt(rho_union),
        f"top{top_k}_overlap": len(top_a & top_b),
        "mean_score_a": _r(sa.mean()),
        "mean_score_b": _r(sb.mean()),
        "appeared": by_change(hb - ha),  # retrieval heads in B only
        "disappeared": by_change(ha - hb),  # retrieval heads in A only
        "shared": by_change(inter),
    }


def _opt(x: float | None) -> float | None:
    return None if x is None else _r(x)


def _describe(report: dict) -> dict:
    m = report.get("model", {})
    return {
        "model": m.get("model"),
        "adapter": m.get("adapter"),
        "num_retrieved": report.get("num_retrieved"),
        "num_probes": report.get("num_probes"),
        "probes_sha256": report.get("probes_sha256"),
    }


def format_compare(c: dict) -> str:
    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"A: {c['a']['model']}"
        + (f" + {c['a']['adapter']}" if c["a"]["adapter"] else "")
        + f"  ({c['num_heads_a']} heads > {c['threshold_a']})",
        f"B: {c['b']['model']}"
        + (f" + {c['b']['adapter']}" if c["b"]["adapter"] else "")
        + f"  ({c['num_heads_b']} heads > {c['threshold_b']})",
        f"shared {c['num_shared']}; recall of B's heads in A {f(c['recall_b_in_a'])}; Jaccard {f(c['jaccard'])}",
        f"Spearman rho: all heads {f(c['spearman_all_heads'])}, union of head sets {f(c['spearman_union_heads'])}",
    ]
    if c["a"]["probes_sha256"] != c["b"]["probes_sha256"]:
        lines.append("note: the two files were computed on different probes")
    for key in ("appeared", "disappeared", "shared"):
        rows = c[key]
        lines.append(f"{key} ({len(rows)}):" + ("" if rows else " none"))
        for r in rows:
            lines.append(
                f"  L{r['layer']:>2} H{r['head']:>2}  {r['score_a']:.3f} -> {r['score_b']:.3f} ({r['change']:+.3f})"
            )
    return "\n".join(lines)
