"""MuSiQue and SummHay rows on the generated fixtures, with the real SmolLM2 tokenizer (no model, no lm_eval):
exact lengths, paired placements, answer-free padding, fixtures marked and refused without the opt-in,
determinism and the cache, clear errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.data.dataset_cache import file_sha256
from harness_ext.data.sources import FIXTURE_MARKER
from harness_ext.tasklib.haystack_fit import Unit, arrange, cut, fit_haystack, key_slots
from harness_ext.tasklib.metrics import squad_normalize
from harness_ext.tasklib.musique import musique_dataset, read_rows, render
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture
from harness_ext.tasklib.summhay import summhay_dataset
from harness_ext.tasklib.token_budget import count_tokens


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa-fixtures")
    write_musique_fixture(root / "musique", num_questions=12)
    write_summhay_fixture(root / "summhay", num_documents=12)
    return root


@pytest.fixture
def meta(fixtures, smollm2_dir, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    return {
        "pretrained": str(smollm2_dir),
        "musique_mirror": str(fixtures / "musique"),
        "summhay_mirror": str(fixtures / "summhay"),
        "allow_unofficial_data": True,
    }


def test_fixtures_are_deterministic_marked_and_in_the_official_schema(fixtures, tmp_path):
    write_musique_fixture(tmp_path / "m", num_questions=12)
    write_summhay_fixture(tmp_path / "s", num_documents=12)
    for name, sub in (("musique", "m"), ("summhay", "s")):
        marker = json.loads((fixtures / name / FIXTURE_MARKER).read_text())
        assert "FIXTURE" in marker["label"]
        for rel, sha in marker["files"].items():
            assert file_sha256(tmp_path / sub / rel) == sha == file_sha256(fixtures / name / rel)
    row = json.loads((fixtures / "musique" / "musique_ans_v1.0_dev.jsonl").read_text().splitlines()[1])
    assert row["id"].startswith("3hop1__") and len(row["paragraphs"]) == 20 and row["answerable"] is True
    support = [p["idx"] for p in row["paragraphs"] if p["is_supporting"]]
    assert sorted(d["paragraph_support_idx"] for d in row["question_decomposition"]) == support
    assert [p["idx"] for p in row["paragraphs"]] == list(range(20))
    topic = json.loads((fixtures / "summhay" / "data" / "topic_conv3.json").read_text())
    ids = {i["insight_id"] for s in topic["subtopics"] for i in s["insights"]}
    assert all(set(d["insights_included"]) <= ids for d in topic["documents"])


def test_musique_fixture_never_trains_on_a_dev_question(tmp_path):
    """Invented names repeat: at 100 questions (seed 0) a train row drew a dev row's question, and the finetune's
    leakage check refused the real cell's training set. Train rows skip a question already asked."""
    from harness_ext.tasklib.real_baseline import question_hash

    write_musique_fixture(tmp_path, num_questions=100)
    asked = {
        split: [question_hash(json.loads(line)["question"]) for line in (tmp_path / rel).read_text().splitlines()]
        for split, rel in (("dev", "musique_ans_v1.0_dev.jsonl"), ("train", "musique_ans_v1.0_train.jsonl"))
    }
    assert len(asked["dev"]) == len(asked["train"]) == 100
    assert not set(asked["dev"]) & set(asked["train"]) and len(set(asked["train"])) == 100


def test_musique_rows_exact_lengths_paired_placements(meta, smollm2_dir):
    meta.update(musique_lengths=[768, 1024], musique_num_questions=3)
    ds = musique_dataset(**meta)
    rows = list(ds["test"])
    assert len(rows) == 3 * 2 * 3 and [r["placement"] for r in rows[:3]] == ["early", "spread", "late"]
    info = ds.needles_info
    assert info["needles_data_official"] is False and "NON-OFFICIAL DATA: fixture" in info["needles_alias_marks"]
    tok = load_tokenizer(str(smollm2_dir))
    assert count_tokens(tok, [r["prompt"] for r in rows]) == [r["n_tokens"] for r in rows]
    for i in range(0, len(rows), 3):
        cell = rows[i : i + 3]
        assert max(r["n_tokens"] for r in cell) <= cell[0]["target_tokens"]
        assert max(r["n_tokens"] for r in cell) >= cell[0]["target_tokens"] - 24  # filled to the word (+ a header)
        assert len({tuple(sorted(x.rstrip("*") for x in r["layout"])) for r in cell}) == 1  # same units
        for r in cell:
            n, k = r["num_paragraphs"], len(r["supporting_positions"])
            assert r["supporting_positions"] == [s + 1 for s in key_slots(r["placement"], k, n)]
            assert k == r["hops"] and r["question"] in r["prompt"] and r["prompt"].endswith("\nAnswer:")


