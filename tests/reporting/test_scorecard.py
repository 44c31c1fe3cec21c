"""The scorecard and its comparison on real lm-eval outputs: `tests/reporting/data/scorecard/` holds the two scorecard
folders of docs/scorecard.md's measurement (`needles scorecard` with the default budget on SmolLM2-135M-Instruct and on
its KV-LoRA finetune), each with its family runs (`lm_eval --model vllm --log_samples` output; the prompt text taken
out of the sample logs to keep them small). How they were made: data/scorecard/README.md. No model runs here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from harness_ext.cli import main
from harness_ext.reporting.effective_length import default_rules, effective_length
from harness_ext.reporting.results_io import load_run
from harness_ext.reporting.scorecard import build_scorecard, write_scorecard

DATA = Path(__file__).resolve().parent / "data" / "scorecard"
A, B = DATA / "base", DATA / "kv-lora"
# anything a browser would fetch: the page may quote a URL as text (why a family was left out), never load one
FETCHES = re.compile(r"""(src|href|action)\s*=\s*["']?\s*(https?:|//)|url\(|@import""", re.IGNORECASE)
LADDER = [256, 512, 1024, 2048, 4096, 7936]
META_KEYS = ("model", "given", "served", "window", "window_source", "budget", "budget_what", "lengths", "command")


def _rebuild(folder: Path, out: Path, **meta) -> tuple[dict, list]:
    saved = json.loads((folder / "scorecard.json").read_text(encoding="utf-8"))
    card, rows = build_scorecard(
        saved["families"], folder, default_rules(), {**{k: saved[k] for k in META_KEYS}, **meta}
    )
    out.mkdir(parents=True, exist_ok=True)
    write_scorecard(card, rows, out, default_rules()[0])
    return card, rows


def test_scorecard_from_real_runs(tmp_path):
    saved = json.loads((A / "scorecard.json").read_text(encoding="utf-8"))
    card, rows = _rebuild(A, tmp_path)
    # the same data gives the same scorecard (the bootstrap is seeded), and the committed file is what the code writes
    assert card["effective_length"] == saved["effective_length"] and card["grids"] == saved["grids"]
    kv = load_run(A / next(f["results"] for f in saved["families"] if f["family"] == "kv"))
    entries = {e["task"]: e for e in card["effective_length"]}
    assert set(entries) == {"kv_retrieval_simple", "niah_single"}
    points = {n: kv.data["results"]["kv_retrieval_simple"][f"both_acc_len{n},none"] for n in LADDER}
    for rule, got in zip(default_rules(), entries["kv_retrieval_simple"]["rules"], strict=True):
        assert got["outcome"] == effective_length(points, rule).display() and got["bootstrap"]  # sample logs found
    niah = entries["niah_single"]["rules"][0]  # 1.0 up to 4096, 0.5 at 7936 (the needle at depth 0 lost)
    assert niah["outcome"] == "4096" and niah["bootstrap"] == "[4096, >=7936]"
    grids = {g["task"]: g for g in card["grids"]}
    assert grids["kv_retrieval_simple"]["depths"] == [0.0, 0.5, 1.0] and grids["niah_single"]["depths"] == [0.0, 1.0]
    assert all(g["lengths"] == LADDER for g in grids.values())
    assert list(card["positions"]) == ["1", "10", "20"]  # synth_mdqa_real, gold positions of 20 documents
    refs = card["references"]
    assert len(refs["ruler"]) > 40 and {r["model"] for r in refs["lost_in_the_middle"]} >= {"GPT-3.5-Turbo (0613)"}
    assert all(len(d["data_sha256"]) == 64 for d in card["data"])
    status = {f["family"]: f["status"] for f in card["families"]}
    assert status == {"kv": "run", "niah": "run", "mdqa": "run", "flenqa": "left out"}
    csv_text = (tmp_path / "scorecard.csv").read_text(encoding="utf-8")
    assert "effective_length,ruler>85.6" in csv_text and "both_acc" in csv_text
    html = (tmp_path / "scorecard.html").read_text(encoding="utf-8")
    assert not FETCHES.search(html) and "<svg" in html and html.count("data:image/png") == 3  # self-contained


def test_untrusted_strings_are_escaped(tmp_path):
    evil = '<script>document.title="owned"</script> & <img src=x onerror=alert(1)>'
    _rebuild(A, tmp_path, model=evil, command=f"needles scorecard '{evil}'")
    html = (tmp_path / "scorecard.html").read_text(encoding="utf-8")
    assert evil not in html and "&lt;script&gt;document.title=" in html and "<img src=x" not in html


