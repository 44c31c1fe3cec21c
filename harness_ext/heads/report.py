"""The heads.json document of a detection run, and its human-readable forms: the heatmap and the head list."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness_ext.core.atomic_io import write_atomic
from harness_ext.core.errors import NeedlesError
from harness_ext.heads.detect import ProbeResult, aggregate
from harness_ext.heads.model import LoadedModel
from harness_ext.heads.scorefile import SCHEMA
from harness_ext.heads.scores import DEFAULT_THRESHOLD, retrieval_heads, rounded, rounded_matrix, summarize


def build_report(
    lm: LoadedModel, results: Sequence[ProbeResult], settings: dict, threshold: float = DEFAULT_THRESHOLD
) -> dict:
    """The JSON document: per-head scores, retrieval heads, per-family scores, per-probe outcomes."""
    L, H = lm.ctl.num_layers, lm.ctl.num_heads
    scores, n_ok = aggregate(results, L, H)
    families = {}
    for fam in sorted({r.probe.family for r in results}):
        sub = [r for r in results if r.probe.family == fam]
        fam_scores, fam_ok = aggregate(sub, L, H)
        families[fam] = {"probes": len(sub), "retrieved": fam_ok, "scores": rounded_matrix(fam_scores)}
    heads = retrieval_heads(scores, threshold)
    probes = [
        {
            "id": r.probe.probe_id,
            "family": r.probe.family,
            "n_tokens": r.n_tokens,
            "needle_tokens": r.needle_tokens,
            "retrieved": r.retrieved,
            "success_value": rounded(r.success_value),
            "response": r.response,
            "max_head_score": rounded((r.hits / r.needle_tokens).max()),
            **r.probe.meta,
        }
        for r in results
    ]
    return {
        "schema": SCHEMA,
        "model": {k: lm.info[k] for k in sorted(lm.info)},
        "settings": settings,
        "probes_sha256": hashlib.sha256(
            json.dumps([[p.text, p.needle] for p in (r.probe for r in results)]).encode()
        ).hexdigest(),
        "num_layers": L,
        "num_heads": H,
        "num_probes": len(results),
        "num_retrieved": n_ok,
        "threshold": threshold,
        "retrieval_heads": heads,
        "summary": summarize(scores, threshold),
        "scores": rounded_matrix(scores),
        "families": families,
        "probes": probes,
    }


def write_heatmap(report: dict, path: Path, title: str | None = None) -> None:
    """Layer x head heatmap of the retrieval scores; retrieval heads are outlined."""
    try:
        import matplotlib
    except ImportError:
        raise NeedlesError("the heatmap needs matplotlib", fix="pip install 'lm-eval-needles[plots]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(report["scores"], dtype=float)
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * H + 2.5), max(4.0, 0.22 * L + 1.5)))
    im = ax.imshow(
        scores,
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=max(0.2, float(scores.max())),
        interpolation="nearest",
        origin="lower",
    )
    for h in report["retrieval_heads"]:
        ax.add_patch(plt.Rectangle((h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    model = Path(str(report["model"].get("model", ""))).name
    adapter = report["model"].get("adapter")
    default_title = f"Retrieval scores: {model}" + (f" + {Path(adapter).name}" if adapter else "")
    ax.set_title(title or default_title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"retrieval score (red: > {report['threshold']})")
    fig.tight_layout()
    png = io.BytesIO()
    # Fixed metadata so the same scores give the same PNG bytes.
    fig.savefig(png, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, png.getvalue())


def format_heads(report: dict, limit: int | None = None) -> str:
    """The retrieval heads as text (retrieval_heads.txt and the command's summary)."""
    lines = [
        f"{len(report['retrieval_heads'])} retrieval heads (score > {report['threshold']}) of "
        f"{report['num_layers']}x{report['num_heads']}; {report['num_retrieved']}/{report['num_probes']} "
        "probes retrieved"
    ]
    for h in report["retrieval_heads"][:limit]:
        lines.append(f"  L{h['layer']:>2} H{h['head']:>2}  {h['score']:.3f}")
    return "\n".join(lines)
