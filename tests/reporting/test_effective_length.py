"""Effective context length: RULER's published table reproduced (and its disagreeing rows named), the rules'
outcomes, the scales, the bootstrap, and every place it is shown (results, leaderboard, plot, gate). No model
runs: the results files are written in lm-eval 0.4.13's schema with per-document sample logs whose keys come
from the tasks' own breakdown helper; the real lm-eval run is tests/reporting/test_effective_length_vllm.py.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.effective_length import (
    Rule,
    bootstrap,
    cell_text,
    check_threshold,
    default_rules,
    effective_length,
    untested_lengths,
    weighted_averages,
)
from harness_ext.reporting.length_curves import summarize

REPO = Path(__file__).resolve().parents[2]
RULER_CSV = REPO / "leaderboards" / "ruler_main_results.csv"
RULER = Rule("ruler", 85.6)
COLUMNS = ["4K", "8K", "16K", "32K", "64K", "128K"]
# The author-reported rows whose published effective length the rule does not give (rule's value, published).
DISAGREE = {
    "Qwen3-14B* (14B)": ("64K", ">128K"),  # 85.1 at 128K
    "Qwen3-32B* (32B)": ("64K", ">128K"),  # 85.6 at 128K: equal, not above
    "Qwen2.5-7B-Instruct-1M* (7B)": ("64K", ">128K"),  # 84.4 at 128K
    "Qwen3-8B* (8B)": ("32K", "64K"),  # 82.1 at 64K
    "Qwen3-4B* (4B)": ("32K", "64K"),  # 77.8 at 64K
    "EXAONE-4.0-1.2B* (1.2B)": ("16K", "32K"),  # 81.1 at 32K
}


# ------------------------------------------------------------------------------------------ RULER's table
def _table(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "ruler" / "main_results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _points(record: dict[str, str]) -> dict[int, float]:
    return {4096 * 2**i: float(record[c]) for i, c in enumerate(COLUMNS) if record[c] not in ("", "-")}


def _ruler_text(result) -> str:
    if result.kind == "at_least":
        return f">{result.lengths[-1] // 1024}K"
    if result.kind == "below_all":
        return f"<{result.lengths[0] // 1024}K"
    return f"{result.length // 1024}K"


def test_rule_reproduces_rulers_effective_length_column(shared_data):
    agree, disagree = [], {}
    for record in _table(shared_data):
        published = record["effective_length"].strip().upper()
        if not published:  # Llama2 (7B): the threshold's own row
            continue
        got = _ruler_text(effective_length(_points(record), RULER, scale="percent"))
        if got == published:
            agree.append(record["model"])
        else:
            disagree[record["model"]] = (got, published)
    assert disagree == {m: (ours, pub.upper()) for m, (ours, pub) in DISAGREE.items()}
    assert all("*" in m for m in disagree)  # only author-reported rows disagree
    assert len(agree) == 37 and "GPT-4-1106-preview" in agree and "LWM (7B)" in agree  # 64K, and "<4K"
    assert "Gemini-1.5-pro" in agree and "Mistral (7B)" in agree  # ">128K", and 16K


def test_weighted_averages_match_the_table(shared_data):
    """Scores are published to 0.1, so a recomputed average may differ by 0.05 (inputs) + 0.05 (its own rounding)."""
    beyond_rounding = []
    checked = 0
    for record in _table(shared_data):
        if not record["avg"]:
            continue
        avg, inc, dec = weighted_averages(_points(record))
        for column, ours in (("avg", avg), ("wavg_inc", inc), ("wavg_dec", dec)):
            if record[column] in ("TBD", ""):
                continue
            checked += 1
            if abs(ours - float(record[column])) > 0.1 + 1e-9:
                beyond_rounding.append((record["model"], column))
    assert checked == 43 + 2 * 33
    assert beyond_rounding == [("Qwen2.5-14B-Instruct-1M* (14B)", "avg")]  # published 95.7, the six give 95.2
    avg, inc, dec = weighted_averages({4096: 96.6, 8192: 96.3, 16384: 95.2, 32768: 93.2, 65536: 87.0, 131072: 81.2})
    assert (round(inc, 1), round(dec, 1)) == (89.0, 94.1)  # GPT-4-1106: weights 1..6 and 6..1


def test_reference_leaderboard_is_built_from_the_table_by_the_script(shared_data, tmp_path):
    out = tmp_path / "ruler.csv"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_ruler_leaderboard.py"),
         str(shared_data / "ruler" / "main_results.csv"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == RULER_CSV.read_text(), "rerun scripts/build_ruler_leaderboard.py"
    rows = lb.read_csv(RULER_CSV)
    assert lb.to_csv_text(rows) == RULER_CSV.read_text()  # canonical: an upsert into it changes nothing else
    assert all(r["run_id"] == "ref:arXiv:2404.06654" and r["source"] for r in rows)
    el = {(r["model"], r["filter"]): r for r in rows if r["metric"] == "effective_length"}
    assert el[("Mistral (7B)", "ruler>85.6")]["value"] == "16384"
    assert el[("Gemini-1.5-pro", "ruler>85.6")]["note"].startswith(">=131072 | RULER rule")
    assert el[("LWM (7B)", "ruler>85.6")]["value"] == "0" and el[("LWM (7B)", "ruler>85.6")]["note"][:5] == "<4096"
    flagged = sorted(m for (m, f), r in el.items() if "DISAGREES" in r["note"])
    assert flagged == sorted(m.replace("*", "") for m in DISAGREE)
    qwen = el[("Qwen3-32B (32B)", "ruler>85.6")]
    assert qwen["value"] == "65536" and "published: >128K (DISAGREES" in qwen["note"]
    score = {(r["model"], r["length"]): float(r["value"]) for r in rows if r["metric"] == "score"}
    assert score[("Mistral (7B)", "65536")] == 0.49 and ("EXAONE-4.0-1.2B (1.2B)", "131072") not in score
    claimed = {r["model"]: r["value"] for r in rows if r["metric"] == "claimed_length"}
    assert claimed["Mistral (7B)"] == "32768" and claimed["GLM4 (9B)"] == "1048576"


# ------------------------------------------------------------------------------------------ rules and scales
def test_outcomes_are_distinct_and_strict():
    assert effective_length({400: 0.9, 800: 0.95}, RULER).display() == ">=800"
    assert effective_length({400: 0.9, 800: 0.95}, RULER).kind == "at_least"
    below = effective_length({400: 0.5, 800: 0.95}, RULER)
    assert (below.kind, below.length, below.value, below.display()) == ("below_all", None, 0, "<400")
    # every shorter length must pass: a dip stops it even when a longer length recovers
    assert effective_length({1: 90.0, 2: 80.0, 3: 90.0}, RULER, "percent").display() == "1"
    assert effective_length({1: 90.0, 2: 85.6}, RULER, "percent").display() == "1"  # equal is not above
    assert effective_length({1: 0.90, 2: 0.856}, RULER).display() == "1"  # the same on the fraction scale
    assert effective_length({1: 90.0, 2: 85.7}, RULER, "percent").display() == ">=2"


def test_relative_rule_for_small_models():
    small = {400: 0.40, 800: 0.37, 1600: 0.30}  # never near 85.6
    assert effective_length(small, RULER).display() == "<400"
    rel = effective_length(small, Rule("relative", 0.9))
    assert rel.display() == "800" and rel.cutoff == pytest.approx(0.36)
    assert effective_length({400: 0.0, 800: 0.0}, Rule("relative", 0.9)).kind == "below_all"
    assert Rule("relative", 0.9).label == "relative>0.9x" and RULER.label == "ruler>85.6"


def test_scales_and_bad_thresholds_are_refused_with_the_fix():
    with pytest.raises(NeedlesError) as exc:
        effective_length({400: 85.0, 800: 80.0}, RULER)  # percentages given as fractions
    assert "fraction scale" in exc.value.problem
    with pytest.raises(NeedlesError) as exc:
        effective_length({}, RULER)
    assert "no length breakdown" in exc.value.problem and "lengths" in exc.value.fix
    for bad in (0.856, 150.0, -3.0, 100.0):
        with pytest.raises(NeedlesError) as exc:
            check_threshold(bad)
        assert "0-100 scale" in exc.value.problem and "85.6" in exc.value.fix
    with pytest.raises(NeedlesError, match="did you mean|a fraction"):
        check_threshold(0.856)
    with pytest.raises(NeedlesError, match="relative"):
        default_rules(85.6, 1.5)


def test_lengths_are_ordered_as_numbers_not_as_text():
    points = {"4k": 0.95, "16k": 0.5, "8K": 0.9}  # as text, "16k" sorts first and the curve reads backwards
    result = effective_length(points, RULER)
    assert (result.lengths, result.display()) == ((4096, 8192, 16384), "8192")
    assert weighted_averages(points) == weighted_averages({4096: 0.95, 8192: 0.9, 16384: 0.5})
    assert effective_length({4096: 0.9, "1M": 0.9}, RULER).lengths == (4096, 1048576)
    boot = bootstrap({("t", "4k"): [1.0] * 10, ("t", "16K"): [0.0] * 10}, RULER, iters=100)
    assert boot.interval_text() == "4096"
    for bad in ({"4 tokens": 0.9, 8192: 0.9}, {4096.0: 0.9}, {True: 0.9}, {"-4k": 0.9}):
        with pytest.raises(NeedlesError) as exc:
            effective_length(bad, RULER)
        assert "is not a number of tokens" in exc.value.problem and '"4k"' in exc.value.fix
    with pytest.raises(NeedlesError, match="twice"):
        weighted_averages({4096: 0.9, "4k": 0.8})


def test_a_nan_score_is_named_with_its_length_and_curve(tmp_path):
    with pytest.raises(NeedlesError) as exc:
        effective_length({4096: 0.9, 8192: float("nan")}, RULER)
    assert "length 8192 is nan" in exc.value.problem and "scale" not in exc.value.problem
    assert "rerun that task at that length" in exc.value.fix
    with pytest.raises(NeedlesError, match="length 8192 is nan"):
        bootstrap({("t", 4096): [1.0, 1.0], ("t", 8192): [1.0, float("nan")]}, RULER, iters=10)
    rows = [{**dict.fromkeys(lb.COLUMNS, ""), "model": "Qwen", "task": "niah_single_1", "metric": "score",
             "filter": "none", "length": str(n), "value": v, "date": "2026-01-01", "run_id": "r"}
            for n, v in ((4096, "0.9"), (8192, "nan"))]  # fmt: skip
    with pytest.raises(NeedlesError) as exc:
        summarize(rows, [RULER])
    assert exc.value.problem.startswith("Qwen, task niah_single_1, metric score: the score at length 8192 is nan")


def test_an_untested_doubling_is_named_in_the_outcome():
    assert untested_lengths([4096, 16384]) == [8192] and untested_lengths([400, 800, 1600]) == []
    assert untested_lengths([1024, 8192, 10000]) == [2048, 4096]
    assert effective_length({4096: 0.9, 16384: 0.9}, RULER).display() == ">=16384 (8192 not tested)"
    # L = 4096, the first failure at 16384: 8192 could have passed, the effective length could be longer
    assert effective_length({4096: 0.9, 16384: 0.5}, RULER).display() == "4096 (8192 not tested)"
    # a gap beyond the first failure, or below a failing shortest length, cannot change the outcome
    assert effective_length({4096: 0.9, 8192: 0.5, 32768: 0.5}, RULER).display() == "4096"
    assert effective_length({4096: 0.5, 16384: 0.9}, RULER).display() == "<4096"
    assert cell_text("4096 (8192 not tested) | RULER rule ...", "4096") == "4096 (8192 not tested)"
    assert cell_text("reported by the model authors", "4096") == "4096"


def test_bootstrap_is_seeded_and_covers_where_the_length_can_land():
    cells = {("t", 400): [1.0] * 9 + [0.0], ("t", 800): [1.0] * 8 + [0.0] * 2}
    a = bootstrap(cells, RULER, iters=2000, seed=3)
    assert a == bootstrap(cells, RULER, iters=2000, seed=3)
    assert sum(a.counts.values()) == 2000
    assert set(a.counts) == {"<400", "400", ">=800"} and a.low == "<400" and a.high == ">=800"
    sure = bootstrap({("t", 400): [1.0] * 10, ("t", 800): [1.0] * 10}, RULER, iters=200)
    assert sure.counts == {">=800": 200} and sure.interval_text() == ">=800"
    # a group: two tasks averaged per resample (task b alone would fail at 800)
    two = {("a", 400): [1.0] * 10, ("a", 800): [1.0] * 10, ("b", 400): [1.0] * 10, ("b", 800): [0.8] * 10}
    assert bootstrap(two, RULER, iters=100).counts == {">=800": 100}