def test_page_with_families_left_out(tmp_path):
    """Only the KV family ran (no data for the others, as offline without mirrors): the page says so, no plot missing."""
    saved = json.loads((A / "scorecard.json").read_text(encoding="utf-8"))
    families = [f if f["family"] == "kv" else {**{k: v for k, v in f.items() if k not in ("results", "seconds")},
                "status": "left out", "reason": "no mirror", "fix": "set NEEDLES_NIAH_MIRROR"}
                for f in saved["families"]]  # fmt: skip
    card, rows = build_scorecard(families, A, default_rules(), {k: saved[k] for k in META_KEYS})
    write_scorecard(card, rows, tmp_path, default_rules()[0])
    html = (tmp_path / "scorecard.html").read_text(encoding="utf-8")
    assert [e["task"] for e in card["effective_length"]] == ["kv_retrieval_simple"] and not card["positions"]
    assert html.count("data:image/png") == 2 and "Not measured (the MDQA family was left out" in html
    assert "left out: no mirror (fix: set NEEDLES_NIAH_MIRROR)" in html


def test_compare_two_real_scorecards(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["scorecard", "--compare", str(A), str(B), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    # the MDE of every test is printed before the tests run, with the cells that cannot detect 10 points marked
    assert "minimal detectable effect per target" in cap.err and "CANNOT DETECT" in cap.err
    result = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    cells = {(t["task"], t["cell"]): t for t in result["tests"]}
    assert {("kv_retrieval_simple", f"len {n}") for n in LADDER} | {("synth_mdqa_real", "pos 20")} <= set(cells)
    kv256 = cells[("kv_retrieval_simple", "len 256")]  # 0 -> 1 of 3 documents
    assert (kv256["n"], kv256["a"], round(kv256["b"], 3), kv256["method"]) == (3, 0.0, 0.333, "exact McNemar")
    for t in result["tests"]:
        assert abs(t["b"] - t["a"] - t["delta"]) < 1e-9 and t["p_holm"] >= t["p"]
        # one to three documents per cell: nothing is significant, and each verdict says what could have been seen
        assert t["verdict"].startswith("no significant change; MDE"), t["verdict"]
    assert "MDE none (no effect reaches the power) at n 3" in kv256["verdict"]
    changes = {(c["task"], c["rule"]): (c["baseline"], c["candidate"]) for c in result["effective_length"]}
    assert changes[("kv_retrieval_simple", "relative>0.9x")] == ("<256", "512")
    assert changes[("niah_single", "ruler>85.6")] == ("4096", "4096")
    assert "| kv_retrieval_simple | len 256 |" in cap.out and (out / "compare.html").is_file()
    html = (out / "compare.html").read_text(encoding="utf-8")
    assert not FETCHES.search(html)


def test_compare_refuses_bad_inputs(tmp_path, capsys):
    # results without a length breakdown: the MDQA runs alone (gold positions, no lengths)
    only_mdqa = []
    for side in (A, B):
        saved = json.loads((side / "scorecard.json").read_text(encoding="utf-8"))
        rel = next(f["results"] for f in saved["families"] if f["family"] == "mdqa")
        dest = tmp_path / side.name
        shutil.copytree((side / rel).parent, dest)
        only_mdqa.append(str(dest))
    assert main(["scorecard", "--compare", *only_mdqa, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no length breakdown" in err and "fix:" in err and "Traceback" not in err
    assert main(["scorecard", "--compare", str(A), str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["scorecard", "--compare", str(A), str(B), "--threshold", "150"]) == 2
    assert "outside the 0-100 scale" in capsys.readouterr().err
    assert main(["scorecard", "smollm2", "--compare", str(A), str(B)]) == 2
    assert "not both" in capsys.readouterr().err


def test_scorecard_page_in_headless_chromium(tmp_path):
    from matplotlib.image import imread
    from test_html import Tables, browse

    _rebuild(A, tmp_path)
    page = tmp_path / "scorecard.html"
    proc = browse(page, tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Tables()
    dom.feed(proc.stdout)
    assert dom.body.get("data-ready") == "1" and dom.body.get("data-images") == "3/3"  # every plot decoded
    titles = [t["title"] for t in dom.tables]
    assert {"curves", "positions", "ruler", "families", "hashes"} <= set(titles)
    shot = tmp_path / "scorecard.png"
    proc = browse(page, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,2600")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = imread(shot)
    flat = (img[..., :3] * 255).astype(int).reshape(-1, 3)
    assert (flat.sum(axis=1) < 600).mean() > 0.02  # text, tables and plots, not a blank page
    if os.environ.get("NEEDLES_SCREENSHOT_DIR"):  # to look at the page yourself
        shutil.copy(shot, Path(os.environ["NEEDLES_SCREENSHOT_DIR"]) / "scorecard.png")
