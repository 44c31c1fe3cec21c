"""PNG plots from leaderboard rows: MDQA accuracy by gold position, KV / NIAH / passkey length x depth heatmaps,
FLenQA by length, continuation loss by context length (``loss_plot``), and score by length per family with the
effective-length threshold and the native window (``length_plot``).

Each function returns PNG bytes, or None when the rows hold nothing to plot. Task and metric names come from
harness_ext.tasklib.breakdowns.
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Callable, Iterable

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.effective_length import Rule, effective_length
from harness_ext.reporting.leaderboard_rows import Row
from harness_ext.reporting.leaderboard_views import latest
from harness_ext.reporting.length_curves import curves
from harness_ext.tasklib import breakdowns as names

_STYLE = {"dpi": 110}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise NeedlesError(
            "plots need matplotlib, which is not installed", fix="pip install 'lm-eval-needles[plots]'"
        ) from None

    matplotlib.use("Agg")  # no display on CI or here
    import matplotlib.pyplot as plt

    return plt


def _literal_text(fn: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Draw every text of the plot literally: model and task names come from results files, and a name with two
    ``$`` would otherwise be parsed as mathtext (and a malformed one would crash the plot)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> bytes | None:
        try:
            import matplotlib
        except ImportError:  # the plot function reports it (or has nothing to plot)
            return fn(*args, **kwargs)
        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk: the same data gives the same bytes across matplotlib patch releases.
    fig.savefig(buf, format="png", dpi=_STYLE["dpi"], bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def _label(row: Row) -> str:
    return row["model"] + (f" + {row['adapter']}" if row["adapter"] else "")


def _pick_filter(rows: list[Row], wanted: str | None) -> list[Row]:
    """Keep one filter per plot: the requested one, else "none" when present, else the first seen."""
    filters = sorted({r["filter"] for r in rows})
    if not filters:
        return rows
    chosen = wanted if wanted is not None else ("none" if "none" in filters else filters[0])
    return [r for r in rows if r["filter"] == chosen]


Curve = dict[int, tuple[float, float | None]]  # x (position or length) -> (value, stderr)


def mdqa_series(
    rows: Iterable[Row], metric: str = names.MDQA_METRIC, filt: str | None = None
) -> tuple[dict[tuple[str, str], Curve], dict[str, float], dict[str, float]]:
    """(curves {(model, setting): {position: (value, stderr)}}, closed-book {model: value}, oracle {model: value}).

    The setting keeps different document counts apart: ``mdqa20`` for the ``mdqa20_pos<P>`` subtasks, else the
    task name (e.g. ``mdqa_sweep``, whose per-position scores are ``<metric>_pos<P>`` keys).
    """
    cells = _pick_filter([r for r in latest(rows) if r["metric"] == metric], filt)
    curves: dict[tuple[str, str], dict[int, tuple[float, float | None]]] = {}
    closed: dict[str, float] = {}
    oracle: dict[str, float] = {}
    for r in cells:
        value = float(r["value"])
        if r["task"] == names.MDQA_CLOSEDBOOK and not r["position"]:
            closed[_label(r)] = value
        elif r["task"] == names.MDQA_ORACLE and not r["position"]:
            oracle[_label(r)] = value
        elif r["task"].startswith("mdqa") and r["position_kind"] == "doc" and not r["length"]:
            m = names.MDQA_POSITION_TASK.match(r["task"])
            setting = f"mdqa{m.group(1)}" if m else r["task"]
            stderr = float(r["stderr"]) if r["stderr"] else None
            curves.setdefault((_label(r), setting), {})[int(r["position"])] = (value, stderr)
    return curves, closed, oracle


@_literal_text
def mdqa_plot(
    rows: Iterable[Row], metric: str = names.MDQA_METRIC, filt: str | None = None, oracle: bool = False
) -> bytes | None:
    """One line per model (and setting); closed-book accuracy as a dashed line in the model's colour."""
    from matplotlib.lines import Line2D

    curves, closed, oracles = mdqa_series(rows, metric, filt)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]  # one per setting, when several are plotted
    settings = sorted({s for _, s in curves})
    models = sorted({m for m, _ in curves})
    positions = sorted({p for c in curves.values() for p in c})
    handles = []
    for (model, setting), points in sorted(curves.items()):
        color = colors[models.index(model) % len(colors)]
        xs = sorted(points)
        ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] or 0.0 for x in xs], marker="o", color=color,
                    capsize=3, linestyle=styles[settings.index(setting) % len(styles)])  # fmt: skip
        label = model if len(settings) == 1 else f"{model} ({setting})"
        handles.append(Line2D([], [], color=color, marker="o", label=label))
    for model in models:
        color = colors[models.index(model) % len(colors)]
        if model in closed:
            ax.axhline(closed[model], color=color, linestyle="--", linewidth=1)
        if oracle and model in oracles:
            ax.axhline(oracles[model], color=color, linestyle=":", linewidth=1)
    if any(m in closed for m in models):
        handles.append(Line2D([], [], color="gray", linestyle="--", label="closed-book (same colour)"))
    if oracle and any(m in oracles for m in models):
        handles.append(Line2D([], [], color="gray", linestyle=":", label="oracle (same colour)"))
    ax.set_xticks(positions)
    ax.set_xlabel("Position of the document with the answer")
    ax.set_ylabel(f"Accuracy ({metric})")
    ax.set_title("MDQA: accuracy by gold document position")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def kv_cells(
    rows: Iterable[Row], metric: str = names.KV_METRIC, filt: str | None = None, task: re.Pattern = names.KV_TASK
) -> dict[tuple[str, str], dict[tuple[int, float], float]]:
    """{(model label, task): {(length, depth): value}} for the tasks ``task`` matches (KV by default)."""
    cells = _pick_filter([r for r in latest(rows) if r["metric"] == metric and task.match(r["task"])], filt)
    grids: dict[tuple[str, str], dict[tuple[int, float], float]] = {}
    for r in cells:
        if r["length"] and r["position_kind"] == "depth":
            grids.setdefault((_label(r), r["task"]), {})[(int(r["length"]), float(r["position"]))] = float(r["value"])
    return grids


