"""The report of ``needles study``: ``report.json`` (schema ``needles.study/1``), ``report.md`` and two plots
(recall vs score, head-overlap heatmap), written atomically from the finished steps' markers, with the base
model's scores and every run's paired test against them (``study_vs_base``), each non-reference run's paired test
against its reference run, and the form of every eval's replies (``harness_ext.reporting.reply_form``). With
``heads: false`` the report has no head, knockout, patching, correlation or paper sections and no plots.

The JSON holds numbers, run names and paths relative to the study folder only, no timings and no absolute
paths, so two executors (or two machines) that computed the same numbers write the same bytes. The published
findings of Zhao, Yin, Durrett (ICML 2025) sit beside ours, each with where the number comes from: only what
``shared/spec/PAPERS.md`` section 4.1 records (the paper's main text was not obtainable; most numbers are from
reviews of the submission).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness_ext.reporting.reply_form import markdown as reply_form_markdown
from harness_ext.study.config import BASE
from harness_ext.study.in_distribution import markdown as in_distribution_markdown
from harness_ext.study.in_distribution import report_section as in_distribution_section
from harness_ext.study.in_distribution import table_cell as own_task_cell
from harness_ext.study.steps import Study
from harness_ext.study.vs_base import cell, relative, vs_base, vs_reference

SCHEMA = "needles.study/1"
VS_BASE = (
    "run - base on the samples both evals scored, paired on (task, doc_id); 95% interval and two-sided p: exact "
    "McNemar with Newcombe's interval for 0/1 metrics, paired bootstrap otherwise; Holm across runs x targets"
)
PAPER = "Zhao, Yin, Durrett, ICML 2025 (arXiv 2410.22316)"
SECONDARY = f"{PAPER}; from reviews of the submission [secondary], as recorded in shared/spec/PAPERS.md section 4.1"
PAPER_FINDINGS = [  # verbatim from PAPERS.md section 4.1 (a test checks)
    ("gap", "MDQA (Llama-3) real-data F1 0.83 vs best synthetic 0.49", SECONDARY),
    ("correlation", "Spearman(recall, F1) over 5 variants: MDQA 0.23 (Llama-3) and -0.27 (Mistral)", SECONDARY),
    ("knockout", "top-10 knockout drops F1 sharply, random-10 < 0.05", SECONDARY),
    (
        "patching",
        "patching the *intersection* heads from the real-data model into a synthetic one helps in about 3 of 4 "
        "settings (MDQA symbolic F1 0.48 -> 0.73), with counterexamples where random or complement heads help more",
        SECONDARY,
    ),
]


def build_report(study: Study, done: dict[str, dict]) -> dict:
    cfg = study.cfg
    rows = []
    tests, against_reference = vs_base(study, done), vs_reference(study, done)
    for r in study.runs.values():
        row = {
            "run": r.name,
            "variant": r.variant.name,
            "seed": r.seed,
            "reference": r.is_reference,
            "finetune": r.variant.finetune,
            "scores": done[f"eval:{r.name}"]["scores"],
            "vs_base": tests[r.name],
            "vs_reference": against_reference.get(r.name),
        }
        if not cfg.head_steps:
            rows.append(row)
            continue
        heads = done[f"heads:{r.name}"]
        rows.append(
            {
                **row,
                "num_heads": heads["num_heads"],
                "heads": heads["heads"],
                "probes_retrieved": heads["probes_retrieved"],
                "overlap": None if r.is_reference else _strip(done[f"recall:{r.name}"], "compare"),
                "knockout": _strip(done[f"knockout:{r.name}"], "knockout"),
                "patching": None if r.is_reference else _strip(done[f"patch:{r.name}"], "patch"),
            }
        )
    common = {
        "schema": SCHEMA,
        "name": cfg.name,
        "model": Path(study.base).name,
        "in_distribution": in_distribution_section(study, done),  # first: a run that did not learn shows nothing
        "reference_variant": cfg.reference_variant,
        "backend": cfg.backend,
        "targets": [{"name": t.name, "task": t.task, "metric": t.key} for t in cfg.targets],
        "k": cfg.k,
        "seeds": cfg.seeds,
        "recall_definition": "|H_run ∩ H_reference| / |H_reference| (heads: retrieval score > threshold)",
        "base": {"scores": done[f"eval:{BASE}"]["scores"]},  # no results path: lm_eval's file name is a timestamp
        "vs_base_method": VS_BASE,
        "runs": rows,
        "reply_form": reply_forms(study, done),
    }
    if not cfg.head_steps:
        return common
    correlation = {k: v for k, v in done["correlation"].items() if k != "file"}
    return {
        **common,
        "head_overlap": _overlap(rows),
        "correlation": correlation,
        "paper": [
            {"finding": key, "paper": text, "source": src, "ours": _ours(key, rows, correlation)}
            for key, text, src in PAPER_FINDINGS
        ],  # fmt: skip
    }


def reply_forms(study: Study, done: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{run: {target: reply form}} of every eval (base first) whose sample log of a ``best_subspan_em`` target is
    there (harness_ext.reporting.reply_form); a log that cannot be read is recorded with the reason."""
    from harness_ext.core.errors import NeedlesError
    from harness_ext.reporting.reply_form import reply_form
    from harness_ext.reporting.results_io import load_run

    targets = [t for t in study.cfg.targets if t.metric == "best_subspan_em"]
    out: dict[str, dict[str, dict]] = {}
    for run in (BASE, *study.runs) if targets else ():
        try:
            results = load_run(study.out / done[f"eval:{run}"]["results"])
        except (NeedlesError, KeyError):
            continue  # no results file: "vs base" already says why
        for t in targets:
            if (path := results.samples_path(t.task)) is None:
                continue
            try:
                out.setdefault(run, {})[t.name] = reply_form(path, t.metric, t.filter)
            except NeedlesError as exc:
                out.setdefault(run, {})[t.name] = {"error": relative(study, exc)}
    return out


