"""The scorecard page (and the comparison page): one self-contained HTML file, rendered by a sandboxed, autoescaping
Jinja environment from ``templates/report/scorecard*.html.jinja``.

Every string on the page (model names, task names, paths, commands) comes from results files or the command line
and is untrusted: autoescaping writes it as text. Plots are the project's PNG plots (``reporting.plots``) inlined as
data URIs; the MDQA position curve is an inline SVG drawn by the template from coordinates computed here. Nothing
refers to a URL outside the file.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from harness_ext.core.paths import templates_dir
from harness_ext.reporting.effective_length import Rule
from harness_ext.reporting.leaderboard_rows import Row

# the inline SVG of the position curve: plot area inside a 560 x 300 box
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 760, 300, 48, 260, 16, 40


def report_env():  # -> jinja2.sandbox.SandboxedEnvironment
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        loader=FileSystemLoader(str(templates_dir() / "report")),
        undefined=StrictUndefined,
        autoescape=True,  # every value on the page is text, never markup
        keep_trailing_newline=True,
    )


def _png_uri(png: bytes | None) -> str | None:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii") if png else None


def plot_images(rows: Sequence[Row], rule: Rule) -> dict[str, str]:
    """{name: data URI} of the plots the rows support: score by length, KV, NIAH and passkey length x depth grids,
    the continuation loss by context length."""
    from harness_ext.reporting import plots

    if not plots.available():
        return {}
    made = {
        "length": plots.length_plot(list(rows), rule),
        "kv": plots.kv_heatmap(rows),
        "niah": plots.niah_heatmap(rows),
        "passkey": plots.passkey_heatmap(rows),
        "loss": plots.loss_plot(rows),
    }
    return {k: uri for k, png in made.items() if (uri := _png_uri(png))}


def position_svg(series: Sequence[tuple[str, dict[str, float], bool]]) -> dict | None:
    """Coordinates of the position plot: ``series`` = (label, {position: accuracy}, ours?). None without data."""
    series = [(label, pts, ours) for label, pts, ours in series if pts]
    if not any(ours for _, _, ours in series):
        return None
    xs = sorted({int(p) for _, pts, _ in series for p in pts})
    lo, hi = min(xs), max(xs)
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(p: int) -> float:
        return _LEFT + (0.5 if hi == lo else (p - lo) / (hi - lo)) * width

    def y(v: float) -> float:
        return _TOP + (1 - v) * height

    palette = ["#1f77b4", "#999999", "#bbbbbb", "#777777", "#cccccc", "#aaaaaa"]
    lines = []
    for i, (label, pts, ours) in enumerate(sorted(series, key=lambda s: not s[2])):
        points = [(x(int(p)), y(v)) for p, v in sorted(pts.items(), key=lambda kv: int(kv[0]))]
        lines.append({
            "label": label, "ours": ours, "color": palette[0] if ours else palette[1 + i % 5],
            "points": " ".join(f"{a:.1f},{b:.1f}" for a, b in points), "dots": points,
            "legend_y": _TOP + 14 * i + 6,
        })  # fmt: skip
    ticks = [{"x": x(p), "label": str(p)} for p in xs]
    yticks = [{"y": y(v), "label": f"{v:.1f}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return {"w": _W, "h": _H, "left": _LEFT, "top": _TOP, "right": _W - _RIGHT, "bottom": _H - _BOTTOM,
            "lines": lines, "xticks": ticks, "yticks": yticks, "legend_x": _W - _RIGHT + 10}  # fmt: skip


def headline(card: dict) -> list[dict]:
    """The cards up front: per task (or group) its effective length under each rule, with the bootstrap interval."""
    out = []
    for e in card["effective_length"]:
        out.append({
            "task": e["task"] + (f" ({len(e['members'])} tasks)" if e["members"] else ""),
            "metric": e["metric"], "lengths": ", ".join(e["points"]),
            "rules": e["rules"], "documents": e["documents"], "wavg_inc": e["wavg_inc"], "wavg_dec": e["wavg_dec"],
            "scores": [(k, v) for k, v in e["points"].items()],
        })  # fmt: skip
    return out


def render_scorecard(card: dict, rows: Sequence[Row], rule: Rule) -> str:
    """The scorecard page of one model."""
    ours = card["positions"]
    refs = card["references"]
    mdqa = next((f for f in card["families"] if f["family"] == "mdqa"), {})
    docs = (mdqa.get("metadata") or {}).get("synth_num_documents", "?")
    series = [(f"{card['model']} ({docs} documents)", {k: v["value"] for k, v in ours.items()}, True)]
    series += [
        (f"{r['model']} (paper, 20 documents)", r["positions"], False) for r in refs.get("lost_in_the_middle", [])
    ]
    return (
        report_env()
        .get_template("scorecard.html.jinja")
        .render(
            card=card,
            headline=headline(card),
            images=plot_images(rows, rule),
            svg=position_svg(series),
            rule=rule.label,
            ruler_lengths=sorted({int(k) for r in refs.get("ruler", []) for k in r["scores"]}),
        )
    )
