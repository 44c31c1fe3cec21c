"""``needles scorecard --compare A B``: what changed where between two scorecards (or two sets of lm-eval results),
with a paired test per task and length (and per MDQA gold position), Holm across all of them.

Pairing, compatibility checks and statistics are the gate's (``gate_pairing``: same documents, prompts and targets,
joined on doc_id; ``core.stats``: exact McNemar and Newcombe's interval for 0/1 metrics, a paired bootstrap
otherwise); effective-length changes are the gate's check (``gate_length``); the minimal detectable effect is
``core.power``. Tests here are two-sided (a finetune or a context extension can move either way).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness_ext.core import power, stats
from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.gate_length import check_lengths
from harness_ext.reporting.gate_pairing import check_task_compatible, load_pairs
from harness_ext.reporting.leaderboard_rows import model_identity
from harness_ext.reporting.length_curves import PRIMARY_METRICS, require_curves
from harness_ext.reporting.markdown_text import md_escape
from harness_ext.reporting.results_io import Run, find_results, load_run
from harness_ext.tasklib.breakdowns import parse_name


@dataclass
class Side:
    label: str
    path: Path
    runs: list[Run]

    def run_of(self, task: str) -> Run | None:
        return next((r for r in self.runs if task in (r.data.get("configs") or {})), None)


def load_side(path: str | Path, which: str) -> Side:
    """A scorecard folder (its scorecard.json names the family runs) or lm-eval results (files or folders)."""
    path = Path(path).expanduser()
    card = path / "scorecard.json"
    if card.is_file():
        data = json.loads(card.read_text(encoding="utf-8"))
        files = [path / f["results"] for f in data.get("families", []) if f.get("results")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not files:
            raise NeedlesError(
                f"--compare {which} {path}: its scorecard names no readable results ({', '.join(missing) or 'none'})",
                fix="rerun `needles scorecard MODEL -o FOLDER` into that folder (it resumes), or pass results folders",
            )
        return Side(str(data.get("model") or path.name), path, [load_run(f) for f in files])
    if not path.exists():
        raise NeedlesError(f"--compare {which} {path} does not exist", fix="pass a scorecard folder or lm-eval results")
    runs = [load_run(f) for f in find_results([path])]
    return Side(model_identity(runs[0])[0], path, runs)


def _primary(run: Run, task: str) -> str | None:
    block = run.data["results"].get(task) or {}
    bases = {parse_name(k.split(",", 1)[0]).base for k in block}
    return next((m for m in PRIMARY_METRICS if m in bases), None)


def _cells(run: Run, task: str, metric: str) -> list[tuple[str, str]]:
    """(metric key, label) of the overall metric, each length (no position) and each gold position (no length)."""
    keys = []
    for key in run.data["results"].get(task) or {}:
        name, _, filt = key.partition(",")
        bd = parse_name(name)
        if filt != "none" or bd.base != metric or name.endswith("_stderr"):
            continue
        if bd.length is None and bd.position is None:
            keys.append((name, "all", (0, 0)))
        elif bd.length is not None and bd.position is None:
            keys.append((name, f"len {bd.length}", (1, bd.length)))
        elif bd.length is None and bd.position_kind == "doc":
            keys.append((name, f"pos {bd.position}", (2, float(bd.position))))
    return [(k, label) for k, label, _ in sorted(keys, key=lambda t: t[2])]


def _test(a: np.ndarray, b: np.ndarray, alpha: float, seed: int) -> dict:
    """Two-sided paired test of B - A: exact McNemar for 0/1 values, else a paired bootstrap."""
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    if binary:
        both, a_only, b_only, neither = stats.paired_binary_counts(a, b)
        p = min(1.0, 2 * min(stats.mcnemar_one_sided(a_only, b_only), stats.mcnemar_one_sided(b_only, a_only)))
        low, high = stats.newcombe_paired_ci(both, a_only, b_only, neither, level=1 - alpha)
        return {"method": "exact McNemar", "p": p, "ci": [low, high], "discordant": [a_only, b_only]}
    boot = stats.paired_bootstrap(b - a, alpha / 2, 10000, seed)
    p = min(1.0, 2 * min(boot.p_value, stats.paired_bootstrap(a - b, alpha / 2, 10000, seed).p_value))
    return {"method": "paired bootstrap", "p": p, "ci": list(boot.ci), "discordant": None}


def pair_cells(a: Side, b: Side) -> list[dict]:
    """Every (task, cell) both sides measured on the same documents, with its paired values."""
    common = sorted({t for r in a.runs for t in r.data.get("configs") or {}}
                    & {t for r in b.runs for t in r.data.get("configs") or {}})  # fmt: skip
    if not common:
        raise NeedlesError(
            f"--compare: {a.path} and {b.path} share no task",
            fix="compare two scorecards of the same suite (same budget and lengths)",
        )
    cells = []
    for task in common:
        ra, rb = a.run_of(task), b.run_of(task)
        metric = _primary(ra, task)
        if metric is None or ra.samples_path(task) is None or rb.samples_path(task) is None:
            continue
        check_task_compatible(ra, rb, task)
        keys = _cells(ra, task, metric)
        pairs = load_pairs(ra, rb, task, [(k, "none") for k, _ in keys])
        for key, label in keys:
            pv = pairs[(key, "none")]
            if len(pv.baseline):
                cells.append({"task": task, "metric": metric, "cell": label, "key": key,
                              "a_values": pv.baseline, "b_values": pv.candidate})  # fmt: skip
    if not cells:
        raise NeedlesError(
            "--compare: no task has per-sample logs in both inputs",
            fix="score both models with --log_samples (needles scorecard always does)",
        )
    return cells


def mde_plan(cells: Sequence[dict], alpha: float, effect: float) -> list[power.Planned]:
    """Before the tests: each cell's MDE at its n, from A's score as the base rate (independent errors), at Holm's
    first step (two-sided alpha / m, i.e. one-sided alpha / 2m)."""
    level = alpha / (2 * len(cells))
    return [
        power.plan(
            f"{c['task']} {c['cell']}", len(c["a_values"]), level, effect=effect, p_base=float(np.mean(c["a_values"]))
        )  # fmt: skip
        for c in cells
    ]


def compare(
    a: Side, b: Side, rules: Sequence[Rule], alpha: float = 0.05, effect: float = power.DEFAULT_EFFECT,
    seed: int = 0, log: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """The comparison: per-cell paired tests (Holm), the MDE beside every "no significant change", and the
    effective length of each task on both sides."""
    cells = pair_cells(a, b)
    planned = mde_plan(cells, alpha, effect)
    if log:
        log(power.format_plan(planned, "[needles scorecard --compare]", effect))
    rows = []
    for c, plan in zip(cells, planned, strict=True):
        test = _test(c["a_values"], c["b_values"], alpha, seed)
        rows.append({"task": c["task"], "metric": c["metric"], "cell": c["cell"], "n": len(c["a_values"]),
                     "a": float(np.mean(c["a_values"])), "b": float(np.mean(c["b_values"])),
                     "delta": float(np.mean(c["b_values"] - c["a_values"])), **test, "planned_mde": plan.mde})  # fmt: skip
    for row, p_holm in zip(rows, stats.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
        if p_holm < alpha:
            row["verdict"] = "better" if row["delta"] > 0 else "worse"
        else:
            disc = row["discordant"]
            psi = (sum(disc) / row["n"] or None) if disc else None  # none discordant: plan from the base rate
            observed = power.plan(row["task"], row["n"], alpha / (2 * len(rows)), effect=effect, psi=psi,
                                  p_base=row["a"]) if disc else None  # fmt: skip
            row["mde"] = observed.mde if observed else None
            row["verdict"] = "no significant change" + (f"; {observed.text()}" if observed else "")
    lengths = []
    for ra in a.runs:
        for rb in b.runs:
            if set(ra.data.get("configs") or {}) & set(rb.data.get("configs") or {}):
                try:
                    lengths += [vars(c) for c in check_lengths(ra, rb, list(rules), None, seed)]
                except NeedlesError as e:
                    if "no length breakdown" not in e.problem:
                        raise
    if not lengths:
        require_curves([], [], "--compare")  # exit 2: neither side has a length breakdown
    return {"schema": "needles.scorecard_compare/1", "a": {"label": a.label, "path": str(a.path)},
            "b": {"label": b.label, "path": str(b.path)}, "alpha": alpha, "effect": effect,
            "correction": f"Holm over {len(rows)} two-sided tests", "tests": rows, "effective_length": lengths,
            "mde_plan": [{"cell": p.name, "n": p.n, "mde": p.mde, "can_detect": p.can_detect} for p in planned]}  # fmt: skip


def to_markdown(result: dict) -> str:
    a, b = result["a"]["label"], result["b"]["label"]
    lines = [f"# Scorecard comparison: A = {md_escape(a)}, B = {md_escape(b)}", "",
             f"alpha {result['alpha']}, {result['correction']}; CI: {1 - result['alpha']:.0%} paired interval of B - A.",
             "", "## Effective length", "", "| task | metric | rule | A (90% bootstrap) | B (90% bootstrap) | change |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["effective_length"]:
        change = "shorter" if c["verdict"] == "SHRANK" else ("same" if c["baseline"] == c["candidate"] else "longer")
        lines.append(f"| {md_escape(c['task'])} | {c['metric']} | {c['rule']} | {c['baseline']} ({c['baseline_interval']}) "
                     f"| {c['candidate']} ({c['candidate_interval']}) | {change} |")  # fmt: skip
    lines += ["", "## Paired tests", "", "| task | cell | n | A | B | B - A | CI | p | Holm p | verdict |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
    for r in result["tests"]:
        lines.append(f"| {md_escape(r['task'])} | {r['cell']} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {r['delta']:+.3f} | "
                     f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['p']:.3g} | {r['p_holm']:.3g} | {r['verdict']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
