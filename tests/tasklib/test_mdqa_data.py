"""MDQA data: the fixture mirror, derived positions, paired ordering, prompts byte for byte, data marking."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import FIXTURE_MARKER
from harness_ext.tasklib.mdqa import mdqa_dataset, move_gold, official_path, render_prompt
from harness_ext.tasklib.mdqa_fixture import build_fixture
from harness_ext.tasklib.metrics import contains_answer

ORACLE = "qa_data/nq-open-oracle.jsonl.gz"
N_QUESTIONS = 60
OPT_IN = {"allow_unofficial_data": True}


@pytest.fixture(scope="module")
def oracle(shared_data):
    return shared_data / "lost-in-the-middle" / ORACLE


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory, oracle):
    out = tmp_path_factory.mktemp("mdqa-fixture")
    build_fixture(oracle, out, seed=0, settings=(10, 20), num_questions=N_QUESTIONS, progress=False)
    return out


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NEEDLES_MDQA_BASE_URL", "http://127.0.0.1:9/unreachable")  # no accidental download
    for var in ("NEEDLES_MDQA_MIRROR", "NEEDLES_ALLOW_UNOFFICIAL_DATA"):
        monkeypatch.delenv(var, raising=False)


def _rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------- fixture
def test_fixture_format_and_distractors(fixture_dir):
    marker = json.loads((fixture_dir / FIXTURE_MARKER).read_text())
    assert marker["kind"] == "fixture" and "FIXTURE" in marker["label"]
    rows = _rows(fixture_dir / official_path(20, 9))
    oracle_rows = _rows(fixture_dir / ORACLE)
    assert len(rows) == N_QUESTIONS == len(oracle_rows)
    for row, orow in zip(rows, oracle_rows, strict=True):
        assert row["question"] == orow["question"] and row["answers"] == orow["answers"]
        ctxs = row["ctxs"]
        assert len(ctxs) == 20 and [c["isgold"] for c in ctxs].index(True) == 9 and sum(c["isgold"] for c in ctxs) == 1
        assert ctxs[9]["text"] == orow["ctxs"][0]["text"] and ctxs[9]["hasanswer"] is True
        distractors = [c for c in ctxs if not c["isgold"]]
        assert len({c["text"] for c in distractors}) == 19  # distinct, and none is the gold passage
        assert all(c["text"] != ctxs[9]["text"] for c in distractors)
        assert not any(contains_answer(f"{c['title']} {c['text']}", row["answers"]) for c in distractors)
        assert set(distractors[0]) == {
            "id",
            "title",
            "text",
            "score",
            "hasanswer",
            "original_retrieval_index",
            "isgold",
        }


def test_fixture_is_deterministic(tmp_path, oracle, fixture_dir):
    again = build_fixture(
        oracle, tmp_path / "again", seed=0, settings=(10, 20), num_questions=N_QUESTIONS, progress=False
    )
    first = json.loads((fixture_dir / FIXTURE_MARKER).read_text())
    assert again["files"] == first["files"]
    other = build_fixture(oracle, tmp_path / "other", seed=1, settings=(20,), num_questions=N_QUESTIONS, progress=False)
    assert other["files"][official_path(20, 0)] != first["files"][official_path(20, 0)]


def test_official_positions_are_moves_of_gold_at_0(fixture_dir):
    """The reference built every gold_at_k file by inserting the gold into the same distractor list."""
    base = _rows(fixture_dir / official_path(20, 0))
    for gi in (4, 9, 14, 19):
        moved = _rows(fixture_dir / official_path(20, gi))
        for a, b in zip(base, moved, strict=True):
            assert move_gold(a["ctxs"], gi + 1) == b["ctxs"]


# ---------------------------------------------------------------------------------- tasks' data
def test_refuses_fixture_without_opt_in(fixture_dir):
    with pytest.raises(NeedlesError, match="allow_unofficial_data"):
        mdqa_dataset(
            mdqa_task_kind="position", mdqa_task_documents=20, mdqa_task_position=10, mdqa_mirror=str(fixture_dir)
        )


def test_derived_position_two_keeps_distractor_order(fixture_dir):
    ds = mdqa_dataset(
        mdqa_task_kind="position", mdqa_task_documents=20, mdqa_task_position=2, mdqa_mirror=str(fixture_dir), **OPT_IN
    )
    info = ds.needles_info
    assert info["needles_data_official"] is False and info["needles_alias_marks"] == ["NON-OFFICIAL DATA: fixture"]
    assert "gold_at_0" in info["needles_derived"]
    base = {r["question"]: r for r in _rows(fixture_dir / official_path(20, 0))}
    for doc in ds["test"]:
        assert doc["gold_position"] == 2 and doc["ctxs"][1]["isgold"]
        src = base[doc["question"]]["ctxs"]
        assert [c["text"] for c in doc["ctxs"] if not c["isgold"]] == [c["text"] for c in src if not c["isgold"]]


def test_limit_selects_the_same_questions_everywhere(fixture_dir):
    common = {"mdqa_mirror": str(fixture_dir), **OPT_IN}
    tasks = [("position", 20, p) for p in (1, 2, 5, 20)] + [("closedbook", 20, 1), ("oracle", 20, 1)]
    orders = []
    for kind, n, p in tasks:
        ds = mdqa_dataset(mdqa_task_kind=kind, mdqa_task_documents=n, mdqa_task_position=p, **common)["test"]
        orders.append([d["question"] for d in ds])
    assert all(o == orders[0] for o in orders)
    file_order = [r["question"] for r in _rows(fixture_dir / ORACLE)]
    assert orders[0] != file_order and sorted(orders[0]) == sorted(file_order)  # seeded, not file order
    reseeded = mdqa_dataset(
        mdqa_task_kind="position", mdqa_task_documents=20, mdqa_task_position=1, mdqa_order_seed=7, **common
    )["test"]
    assert [d["question"] for d in reseeded] != orders[0]
    first5 = mdqa_dataset(mdqa_task_kind="oracle", mdqa_num_questions=5, **common)["test"]
    assert [d["question"] for d in first5] == orders[0][:5]


def test_split_keeps_only_held_out_questions_in_the_paired_order(fixture_dir):
    from harness_ext.tasklib.mdqa import question_split

    common = {"mdqa_mirror": str(fixture_dir), **OPT_IN}
    every = [d["question"] for d in mdqa_dataset(mdqa_task_kind="oracle", **common)["test"]]
    held_out = mdqa_dataset(mdqa_task_kind="sweep", mdqa_num_documents=10, mdqa_split="eval", **common)
    questions = list(dict.fromkeys(d["question"] for d in held_out["test"]))
    assert questions == [q for q in every if question_split(q) == "eval"]  # the same order, eval questions only
    assert 0 < len(questions) < len(every) and held_out.needles_info["needles_question_split"] == "eval"
    train2 = mdqa_dataset(mdqa_task_kind="closedbook", mdqa_split="train", mdqa_num_questions=2, **common)["test"]
    assert [d["question"] for d in train2] == [q for q in every if question_split(q) == "train"][:2]
    with pytest.raises(NeedlesError, match="mdqa_split='test'"):
        mdqa_dataset(mdqa_task_kind="oracle", mdqa_split="test", **common)


def test_official_oracle_inside_fixture_is_official(tmp_path, oracle, fixture_dir):
    mirror = tmp_path / "mirror"
    shutil.copytree(fixture_dir, mirror)
    shutil.copyfile(oracle, mirror / ORACLE)  # the real file: passes the pinned checksum
    ds = mdqa_dataset(mdqa_task_kind="oracle", mdqa_mirror=str(mirror))  # no opt-in needed
    assert ds.needles_info["needles_data_official"] is True and ds.needles_info["needles_alias_marks"] == []
    assert len(ds["test"]) == 2655 and all(len(d["ctxs"]) == 1 and d["ctxs"][0]["isgold"] for d in ds["test"])


def test_sweep_is_question_major_for_any_setting(fixture_dir):
    ds = mdqa_dataset(
        mdqa_task_kind="sweep",
        mdqa_num_documents=10,
        mdqa_positions=[1, 3, 10],
        mdqa_num_questions=4,
        mdqa_mirror=str(fixture_dir),
        **OPT_IN,
    )
    docs = list(ds["test"])
    assert [d["gold_position"] for d in docs] == [1, 3, 10] * 4
    assert all(len(d["ctxs"]) == 10 and d["ctxs"][d["gold_position"] - 1]["isgold"] for d in docs)
    assert len({d["question"] for d in docs[:3]}) == 1 and len({d["question"] for d in docs}) == 4
    with pytest.raises(NeedlesError, match="outside"):
        mdqa_dataset(
            mdqa_task_kind="sweep", mdqa_num_documents=10, mdqa_positions=[11], mdqa_mirror=str(fixture_dir), **OPT_IN
        )
    with pytest.raises(NeedlesError, match="no official data"):
        mdqa_dataset(mdqa_task_kind="sweep", mdqa_num_documents=15, mdqa_mirror=str(fixture_dir), **OPT_IN)


# ---------------------------------------------------------------------------------- prompts
INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)
DOCS = [
    {"title": "first doc", "text": "first doc text", "isgold": False, "hasanswer": False},
    {"title": "second doc", "text": "second doc text {braces} \u00e9", "isgold": True, "hasanswer": True},
]


def _doc(variant, ctxs):
    return {"question": "test question?", "answers": ["x"], "ctxs": ctxs, "prompt_variant": variant}


def test_prompts_match_the_reference_byte_for_byte():
    d1 = "Document [1](Title: first doc) first doc text"
    d2 = "Document [2](Title: second doc) second doc text {braces} \u00e9"
    assert render_prompt(_doc("qa", DOCS)) == f"{INSTRUCTION}\n\n{d1}\n{d2}\n\nQuestion: test question?\nAnswer:"
    assert render_prompt(_doc("query_aware", DOCS)) == (
        f"{INSTRUCTION}\n\nQuestion: test question?\n\n{d1}\n{d2}\n\nQuestion: test question?\nAnswer:"
    )
    assert render_prompt(_doc("closedbook", [])) == "Question: test question?\nAnswer:"


def test_query_aware_option_is_marked(fixture_dir):
    ds = mdqa_dataset(
        mdqa_task_kind="position",
        mdqa_task_documents=20,
        mdqa_task_position=5,
        mdqa_query_aware=True,
        mdqa_num_questions=2,
        mdqa_mirror=str(fixture_dir),
        **OPT_IN,
    )
    doc = ds["test"][0]
    prompt = render_prompt(doc)
    assert prompt.count(f"Question: {doc['question']}\n") == 2 and prompt.endswith("Answer:")
    assert "query-aware prompt" in ds.needles_info["needles_alias_marks"]