def test_one_more_word_does_not_fit_and_padding_is_answer_free(fixtures, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    rows = read_rows(str(fixtures / "musique" / "musique_ans_v1.0_dev.jsonl"), "t")
    row = rows[0]
    units = [Unit(str(p["idx"]), p["title"], p["paragraph_text"], p["is_supporting"]) for p in row["paragraphs"]]
    keys, pool = [u for u in units if u.key], [u for u in units if not u.key]

    def draw(us):
        return render(row["question"], us)

    got = fit_haystack(keys, pool, ("early", "late"), 700, draw, tok, "t")
    assert max(got.tokens.values()) <= 700
    over = pool[: got.whole] + [cut(pool[got.whole], got.words + 1)]
    assert max(count_tokens(tok, [draw(arrange(keys, over, p)) for p in ("early", "late")])) > 700
    with pytest.raises(NeedlesError, match="cannot hold the question"):
        fit_haystack(keys, pool, ("early",), 150, draw, tok, "t")


def test_musique_padding_comes_from_other_questions_without_the_answer(meta, fixtures):
    meta.update(musique_lengths=[3000], musique_num_questions=2, musique_placements="late")
    rows = list(musique_dataset(**meta)["test"])
    by_uid = {
        f"{r['id']}:{p['idx']}": p
        for r in read_rows(str(fixtures / "musique" / "musique_ans_v1.0_dev.jsonl"), "t")
        for p in r["paragraphs"]
    }
    for r in rows:
        padding = [u.split("[")[0] for u in r["layout"] if not u.startswith(r["id"] + ":")]
        assert padding and r["own_paragraphs"] == 20 and r["placement"] == "late"
        for uid in padding:
            text = f" {squad_normalize(by_uid[uid]['title'] + ' ' + by_uid[uid]['paragraph_text'])} "
            assert not any(f" {squad_normalize(a)} " in text for a in r["answers"])


def test_summhay_rows_cite_exactly_the_documents_that_hold_the_insight(meta, fixtures):
    meta.update(summhay_lengths=[768], summhay_num_insights=4, summhay_haystacks=["news2", "conv1"])
    ds = summhay_dataset(**meta)
    rows = list(ds["test"])
    assert len(rows) == 4 * 3 and ds.needles_info["needles_data_official"] is False
    topics = {h: json.loads((fixtures / "summhay" / f"data/topic_{h}.json").read_text()) for h in ("news2", "conv1")}
    for r in rows:
        docs = {d["document_id"]: d for d in topics[r["haystack"]]["documents"]}
        kind = "Conversation" if r["haystack"] == "conv1" else "Article"
        shown = [int(i) for i in re.findall(rf"^{kind} (\d+):$", r["prompt"], re.M)]  # IDs in prompt order
        assert sorted(shown) == list(range(1, r["num_documents"] + 1)) and len(shown) == len(r["layout"])
        holders = [
            i
            for i, u in zip(shown, r["layout"])
            if r["insight_id"] in docs[u.rstrip("*").split("[")[0]]["insights_included"]
        ]
        assert holders == r["gold_ids"] and len(holders) == min(2, r["holders_in_haystack"])
        assert r["target"] == "".join(f"[{i}]" for i in r["gold_ids"]) and r["n_tokens"] <= 768
        assert r["insight"] in r["prompt"]
        expected = [s + 1 for s in key_slots(r["placement"], len(r["gold_ids"]), r["num_documents"])]
        assert r["gold_positions"] == expected


def test_summhay_gold_ids_do_not_follow_from_the_placement(meta):
    """The placements put the gold documents at fixed slots; the IDs must not say which, or one reply per
    (length, placement) would score without reading (as it would with the documents numbered in prompt order)."""
    meta.update(summhay_lengths=[1024], summhay_num_insights=12, summhay_haystacks=["news2", "conv1"])
    rows = list(summhay_dataset(**meta)["test"])
    for placement in ("early", "spread", "late"):
        cells = [r for r in rows if r["placement"] == placement]
        golds = Counter(tuple(sorted(r["gold_ids"])) for r in cells)
        assert len({r["num_documents"] for r in cells}) <= 2  # the shortcut's condition: few document counts
        assert golds.most_common(1)[0][1] <= len(cells) // 3, (placement, golds)
    by_sample = {}
    for r in rows:  # paired placements: the same documents carry the same IDs
        by_sample.setdefault(r["sample"], set()).add(tuple(sorted(r["gold_ids"])))
    assert all(len(g) == 1 for g in by_sample.values())


def test_cache_and_determinism(meta):
    meta.update(summhay_lengths=[900], summhay_num_insights=2, summhay_haystacks="news1")
    a, b = summhay_dataset(**meta), summhay_dataset(**meta)
    assert a.needles_info["needles_data_sha256"] == b.needles_info["needles_data_sha256"]
    assert a.needles_info["needles_data_cache"] == b.needles_info["needles_data_cache"]
    meta["summhay_seed"] = 1
    assert summhay_dataset(**meta).needles_info["needles_data_sha256"] != a.needles_info["needles_data_sha256"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"musique_lenghts": [512]}, "musique_lengths"),
        ({"musique_placements": ["middle"]}, "is not one of"),
        ({"musique_lengths": [8]}, "outside"),
        ({"musique_num_questions": 500}, "holds 12 questions"),
    ],
)
def test_musique_bad_metadata_is_refused_with_the_fix(meta, extra, message):
    with pytest.raises(NeedlesError, match=message):
        musique_dataset(**{**meta, **extra})


def test_fixture_needs_the_opt_in_and_a_tokenizer(meta, monkeypatch):
    monkeypatch.delenv("NEEDLES_ALLOW_UNOFFICIAL_DATA", raising=False)
    with pytest.raises(NeedlesError, match="allow_unofficial_data") as e:
        summhay_dataset(**{**meta, "allow_unofficial_data": False, "summhay_haystacks": "conv2"})
    assert e.value.fix
    with pytest.raises(NeedlesError, match="needs its tokenizer"):
        musique_dataset(**{k: v for k, v in meta.items() if k != "pretrained"})
