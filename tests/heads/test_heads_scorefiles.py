"""Head-score files in both formats: our heads.json and the reference's published head_score/<model>.json.

Reads the two real published files (Wu et al.'s github.com/nightdessert/Retrieval_Head, verified against
the shared data's MANIFEST.sha256) and checks the facts the paper's repository publishes; then compares
across formats through `needles heads compare`. No model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from harness_ext.cli.app import main
from harness_ext.core.errors import NeedlesError
from harness_ext.heads import compare as heads_compare
from harness_ext.heads import knockout as heads_knockout
from harness_ext.heads import scorefile
from harness_ext.heads.scores import head_set, ranked_heads, retrieval_heads

MISTRAL = "Mistral-7B-v0.2-hf.json"
LLAMA = "llama-2-7b-80k.json"


@pytest.fixture(scope="module")
def head_score(shared_data) -> Path:
    folder = shared_data / "retrieval-head" / "head_score"
    manifest = (shared_data / "retrieval-head" / "MANIFEST.sha256").read_text().splitlines()
    expected = {parts[2]: (parts[0], int(parts[1])) for parts in (ln.split() for ln in manifest if ln[:1] != "#")}
    for name in (MISTRAL, LLAMA):
        data = (folder / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == expected[f"head_score/{name}"], name
    return folder


def _means(path: Path) -> dict[tuple[int, int], float]:
    """The published scores computed independently of the reader: mean of each "layer-head" list."""
    raw = json.loads(path.read_text())
    return {tuple(int(x) for x in k.split("-")): float(np.mean(v)) for k, v in raw.items()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["heads", *argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_published_mistral_scores_match_the_published_facts(head_score):
    s = scorefile.load_head_scores(head_score / MISTRAL)
    assert s.format == scorefile.PUBLISHED and s.format_name == "published head_score"
    assert (s.num_layers, s.num_heads) == (32, 32) and s.scores.size == 1024
    assert s.threshold == 0.1 and s.model == "Mistral-7B-v0.2-hf"
    assert s.num_retrieved == 362  # one score per head per successful test
    assert len(retrieval_heads(s.scores, s.threshold)) == 43
    top = ranked_heads(s.scores)[:2]
    assert top == [(18, 0), (12, 7)]
    assert [round(float(s.scores[h]), 2) for h in top] == [0.94, 0.93]
    means = _means(head_score / MISTRAL)
    assert all(s.scores[h] == pytest.approx(m, abs=1e-12) for h, m in means.items())


def test_published_llama_2_7b_80k_scores(head_score):
    """Llama-2-7B-80K: 32 layers x 32 heads (count = layers * heads), 33 heads above 0.1, 16-19 then 11-15."""
    s = scorefile.load_head_scores(head_score / LLAMA)
    means = _means(head_score / LLAMA)
    layers, heads = 1 + max(la for la, _ in means), 1 + max(h for _, h in means)
    assert (s.num_layers, s.num_heads) == (layers, heads) == (32, 32)
    assert len(means) == layers * heads == s.scores.size
    assert s.format == scorefile.PUBLISHED and s.num_retrieved == 586
    assert len(head_set(s.scores, 0.1)) == sum(m > 0.1 for m in means.values()) == 33
    top = ranked_heads(s.scores)[:3]
    assert top == [(16, 19), (11, 15), (8, 26)]
    assert [round(float(s.scores[h]), 2) for h in top] == [0.94, 0.92, 0.8]
    assert all(0.0 <= x <= 1.0 + 1e-9 for x in s.scores.ravel())


def test_knockout_selects_the_published_top_heads(head_score):
    s = scorefile.load_head_scores(head_score / MISTRAL)
    top = heads_knockout.select_heads(s.scores, heads_knockout.parse_knockout("top:2"))
    assert top == [(12, 7), (18, 0)]
    rnd = heads_knockout.select_heads(s.scores, heads_knockout.parse_knockout("random:2"), draw=0, seed=0)
    assert len(rnd) == 2 and not set(rnd) & set(top)


def test_compare_of_the_two_published_files_matches_by_index_and_says_so(head_score, tmp_path, capsys):
    """Both are 32x32, so the overlap is computed (by index) and the output names format and caveat."""
    rc, out, err = _run(
        capsys, "compare", str(head_score / MISTRAL), str(head_score / LLAMA), "-o", str(tmp_path / "c.json")
    )
    assert rc == 0, err
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["a"]["format"] == c["b"]["format"] == "published"
    assert (c["a"]["model"], c["b"]["model"]) == ("Mistral-7B-v0.2-hf", "llama-2-7b-80k")
    ma, mb = _means(head_score / MISTRAL), _means(head_score / LLAMA)
    ha = {h for h, m in ma.items() if m > 0.1}
    hb = {h for h, m in mb.items() if m > 0.1}
    assert (c["num_heads_a"], c["num_heads_b"], c["num_shared"]) == (43, 33, len(ha & hb))
    assert c["jaccard"] == pytest.approx(len(ha & hb) / len(ha | hb), abs=1e-6)
    assert {(r["layer"], r["head"]) for r in c["appeared"]} == hb - ha
    assert any("different models" in n for n in c["notes"])
    assert sum("published head_score file" in n for n in c["notes"]) == 2
    assert "published head_score" in out and "different models" in out


def test_compare_ours_with_published_detects_each_format(head_score, tmp_path, capsys):
    """A heads.json holding the published means agrees perfectly with the published file it came from."""
    published = scorefile.load_head_scores(head_score / MISTRAL)
    ours = {
        "schema": scorefile.SCHEMA,
        "model": {"model": "/models/Mistral-7B-v0.2-hf", "adapter": None},
        "num_layers": 32,
        "num_heads": 32,
        "threshold": 0.1,
        "scores": published.scores.tolist(),
    }
    scorefile.write_json(tmp_path / "heads.json", ours)
    rc, out, err = _run(
        capsys, "compare", str(tmp_path / "heads.json"), str(head_score / MISTRAL), "-o", str(tmp_path / "c.json")
    )
    assert rc == 0, err
    c = json.loads((tmp_path / "c.json").read_text())
    assert (c["a"]["format"], c["b"]["format"]) == ("needles", "published")
    assert c["num_shared"] == c["num_heads_a"] == c["num_heads_b"] == 43
    assert c["jaccard"] == 1.0 and c["spearman_all_heads"] == 1.0 and c["appeared"] == c["disappeared"] == []
    assert not any("different models" in n for n in c["notes"])
    assert "needles heads.json" in out and "published head_score" in out


def test_compare_refuses_grids_of_different_shapes(head_score, tmp_path, capsys):
    small = {"schema": scorefile.SCHEMA, "scores": [[0.5, 0.0], [0.0, 0.2]], "threshold": 0.1, "model": {}}
    scorefile.write_json(tmp_path / "small.json", small)
    rc, out, err = _run(
        capsys, "compare", str(head_score / LLAMA), str(tmp_path / "small.json"), "-o", str(tmp_path / "c.json")
    )
    assert rc == 2 and "Traceback" not in err
    assert "head grids differ: A is 32 layers x 32 heads (published head_score), B is 2 layers x 2 heads" in err
    assert "fix:" in err and not (tmp_path / "c.json").exists()
    with pytest.raises(NeedlesError, match="head grids differ"):
        heads_compare.compare(scorefile.load_head_scores(head_score / MISTRAL), scorefile.from_report(small))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"0-0": [0.1, 0.2], "0-1": [0.3', "not valid JSON"),  # truncated
        ("", "not valid JSON"),
        ("{}", "neither"),
        ("[[0.1]]", "neither"),
        ('{"0-0": [1], "0-1": [0], "1-1": [0]}', "incomplete"),  # 1-0 missing
        ('{"0-0": [1], "0-1": "high"}', "no list of finite scores"),
        ('{"0-0": [], "0-1": [1]}', "no list of finite scores"),
        ('{"0-0": [1], "0-1": [NaN]}', "no list of finite scores"),
        ('{"schema": "other/1", "scores": [[1]]}', "schema"),
        ('{"schema": "needles.heads/1", "scores": [[0.1, 0.2], [0.3]]}', "matrix"),
        ('{"schema": "needles.heads/1", "scores": [[0.1, "x"]]}', "matrix"),
        ('{"schema": "needles.heads/1", "scores": []}', "matrix"),
        ('{"schema": "needles.heads/1", "scores": [[0.1, 0.2]], "num_heads": 3}', "num_heads=3"),
    ],
)
def test_bad_score_files_are_refused_with_a_fix(tmp_path, text, message):
    with pytest.raises(NeedlesError, match=message) as info:
        scorefile.load_head_scores(_write(tmp_path / "s.json", text))
    assert info.value.fix


def test_truncated_published_file_is_refused(head_score, tmp_path, capsys):
    cut = _write(tmp_path / "cut.json", (head_score / MISTRAL).read_text()[:5000])
    rc, _, err = _run(capsys, "compare", str(cut), str(head_score / MISTRAL))
    assert rc == 2 and "not valid JSON" in err and "truncated" in err and "Traceback" not in err