def _strip(outputs: dict, path_key: str) -> dict:
    return {k: v for k, v in outputs.items() if k != path_key}


def _overlap(rows: list[dict]) -> dict:
    """Jaccard of every pair of runs' head sets (1 on the diagonal; None where both sets are empty)."""
    sets = [{tuple(h) for h in r["heads"]} for r in rows]
    matrix = [[round(len(a & b) / len(a | b), 6) if a | b else None for b in sets] for a in sets]
    return {"runs": [r["run"] for r in rows], "jaccard": matrix}


def _fmt(x: float | None, ci: list | None = None, signed: bool = True) -> str:
    if x is None:
        return "n/a"
    text = f"{x:+.3f}" if signed else f"{x:.3f}"
    return text + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _ours(key: str, rows: list[dict], correlation: dict) -> str:
    """Our counterpart of a published finding, in words, on the first target."""
    first = next(iter(rows[0]["scores"]))
    refs = [r for r in rows if r["reference"]]
    synth = [r for r in rows if not r["reference"]]
    if key == "gap":
        ref = sum(r["scores"][first]["value"] for r in refs) / len(refs)
        best = max(synth, key=lambda r: r["scores"][first]["value"])
        return f"{first}: reference {ref:.3f} vs best synthetic {best['scores'][first]['value']:.3f} ({best['run']})"
    if key == "correlation":
        c = correlation["targets"][first]
        return f"{first}: Spearman {_fmt(c['spearman'], c['ci95'])} over {len(c['score'])} runs" + (
            f" ({c['note']})" if c["note"] else ""
        )
    if key == "knockout":
        parts = [
            f"{r['run']}: top {_fmt(r['knockout']['top']['delta'])}, random {_fmt(r['knockout']['random']['delta'])}"
            for r in rows
        ]
        return f"delta of {rows[0]['knockout']['metric']} ({rows[0]['knockout']['task']}); " + "; ".join(parts)
    parts = []
    for r in synth:
        p = r["patching"]
        inter = p["sets"].get("intersection")
        best = max(p["sets"].items(), key=lambda kv: kv[1]["delta"])[0] if p["sets"] else None
        parts.append(
            f"{r['run']}: intersection {_fmt(inter['delta'], inter['delta_ci95']) if inter else 'n/a (empty)'}"
            + (f", best set {best}" if best else ", no set could be patched")
        )
    return "; ".join(parts)