@_literal_text
def kv_heatmap(
    rows: Iterable[Row], metric: str = names.KV_METRIC, filt: str | None = None, task: re.Pattern = names.KV_TASK
) -> bytes | None:
    """One length x depth grid per (model, task), side by side: base and finetuned next to each other."""
    grids = kv_cells(rows, metric, filt, task)
    if not grids:
        return None
    plt = _pyplot()
    n = len(grids)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1, 3.4 * nrows), squeeze=False, layout="constrained")
    image = None
    for i_ax, (ax, ((label, task), grid)) in enumerate(zip(axes.flat, sorted(grids.items()), strict=False)):
        lengths = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        matrix = [[grid.get((length, d), float("nan")) for d in depths] for length in lengths]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black"
                    )
        ax.set_xticks(range(len(depths)), [names.format_depth(d) for d in depths])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_xlabel("Gold depth (0 = start, 1 = end)")
        if i_ax % cols == 0:
            ax.set_ylabel("Prompt length (tokens)")
        ax.set_title(f"{label}\n{task}", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"Accuracy ({metric})")
    return _png(fig)


def flenqa_series(
    rows: Iterable[Row], metric: str = names.FLENQA_METRIC, filt: str | None = None
) -> dict[tuple[str, str], Curve]:
    """{(model label, task): {ctx size: (value, stderr)}} from FLenQA length breakdowns (all dispersions)."""
    return _length_series(rows, metric, names.FLENQA_TASK, filt)


def _length_series(
    rows: Iterable[Row], metric: str, task: re.Pattern, filt: str | None
) -> dict[tuple[str, str], Curve]:
    """{(model label, task): {length: (value, stderr)}} of the ``_len<L>`` breakdowns of the tasks ``task`` matches."""
    cells = _pick_filter([r for r in latest(rows) if r["metric"] == metric and task.match(r["task"])], filt)
    series: dict[tuple[str, str], Curve] = {}
    for r in cells:
        if r["length"] and not r["position"]:
            stderr = float(r["stderr"]) if r["stderr"] else None
            series.setdefault((_label(r), r["task"]), {})[int(r["length"])] = (float(r["value"]), stderr)
    return series


