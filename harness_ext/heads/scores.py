"""Head score grids (layers x heads): ranking, the retrieval-head set above a threshold, JSON rounding, summary.

Pure numpy, shared by detection, comparison and knockout, and by both score-file formats.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.1  # Wu et al.: a retrieval head scores > 0.1
Head = tuple[int, int]  # (layer, head)


def rounded(x: float) -> float:
    """A score as written to JSON: 6 decimals keep files small and byte-stable across platforms."""
    return round(float(x), 6)


def rounded_matrix(scores: np.ndarray) -> list[list[float]]:
    return [[rounded(x) for x in row] for row in scores]


def ranked_heads(scores: np.ndarray) -> list[Head]:
    """Every head, best score first (ties: lower layer, then lower head)."""
    flat = [(-float(scores[la, h]), la, h) for la in range(scores.shape[0]) for h in range(scores.shape[1])]
    return [(la, h) for _, la, h in sorted(flat)]


def retrieval_heads(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """Heads with score > threshold, best first (ties: lower layer, then lower head)."""
    return [
        {"layer": int(la), "head": int(h), "score": rounded(scores[la, h])}
        for la, h in ranked_heads(scores)
        if scores[la, h] > threshold
    ]


def head_set(scores: np.ndarray, threshold: float) -> set[Head]:
    """The retrieval heads (score > threshold) as a set of (layer, head)."""
    return {(int(la), int(h)) for la, h in zip(*np.nonzero(scores > threshold))}


def summarize(scores: np.ndarray, threshold: float) -> dict:
    """How the scores are spread: how many heads pass the threshold, how many are ~0, the top ones' mean."""
    flat = np.sort(scores.ravel())[::-1]
    n = flat.size
    return {
        "num_heads_total": int(n),
        "num_retrieval_heads": int((flat > threshold).sum()),
        "fraction_retrieval_heads": rounded((flat > threshold).mean()),
        "fraction_below_0.01": rounded((flat < 0.01).mean()),
        "median_score": rounded(np.median(flat)),
        "max_score": rounded(flat[0]),
        "top10_mean": rounded(flat[:10].mean()),
    }