def to_markdown(rep: dict) -> str:
    targets = [t["name"] for t in rep["targets"]]
    heads = "head_overlap" in rep  # absent with `heads: false`
    lines = [
        f"# Study {rep['name']}: {rep['model']}, reference variant `{rep['reference_variant']}`",
        "",
        *in_distribution_markdown(rep),
        f"Targets scored with lm_eval ({rep['backend']}): "
        + ", ".join(f"{t['name']} ({t['metric']})" for t in rep["targets"])
        + (
            f". K = {rep['k']}; seeds {rep['seeds']}. Recall = {rep['recall_definition']}."
            if heads
            else f"; seeds {rep['seeds']}. No head steps (heads: false)."
        ),
        "",
        *(_heads_table(rep, targets) if heads else _scores_table(rep, targets)),
        "",
        f"vs base: {rep['vs_base_method']}.",
        *(
            ["Knockout and patching: change of the task score vs the intact / unpatched model, 95% bootstrap CI."]
            * heads
        ),
        "",
    ]
    for r in rep["runs"]:
        for t, test in r["vs_base"].items():
            if "error" in test:
                lines.append(f"- {r['run']}: {t} not compared with base: {test['error']}")
    lines += _vs_reference(rep, targets)
    lines += reply_form_markdown(rep.get("reply_form") or {})
    if not heads:
        return "\n".join(lines)
    for name, c in rep["correlation"]["targets"].items():
        note = f" — {c['note']}" if c["note"] else ""
        lines.append(f"- Spearman(recall, {name}) over {c['n']} runs: {_fmt(c['spearman'], c['ci95'])}{note}")
    for r in rep["runs"]:
        skipped = (r["patching"] or {}).get("skipped") or {}
        for s, why in skipped.items():
            lines.append(f"- {r['run']}: patch set {s} not run: {why}")
    lines += [
        "",
        "## Beside the paper",
        "",
        "| finding | paper | ours | source of the paper's number |",
        "|---|---|---|---|",
    ]
    for p in rep["paper"]:
        lines.append(f"| {p['finding']} | {p['paper']} | {p['ours']} | {p['source']} |")
    lines += ["", "Plots: `plots/recall_vs_score.png`, `plots/head_overlap.png`.", ""]
    return "\n".join(lines)


def _scores_table(rep: dict, targets: list[str]) -> list[str]:
    """The variant table without head columns (``heads: false``)."""
    own, own_head = _own_task(rep)
    lines = [
        "| run | " + " | ".join(targets) + " | " + " | ".join(_vs_headers(targets)) + own_head + " |",
        "|---" * (2 * len(targets) + 1 + bool(own_head)) + "|",
        f"| base (no finetune) | {' | '.join(_score(rep['base']['scores'][t]) for t in targets)} |"
        + " — |" * (len(targets) + bool(own_head)),
    ]
    for r in rep["runs"]:
        lines.append(
            f"| {r['run']}{' (reference)' if r['reference'] else ''} | "
            + " | ".join(_score(r["scores"][t]) for t in targets)
            + " | "
            + " | ".join(cell(r["vs_base"].get(t)) for t in targets)
            + own(r["run"])
            + " |"
        )
    return lines


def _own_task(rep: dict):
    """(run -> its in-distribution cell, the column's header): beside the transfer columns, so a transfer result
    is read with whether the run learned its own task; no column without the check."""
    if not rep.get("in_distribution"):
        return (lambda run: ""), ""
    return (lambda run: f" | {own_task_cell(rep, run)}"), " | own task (vs base)"


def _heads_table(rep: dict, targets: list[str]) -> list[str]:
    """The variant table with the head, knockout and patching columns."""
    own, own_head = _own_task(rep)
    lines = [
        "| run | "
        + " | ".join(targets)
        + " | "
        + " | ".join(_vs_headers(targets))
        + own_head
        + " | heads | recall | Jaccard | knockout top-K | knockout random-K "
        "| patch intersection | patch complement | patch random-K |",
        "|---" * (2 * len(targets) + 9 + bool(own_head)) + "|",
        f"| base (no finetune) | {' | '.join(_score(rep['base']['scores'][t]) for t in targets)} |"
        + " — |" * (len(targets) + 8 + bool(own_head)),
    ]
    for r in rep["runs"]:
        ov, ko, pa = r["overlap"], r["knockout"], r["patching"]
        scores = [_score(r["scores"][t]) for t in targets]
        sets = (pa or {}).get("sets", {})
        rnd = next((v for k, v in sets.items() if k.startswith("random")), None)
        lines.append(
            f"| {r['run']}{' (reference)' if r['reference'] else ''} | "
            + " | ".join(scores)
            + " | "
            + " | ".join(cell(r["vs_base"].get(t)) for t in targets)
            + own(r["run"])
            + f" | {r['num_heads']} | {'—' if ov is None else _fmt(ov['recall'], signed=False)}"
            f" | {'—' if ov is None else _fmt(ov['jaccard'], signed=False)}"
            f" | {_fmt(ko['top']['delta'], ko['top']['delta_ci95'])} | {_fmt(ko['random']['delta'], ko['random']['delta_ci95'])}"
            f" | {_patched(pa, sets.get('intersection'))} | {_patched(pa, sets.get('complement'))} | {_patched(pa, rnd)} |"
        )
    return lines