@_literal_text
def flenqa_plot(rows: Iterable[Row], metric: str = names.FLENQA_METRIC, filt: str | None = None) -> bytes | None:
    series = flenqa_series(rows, metric, filt)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    sizes = sorted({s for points in series.values() for s in points})
    for (label, task), points in sorted(series.items()):
        xs = sorted(points)
        ax.errorbar(
            xs,
            [points[x][0] for x in xs],
            yerr=[points[x][1] or 0.0 for x in xs],
            marker="o",
            capsize=3,
            label=f"{label}: {task}",
        )
    ax.set_xticks(sizes)
    ax.set_xlabel("Input length (tokens)")
    ax.set_ylabel(f"Accuracy ({metric})")
    ax.set_title("FLenQA: accuracy by input length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def niah_heatmap(rows: Iterable[Row], metric: str = names.NIAH_METRIC, filt: str | None = None) -> bytes | None:
    """The NIAH grid (Wu et al.'s success rule by length and depth), drawn as the KV one."""
    return kv_heatmap(rows, metric, filt, task=names.NIAH_TASK)


def passkey_heatmap(rows: Iterable[Row], metric: str = names.PASSKEY_METRIC, filt: str | None = None) -> bytes | None:
    """The passkey grid (exact key by prompt length and key depth), drawn as the KV one."""
    return kv_heatmap(rows, metric, filt, task=names.PASSKEY_TASK)


def loss_series(rows: Iterable[Row], metric: str = "nll", filt: str | None = None) -> dict[tuple[str, str], Curve]:
    """{(model label, task): {context length P: (value, stderr)}} of the continuation-loss tasks."""
    return _length_series(rows, metric, names.LONG_PPL_TASK, filt)


@_literal_text
def loss_plot(rows: Iterable[Row], metric: str = "nll", filt: str | None = None) -> bytes | None:
    """Loss of the same continuation by the context length before it, one line per model; each model's native
    window dotted, where the rows say it (past it the loss shows whether the model still uses the context)."""
    rows = list(rows)
    series = loss_series(rows, metric, filt)
    if not series:
        return None
    windows = native_windows(rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted({label for label, _ in series})
    for (label, task), points in sorted(series.items()):
        color = colors[labels.index(label) % len(colors)]
        xs = sorted(points)
        ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] or 0.0 for x in xs], marker="o", capsize=3,
                    color=color, label=label if len(series) == len(labels) else f"{label}: {task}")  # fmt: skip
        window = windows.get(label)
        if window and min(xs) / 2 <= window <= max(xs) * 2:
            ax.axvline(window, color=color, linestyle=":", linewidth=1.2)
    ticks = sorted({x for points in series.values() for x in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("Context before the continuation (tokens; K = 1024); dotted: native window")
    ax.set_ylabel({"nll": "NLL per token (nats)", "ppl": "Perplexity"}.get(metric, metric))
    ax.set_title("Continuation loss by context length (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def native_windows(rows: Iterable[Row]) -> dict[str, int]:
    """Model label -> its context window where the rows say it: vLLM's ``max_model_len`` or HF's ``max_length`` in
    ``model_args``, else a ``claimed_length`` row (the reference leaderboards' claimed context)."""
    out: dict[str, int] = {}
    for r in rows:
        if r["metric"] == "claimed_length":
            out.setdefault(_label(r), int(float(r["value"])))
            continue
        try:
            args = json.loads(r["model_args"]) if r["model_args"] else {}
        except ValueError:
            continue
        window = args.get("max_model_len") or args.get("max_length") if isinstance(args, dict) else None
        if str(window).isdigit():
            out[_label(r)] = int(window)
    return out


@_literal_text
def length_plot(
    rows: Iterable[Row], rule: Rule, native: dict[str, int] | None = None, metrics: list[str] | None = None
) -> bytes | None:
    """Score by input length, one panel per family (a group's mean curve, else each task), one line per model;
    the RULER threshold as a dashed line, each model's effective length as a star, its native window dotted."""
    rows = list(rows)
    found = curves(rows, metrics)
    if not found:
        return None
    families: dict[str, list] = {}
    for c in found:
        families.setdefault(c.group or c.task, []).append(c)
    for family, members in families.items():
        if any(c.members for c in members):
            families[family] = [c for c in members if c.members]  # the group's mean is what the rule reads
    windows = {**native_windows(rows), **(native or {})}
    plt = _pyplot()
    n = len(families)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    tallest = max(len(m) for m in families.values())  # a legend line per curve: the panel grows with it
    height = max(3.8, 0.17 * tallest + 1.0)
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols + 2, height * nrows), squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted({c.label for c in found})
    for ax, (family, members) in zip(axes.flat, sorted(families.items()), strict=False):
        for c in sorted(members, key=lambda c: (c.label, c.task)):
            color = colors[labels.index(c.label) % len(colors)]
            xs = sorted(c.points)
            name = c.label if len(members) == len({m.label for m in members}) else f"{c.label}: {c.task}"
            ax.plot(xs, [c.points[x] for x in xs], marker="o", color=color, label=name)
            result = effective_length(c.points, rule)
            if result.length is not None:
                ax.plot([result.length], [c.points[result.length]], marker="*", markersize=14, color=color)
            window = windows.get(c.label)
            if window and min(xs) / 2 <= window <= max(xs) * 2:  # a 1M window would squash a 4K-128K sweep
                ax.axvline(window, color=color, linestyle=":", linewidth=1.2)
        ax.axhline(rule.value / 100.0, color="gray", linestyle="--", linewidth=1, label=f"threshold {rule.value:g}")
        ax.set_xscale("log", base=2)
        ticks = sorted({x for c in members for x in c.points})
        ax.set_xticks(ticks, [f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("Input length (tokens; K = 1024); dotted: native window; star: effective length")
        ax.set_ylabel(f"Score ({members[0].metric})")
        ax.set_title(f"{family}: score by length", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _png(fig)


PLOTS = {"mdqa": mdqa_plot, "kv": kv_heatmap, "niah": niah_heatmap, "passkey": passkey_heatmap,
         "flenqa": flenqa_plot, "loss": loss_plot}  # fmt: skip


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def all_plots(rows: list[Row]) -> dict[str, bytes]:
    """Every plot the rows support, by file stem (for the HTML page and ``--plots-dir``)."""
    out: dict[str, bytes] = {}
    for name, fn in PLOTS.items():
        png = fn(rows)
        if png is not None:
            out[name] = png
    return out
