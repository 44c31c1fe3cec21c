"""The context-extension experiment's comparison and report: three variants (base, training-free, finetuned)
scored by length, paired tests, and each variant's effective context length.

Pairs are joined on the document hash lm-eval logs (``doc_hash``), per leaf task, because the base model is
scored on a subset of the lengths (those inside its native window): the synthetic families draw each document
from (seed, length, index) alone, so a document at a length both runs scored is the same document, and its
prompt and target hashes must match too (else the runs are refused as incomparable). Statistics are the
experiment's (harness_ext.workflow.paired.compare_entry, Holm from harness_ext.core.stats); effective lengths
are harness_ext.reporting.effective_length's (RULER's rule and the relative rule, bootstrap over documents).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from harness_ext.core import stats
from harness_ext.core.errors import NeedlesError
from harness_ext.experiment.extension.plan import is_plain
from harness_ext.reporting.effective_length import bootstrap, default_rules, effective_length
from harness_ext.reporting.results_io import Run, as_number, iter_samples, load_run
from harness_ext.tasklib.breakdowns import lower_is_better
from harness_ext.workflow.informative import claim_note, mark_row
from harness_ext.workflow.mde import beside
from harness_ext.workflow.paired import compare_entry, leaf_tasks
from harness_ext.workflow.suite import ExperimentConfig, SuiteTask

VARIANTS = ("base", "training_free", "finetuned")
LABELS = {"base": "base", "training_free": "training-free", "finetuned": "finetuned"}


def _index(run: Run, leaf: str, entry: SuiteTask) -> dict[str, dict]:
    """doc_hash -> {value, length, prompt_hash, target_hash} of one leaf task's sample log."""
    path = run.samples_path(leaf)
    if path is None:
        raise NeedlesError(f"{leaf}: no per-sample log in {run.path}", fix="run lm_eval with --log_samples")
    out: dict[str, dict] = {}
    for row in iter_samples(path):
        value = as_number(row.get(entry.metric))
        if row.get("filter", "none") != entry.filter or value is None:
            continue
        key = str(row.get("doc_hash"))
        if key in out:
            raise NeedlesError(f"{path}: document {key[:12]} appears twice", fix="score each document once")
        doc = row.get("doc") if isinstance(row.get("doc"), dict) else {}
        length = doc.get("target_tokens", doc.get("context_tokens"))  # a prompt's length, or a loss's context
        out[key] = {
            "value": value,
            "length": int(length) if isinstance(length, int) else None,
            "prompt_hash": row.get("prompt_hash"),
            "target_hash": row.get("target_hash"),
        }
    if not out:
        raise NeedlesError(
            f"{leaf}: no sample carries metric {entry.metric!r} (filter {entry.filter!r})",
            fix="name a per-sample metric of that task in the suite (see its samples_*.jsonl)",
        )
    return out


def _paired(ref: dict[str, dict[str, dict]], new: dict[str, dict[str, dict]], keep) -> tuple[np.ndarray, np.ndarray]:
    """(reference, finetuned) values of the reference's documents that ``keep(length)`` selects, every leaf."""
    a, b = [], []
    for leaf, docs in ref.items():
        for key, r in docs.items():
            if not keep(r["length"]):
                continue
            n = new.get(leaf, {}).get(key)
            if n is None:
                raise NeedlesError(
                    f"{leaf}: document {key[:12]} (length {r['length']}) was scored by the reference run only",
                    fix="score every variant with the same metadata (seed, num_samples, depths) and --limit",
                )
            if (r["prompt_hash"], r["target_hash"]) != (n["prompt_hash"], n["target_hash"]):
                raise NeedlesError(
                    f"{leaf}: document {key[:12]} has another prompt or target in the finetuned run",
                    fix="score the variants with the same tokenizer, chat template and prompt template",
                )
            a.append(r["value"])
            b.append(n["value"])
    return np.array(a, dtype=float), np.array(b, dtype=float)


def _cells(index: dict[str, dict[str, dict]]) -> dict[tuple[str, int], list[float]]:
    cells: dict[tuple[str, int], list[float]] = {}
    for leaf, docs in index.items():
        for r in docs.values():
            if r["length"] is not None:
                cells.setdefault((leaf, r["length"]), []).append(r["value"])
    return cells


def _curve(cells: dict[tuple[str, int], list[float]]) -> dict[int, float]:
    """A task's mean at each length, averaged over its leaf tasks at the lengths all of them measured."""
    leaves = {leaf for leaf, _ in cells}
    lengths = sorted({n for _, n in cells if all((leaf, n) in cells for leaf in leaves)})
    return {n: float(np.mean([np.mean(cells[(leaf, n)]) for leaf in sorted(leaves)])) for n in lengths}


def _effective(cells: dict[tuple[str, int], list[float]], seed: int) -> list[dict]:
    curve = _curve(cells)
    out = []
    for rule in default_rules():
        found = effective_length(curve, rule)
        kept = {k: v for k, v in cells.items() if k[1] in curve}
        boot = bootstrap(kept, rule, iters=1000, seed=seed)
        out.append({"rule": rule.label, "effective_length": found.display(), "kind": found.kind,
                    "interval": boot.interval_text(), "level": boot.level})  # fmt: skip
    return out


