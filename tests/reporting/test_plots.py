"""PNG plots: the series they draw come from the rows, the files decode, and identical input gives identical bytes.
Plots from real lm_eval runs (KV, MDQA, FLenQA) are made in test_leaderboard_e2e.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from harness_ext.cli import main
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting import plots
from harness_ext.tasklib import breakdowns as names

REPO = Path(__file__).resolve().parents[2]
LITM = REPO / "leaderboards" / "lost_in_the_middle_mdqa20.csv"


def _image(png: bytes) -> np.ndarray:
    return imread(io.BytesIO(png), format="png")


def _row(**fields) -> dict:
    row = dict.fromkeys(lb.COLUMNS, "")
    row.update(filter="none", date="2026-01-01T00:00:00Z", run_id="r1", **{k: str(v) for k, v in fields.items()})
    return row


def test_mdqa_plot_of_the_reference_leaderboard(tmp_path):
    rows = lb.read_csv(LITM)
    curves, closed, oracle = plots.mdqa_series(rows)
    expected = {(r["model"], int(r["position"])): float(r["value"]) for r in rows if r["position_kind"] == "doc"}
    assert {(m, p): v for (m, setting), c in curves.items() for p, (v, _se) in c.items()} == expected
    assert {setting for _m, setting in curves} == {"mdqa20"}
    assert closed == {r["model"]: float(r["value"]) for r in rows if r["task"] == "mdqa_closedbook"}
    assert set(oracle) == set(closed)
    png = plots.mdqa_plot(rows)
    img = _image(png)
    assert img.shape[1] > 600 and img.shape[0] > 300
    assert png == plots.mdqa_plot(list(reversed(rows)))  # deterministic, independent of row order
    out = tmp_path / "mdqa.png"
    assert main(["plot", "mdqa", str(LITM), "-o", str(out)]) == 0
    assert out.read_bytes() == png


def test_kv_heatmap_cells_and_panels():
    rows = []
    for model in ("m1", "m2", "m3", "m4"):
        for length in (1024, 2048):
            for i, depth in enumerate(("0.00", "0.50", "1.00")):
                value = (i + length / 1024) / 10
                rows.append(_row(model=model, task="kv_retrieval_simple", metric="both_acc", length=length,
                                 position=depth, position_kind="depth", value=value))  # fmt: skip
        rows.append(_row(model=model, task="kv_retrieval_simple", metric="both_acc", value=0.5))  # overall: not a cell
    grids = plots.kv_cells(rows)
    assert len(grids) == 4
    assert grids[("m1", "kv_retrieval_simple")] == {(ln, float(d)): (i + ln / 1024) / 10 for ln in (1024, 2048)
                                                   for i, d in enumerate(("0.00", "0.50", "1.00"))}  # fmt: skip
    img = _image(plots.kv_heatmap(rows))
    assert img.shape[0] > img.shape[1] / 3  # 4 panels laid out on two rows
    assert plots.kv_heatmap(rows, metric="value_acc") is None


def test_niah_heatmap_shows_base_and_finetuned_side_by_side(tmp_path):
    rows = []
    for model, adapter, shift in (("smol", "", 0.0), ("smol", "lora", 0.25)):
        for length in (512, 1024):
            for depth in ("0.00", "0.50", "1.00"):
                rows.append(_row(model=model, adapter=adapter, task="niah_single", metric="niah_success", length=length,
                                 position=depth, position_kind="depth", value=0.5 + shift - length / 4096))  # fmt: skip
        rows.append(_row(model=model, adapter=adapter, task="kv_retrieval_simple", metric="niah_success",
                         length=512, position="0.00", position_kind="depth", value=0.9))  # fmt: skip
    grids = plots.kv_cells(rows, "niah_success", task=names.NIAH_TASK)
    assert set(grids) == {("smol", "niah_single"), ("smol + lora", "niah_single")}
    assert grids[("smol + lora", "niah_single")][(1024, 0.5)] == pytest.approx(0.5)
    png = plots.niah_heatmap(rows)
    img = _image(png)
    assert img.shape[1] > img.shape[0]  # two panels on one row
    assert plots.niah_heatmap([r for r in rows if r["task"] != "niah_single"]) is None
    assert "niah" in plots.all_plots(rows) and "kv" not in plots.all_plots(rows)  # KV rows carry another metric


def test_flenqa_plot_uses_length_breakdowns_only():
    rows = []
    for task in ("flenqa_pir", "flenqa_monorel_cot"):
        for size, value in ((250, 0.9), (500, 0.8), (1000, 0.7)):
            rows.append(_row(model="m", task=task, metric="acc", length=size, value=value, stderr=0.05))
        rows.append(_row(model="m", task=task, metric="acc", position="first", position_kind="dispersion", value=0.1))
    rows.append(_row(model="m", task="mdqa20_pos1", metric="acc", length=250, value=0.2))  # not FLenQA
    series = plots.flenqa_series(rows)
    assert series == {("m", t): {250: (0.9, 0.05), 500: (0.8, 0.05), 1000: (0.7, 0.05)}
                      for t in ("flenqa_pir", "flenqa_monorel_cot")}  # fmt: skip
    assert _image(plots.flenqa_plot(rows)).ndim == 3


def test_all_plots_only_what_the_data_supports(tmp_path, capsys):
    assert set(plots.all_plots(lb.read_csv(LITM))) == {"mdqa"}
    assert main(["plot", "flenqa", str(LITM), "-o", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "nothing to plot" in err and "mdqa20_pos1:best_subspan_em" in err
    assert not (tmp_path / "f.png").exists()