def _vs_reference(rep: dict, targets: list[str]) -> list[str]:
    """Each non-reference run against the reference run, paired like "vs base" (Holm across these pairs)."""
    runs = [r for r in rep["runs"] if r.get("vs_reference") is not None]
    if not runs:
        return []
    lines = [
        "",
        f"## vs the reference run ({rep['reference_variant']})",
        "",
        "| run | " + " | ".join(f"vs reference ({t})" for t in targets) + " |",
        "|---" * (len(targets) + 1) + "|",
    ]
    lines += [f"| {r['run']} | " + " | ".join(cell(r["vs_reference"].get(t)) for t in targets) + " |" for r in runs]
    for r in runs:
        for t, test in r["vs_reference"].items():
            if "error" in test:
                lines.append(f"- {r['run']}: {t} not compared with the reference: {test['error']}")
    return [*lines, ""]


def _vs_headers(targets: list[str]) -> list[str]:
    return ["vs base"] if len(targets) == 1 else [f"vs base ({t})" for t in targets]


def _patched(pa: dict | None, s: dict | None) -> str:
    """A patching cell: — for the reference (nothing patched into it), n/a for a set that was not run."""
    return "—" if pa is None else ("n/a" if s is None else _fmt(s["delta"], s["delta_ci95"]))


def _score(s: dict) -> str:
    return f"{s['value']:.3f}" + (f" ± {s['stderr']:.3f}" if s.get("stderr") is not None else "")


def plots(rep: dict) -> dict[str, bytes]:
    """Recall vs score (first target) and the Jaccard heatmap of the runs' head sets, as PNG bytes (none without
    head steps)."""
    if "head_overlap" not in rep:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = rep["targets"][0]["name"]
    out = {}
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    for r in rep["runs"]:
        x = 1.0 if r["reference"] else (r["overlap"] or {}).get("recall")
        if x is None:
            continue
        ax.scatter([x], [r["scores"][first]["value"]], marker="*" if r["reference"] else "o")
        ax.annotate(r["run"], (x, r["scores"][first]["value"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="recall of the reference's retrieval heads", ylabel=first, title="recall vs score")
    out["recall_vs_score"] = _png(fig, plt)
    names = rep["head_overlap"]["runs"]
    m = np.array([[np.nan if v is None else v for v in row] for row in rep["head_overlap"]["jaccard"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5), dpi=110)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):  # the number in each cell; "none" where both runs have no retrieval head
            text = "none" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="grey" if np.isnan(m[i, j]) else ("k" if m[i, j] > 0.5 else "w"),
            )
    fig.colorbar(im, ax=ax, label="Jaccard of retrieval-head sets")
    ax.set_title("head overlap")
    out["head_overlap"] = _png(fig, plt)
    return out


def _png(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_report(study: Study, done: dict[str, dict]) -> dict:
    """report.json, report.md and plots/ in the study folder (each written atomically)."""
    from harness_ext.core.output_files import write_output

    rep = build_report(study, done)
    write_output(study.out / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n", "report")
    write_output(study.out / "report.md", to_markdown(rep), "report")
    written = []
    try:
        for name, png in plots(rep).items():
            write_output(study.out / "plots" / f"{name}.png", png, "plot")
            written.append(f"plots/{name}.png")
    except ImportError:
        print("[needles study] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return {"report": "report.json", "markdown": "report.md", "plots": written}