def compare_variants(
    results: dict[str, dict[str, str]], cfg: ExperimentConfig, plan: dict, skipped: list[dict]
) -> dict:
    """The comparison: per suite entry the score by length of the three variants, its paired test (targets:
    finetuned vs training-free past the native window; guards: finetuned vs base inside it), Holm across the
    entries, each variant's effective length, and the verdict. ``results``: variant -> kind (``chat``, ``plain``:
    the lm_eval call without the chat template, harness_ext.experiment.extension.plan.PLAIN_FAMILIES) -> results
    file. A loss (nll) improves by decreasing (harness_ext.workflow.paired.compare_entry)."""
    runs = {v: {kind: load_run(Path(path)) for kind, path in results[v].items()} for v in VARIANTS}
    past = {n for lengths in plan["past"].values() for n in lengths}
    rows, tables, effective, pairs = [], [], [], []
    for entry in cfg.suite:
        kind = "plain" if is_plain(entry.task) else "chat"
        scored = [v for v in VARIANTS if v != "base" or entry.name in plan["base_tasks"]]
        entry_runs = {v: runs[v][kind] for v in scored}
        index = {
            v: {leaf: _index(entry_runs[v], leaf, entry) for leaf in leaf_tasks(entry_runs[v], entry.task)}
            for v in scored
        }
        by_length: dict[int | None, dict[str, list[float]]] = {}
        for v in scored:
            for docs in index[v].values():
                for r in docs.values():
                    by_length.setdefault(r["length"], {}).setdefault(v, []).append(r["value"])
        tables.append(
            {
                "task": entry.name,
                "metric": entry.metric,
                "lower_is_better": lower_is_better(entry.metric),
                "rows": [
                    {
                        "length": n,
                        "past_native_window": n in past,
                        **{v: {"mean": float(np.mean(vals)), "n": len(vals)} for v, vals in cells.items()},
                    }  # fmt: skip
                    for n, cells in sorted(by_length.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
                ],
            }
        )
        if entry.role == "target":
            has_past = any(r["length"] in past for d in index["training_free"].values() for r in d.values())
            keep = (lambda n: n in past) if has_past else (lambda n: True)
            ref_name, docs = "training_free", "past the native window" if has_past else "all documents"
        else:
            ref_name, docs, keep = "base", "inside the native window", (lambda n: True)
        ref, new = _paired(index[ref_name], index["finetuned"], keep)
        row = compare_entry(entry, ref, new, cfg)
        row["reference_mean"] = row.pop("base")
        rows.append({**row, "reference": ref_name, "documents": docs, "leaf_tasks": sorted(index["finetuned"])})
        pairs.append((ref, new))
        # a score curve's effective length (RULER's cutoff) means nothing for a loss
        scores = not lower_is_better(entry.metric)
        per_variant = {v: _effective(c, cfg.seed) for v in scored if scores and (c := _cells(index[v]))}
        if per_variant:
            effective.append({"task": entry.name, "metric": entry.metric, "variants": per_variant})
    for row, (ref, new), p_holm in zip(rows, pairs, stats.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        row["pass"] = p_holm < cfg.alpha
        if row["role"] == "target":
            row["verdict"] = "improved over training-free" if row["pass"] else "no significant improvement"
            if not row["pass"]:  # what this n could have detected, as the two-variant experiment says it
                found = beside(ref, new, cfg.alpha / len(rows))
                row["mde"], row["mde_text"] = found["mde"], found["text"]
        else:
            row["verdict"] = "held (non-inferior)" if row["pass"] else "not shown to hold (possible regression)"
        mark_row(row, ref, new)  # both sides at floor or at ceiling: neither improved nor held
    holds = all(r["pass"] for r in rows)
    verdict = ("CLAIM HOLDS" if holds else "CLAIM NOT SHOWN") + claim_note(rows)
    if skipped:
        verdict += f" (on the tasks run; {len(skipped)} optional task(s) not run: no data)"
    return {
        "name": cfg.name,
        "kind": "context_extension",
        "alpha": cfg.alpha,
        "correction": "Holm over all suite tasks run",
        "native_window": plan["native"],
        "target_window": plan["target"],
        "rope_parameters": plan["rope"],
        "hf_overrides": plan["hf_overrides"],
        "claim_holds": holds,
        "verdict": verdict,
        "tasks": rows,
        "by_length": tables,
        "effective_length": effective,
        "skipped": list(skipped),
        "results": {v: {kind: str(run.path) for kind, run in runs[v].items()} for v in VARIANTS},
    }


def _cell(cell: dict | None) -> str:
    return "—" if cell is None else f"{cell['mean']:.3f} (n {cell['n']})"


def to_markdown(comparison: dict, reference: dict | None = None) -> str:
    """comparison.md: the verdict table, the score by length of the three variants (the native window marked)
    and each variant's effective length."""
    native, rope = comparison["native_window"], comparison["rope_parameters"]
    lines = [
        f"# Experiment {comparison['name']}: {comparison['verdict']}",
        "",
        f"Context extension {native} -> {comparison['target_window']} tokens ({rope['rope_type']}, factor "
        f"{rope.get('factor', 1):g}, rope_theta {rope['rope_theta']:g}). Variants: **base** (served in its native "
        "window, only the lengths that fit there), **training-free** (the same RoPE override, no training), "
        "**finetuned**. Targets are tested against the training-free variant past the native window (what the "
        "training added), guards against the base model inside it (no regression).",
        "",
        f"alpha = {comparison['alpha']}, {comparison['correction']}.",
        "",
        "| task | role | documents | metric | n | reference | ref. | finetuned | delta | CI | p | Holm p | verdict |"
        + (" published |" if reference else ""),
        "|---|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---|" + ("---|" if reference else ""),
    ]
    for r in comparison["tasks"]:
        role = r["role"] + (f" (margin {r['margin']:g})" if r["role"] == "guard" else "")
        mde = f" ({r['mde_text']})" if r.get("mde_text") else ""
        lines.append(
            f"| {r['task']} | {role} | {r['documents']} | {r['metric']} | {r['n']} | {LABELS[r['reference']]} | "
            f"{r['reference_mean']:.3f} | {r['finetuned']:.3f} | {r['delta']:+.3f} | [{r['ci'][0]:+.3f}, "
            f"{r['ci'][1]:+.3f}] | {r['p']:.3g} | {r['p_holm']:.3g} | {r['verdict']}{mde} |"
            + (f" {reference.get(r['task'], '')} |" if reference else "")
        )
    lines += ["", f"## Score by length (native window {native} tokens)", ""]
    for table in comparison["by_length"]:
        what = table["metric"] + (", lower is better; length = context tokens" if table.get("lower_is_better") else "")
        lines += [f"### {table['task']} ({what})", "", "| length | base | training-free | finetuned |"]
        lines.append("|---|---:|---:|---:|")
        marked = False
        for row in table["rows"]:
            if row["past_native_window"] and not marked:
                lines.append(f"| **native window {native}** | | | |")
                marked = True
            length = "all" if row["length"] is None else str(row["length"])
            length += " (past the window)" if row["past_native_window"] else ""
            lines.append(f"| {length} | " + " | ".join(_cell(row.get(v)) for v in VARIANTS) + " |")
        lines.append("")
    if comparison["effective_length"]:
        lines += [
            "## Effective context length",
            "",
            "Longest length whose score, and every shorter length's, is above the rule's cutoff (RULER: 85.6 on "
            "0-100; relative: 0.9 x the variant's own score at its shortest length), with its 90% bootstrap interval "
            "over documents. The base model is measured inside its native window only.",
            "",
            "| task | rule | base | training-free | finetuned |",
            "|---|---|---|---|---|",
        ]
        for e in comparison["effective_length"]:
            rules = [r["rule"] for r in next(iter(e["variants"].values()))]
            for i, rule in enumerate(rules):
                cells = []
                for v in VARIANTS:
                    found = e["variants"].get(v)
                    cells.append("—" if not found else f"{found[i]['effective_length']} (90%: {found[i]['interval']})")
                lines.append(f"| {e['task']} | {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    for r in comparison.get("skipped", []):
        lines.append(f"{r['task']} was not run: {r['reason']}" + (f" Fix: {r['fix']}" if r.get("fix") else ""))
    for v, paths in comparison["results"].items():
        lines += [f"{LABELS[v]}{'' if kind == 'chat' else ' (no chat template)'}: {p}" for kind, p in paths.items()]
    return "\n".join(lines) + "\n"


def write_report(name: str, results: dict[str, dict[str, str]], native: int, out: Path) -> dict:
    """Leaderboard rows of the three runs (adapters NAME-training-free, NAME-finetuned) and the plots: the
    experiment's usual ones and score by length with the native window dotted and each effective length starred."""
    from harness_ext.core.output_files import write_output
    from harness_ext.reporting.effective_length import RULER_THRESHOLD, Rule
    from harness_ext.reporting.leaderboard_csv import collect_rows, export
    from harness_ext.reporting.length_curves import curves
    from harness_ext.reporting.plots import all_plots, available, length_plot

    board = out / "leaderboard.csv"
    adapters = {"base": None, "training_free": f"{name}-training-free", "finetuned": f"{name}-finetuned"}
    rows = []
    for v in VARIANTS:
        export(list(results[v].values()), board, adapter=adapters[v])
        rows += collect_rows(list(results[v].values()), adapter=adapters[v])
    written = []
    if not available():
        print("[needles experiment] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return {"leaderboard": str(board), "plots": written}
    plots = all_plots(rows)
    windows = {c.label: native for c in curves(rows)}  # every variant's dotted line: the base's native window
    png = length_plot(rows, Rule("ruler", RULER_THRESHOLD), windows)
    if png is not None:
        plots["length"] = png
    for stem, data in plots.items():
        write_output(out / "plots" / f"{stem}.png", data, "plot")
        written.append(str(out / "plots" / f"{stem}.png"))
    return {"leaderboard": str(board), "plots": written}
