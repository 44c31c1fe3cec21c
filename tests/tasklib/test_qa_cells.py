"""The musique and summhay training-data families (harness_ext.tasklib.qa_cells) on the generated fixtures with the
real SmolLM2 tokenizer: deterministic and hashed, exact lengths and paired placements, chains and citations that are
right by construction, the real baselines built only from never-scored data, and the leakage check refusing a leak."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.data import train_spec
from harness_ext.finetune.leakage import check_family_leakage
from harness_ext.tasklib.qa_cells import QASpec, check_overlap, generate, train_haystacks
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa-cells")
    write_musique_fixture(root / "musique", num_questions=8)
    write_summhay_fixture(root / "summhay", num_documents=8)
    return root


@pytest.fixture
def meta(fixtures, smollm2_dir, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    return {
        "pretrained": str(smollm2_dir),
        "musique_mirror": str(fixtures / "musique"),
        "summhay_mirror": str(fixtures / "summhay"),
        "allow_unofficial_data": True,
        "summhay_haystacks": ["news1", "news2", "news3", "news4", "conv1", "conv2", "conv3", "conv4"],
    }


def _lookup(prompt: str, key: str) -> str:
    (value,) = re.findall(rf"key {key}: value ([0-9a-f]{{8}})\.", prompt)
    return value


def test_musique_symbolic_chains_exact_lengths_and_paired_placements(meta, monkeypatch):
    spec = QASpec("musique", "symbolic", num_samples=2, lengths=(384,), hops=(2, 3))
    rows, info = generate(spec, meta)
    assert len(rows) == 2 * 3 and [r["placement"] for r in rows[:3]] == ["early", "spread", "late"]
    for r in rows:
        assert r["target_tokens"] - 3 <= r["n_tokens"] <= 384  # exact fit: one more word of filler would not fit
        key = re.search(r"Look up key ([0-9a-f]{8})", r["question"]).group(1)
        for _ in range(r["hops"]):  # following the chain in the prompt gives the answer
            key = _lookup(r["prompt"], key)
        assert [key] == r["answers"] and r["target"] == key and r["hops"] == len(r["supporting_positions"])
        assert r["last_hop_position"] in r["supporting_positions"]
    early, spread, late = rows[3:6]
    assert early["supporting_positions"] == [1, 2, 3] and late["supporting_positions"][-1] == late["num_paragraphs"]
    assert sorted(early["layout"]) == sorted(spread["layout"]) == sorted(late["layout"])  # the same paragraphs
    again, info2 = generate(spec, meta)
    monkeypatch.setenv("NEEDLES_NO_CACHE", "1")
    rebuilt, info3 = generate(spec, meta)
    assert again == rows == rebuilt and info["needles_data_sha256"] == info3["needles_data_sha256"]
    other, info4 = generate(replace(spec, seed=1), meta)
    assert info4["needles_data_sha256"] != info["needles_data_sha256"] and info["needles_data_official"]


def test_musique_templated_and_real(meta):
    rows, _ = generate(QASpec("musique", "templated", num_samples=1, lengths=(384,), hops=(3,)), meta)
    r = rows[0]
    assert r["question"].startswith("What is the birthplace of the spouse of the founder of ")
    last = r["prompt"].split("\nDocument [")[r["last_hop_position"]]
    assert f"was born in {r['answers'][0]} in " in last
    real, info = generate(QASpec("musique", "real", num_samples=2, lengths=(768,), placements=("late",)), meta)
    assert info["needles_data_official"] is False and list(info["needles_data_files"]) == [
        "musique_ans_v1.0_train.jsonl"
    ]
    assert all(r["split"] == "train" and r["target"] == r["answers"][0] and r["last_hop_position"] for r in real)


def test_summhay_cells_cite_exactly_the_documents_that_state_the_fact(meta):
    rows, _ = generate(QASpec("summhay", "symbolic", num_samples=2, lengths=(768,), num_gold=3), meta)
    for r in rows:
        key, value = re.fullmatch(r"key (\w+) has value (\w+)", r["insight"]).groups()
        parts = re.split(r"\nArticle (\d+):\n", r["prompt"].split("\n\nInsight:")[0])[1:]
        docs = list(zip(map(int, parts[::2]), parts[1::2]))  # (ID, text) in prompt order
        assert sorted(i for i, _ in docs) == list(range(1, r["num_documents"] + 1))
        holders = [i for i, d in docs if f"key {key}: value {value}." in d]
        lures = [i for i, d in docs if f"key {key}: value" in d and i not in holders]
        assert holders == r["gold_ids"] and len(holders) == 3 and lures  # lures share the key, not the value
        assert [n for n, (i, _) in enumerate(docs, start=1) if i in holders] == r["gold_positions"]
        assert r["target"] == "".join(f"[{i}]" for i in holders) and r["n_tokens"] <= 768
    rows, _ = generate(QASpec("summhay", "templated", num_samples=1, lengths=(512,)), meta)
    r = rows[0]
    docs = r["prompt"].split("\n\nInsight:")[0].split("\n\nArticle ")[1:]
    assert [int(d.split(":")[0]) for d in docs if r["insight"] + "." in d] == r["gold_ids"]


def test_summhay_real_trains_only_on_haystacks_the_evaluation_does_not_score(meta):
    spec = QASpec("summhay", "real", num_samples=2, lengths=(1024,), placements=("early",))
    assert train_haystacks(spec, meta) == ("news5", "conv5")
    rows, _ = generate(spec, meta)
    assert {r["haystack"] for r in rows} <= {"news5", "conv5"}
    with pytest.raises(NeedlesError, match="no held-out haystack") as exc:
        train_haystacks(spec, {})
    assert "summhay_haystacks" in exc.value.fix
    eval_like = [{**rows[0], "insight": "something else"}]
    with pytest.raises(NeedlesError, match=rf"scores haystack\(s\) \['{rows[0]['haystack']}'\]"):
        check_overlap(rows, eval_like, "summhay_citation")


def test_the_leakage_check_passes_held_out_data_and_refuses_a_leak(meta, smollm2_dir):
    tasks_meta = {**meta, "musique_lengths": [768], "musique_num_questions": 2, "musique_placements": ["early"]}
    real, _ = generate(QASpec("musique", "real", num_samples=3, lengths=(768,), placements=("early",)), meta)
    report = check_family_leakage(real, "musique", ["musique"], tasks_meta, str(smollm2_dir))
    assert report.eval_docs == 2 and report.eval_questions == 2 and report.overlap == 0
    from harness_ext.finetune.leakage import task_docs

    scored = task_docs("musique", tasks_meta, str(smollm2_dir))
    with pytest.raises(NeedlesError, match="evaluation set musique"):
        check_family_leakage(
            real + [{**scored[0], "doc_sha256": "x"}], "musique", ["musique"], tasks_meta, str(smollm2_dir)
        )


def test_a_summhay_finetune_is_checked_against_a_musique_target(meta, smollm2_dir):
    """SummHay rows ask no question: beside a MuSiQue target (a study scoring both) only their document hashes are
    compared with its questions' documents, not refused for having no question."""
    tasks_meta = {**meta, "musique_lengths": [768], "musique_num_questions": 2, "musique_placements": ["early"]}
    rows, _ = generate(QASpec("summhay", "real", num_samples=2, lengths=(1024,), placements=("early",)), meta)
    report = check_family_leakage(rows, "summhay", ["musique"], tasks_meta, str(smollm2_dir))
    assert report.eval_docs == 2 and report.eval_questions == 0 and report.overlap == 0


def test_finetune_data_keys_of_the_families():
    spec = train_spec({"family": "musique", "cell": "symbolic", "hops": [2, 4], "lengths": 512})
    assert spec.family == "musique" and spec.synth.hops == (2, 4) and spec.synth.lengths == (512,)
    assert spec.synth.split == "train" and spec.manifest_fields()["cell"] == "symbolic"
    for data, match in (
        ({"family": "musique", "cell": "natural"}, "not a musique cell"),
        ({"family": "summhay", "cell": "real", "positions": [1]}, "do not apply to the summhay family"),
        ({"family": "musique", "cell": "symbolic", "hops": [5]}, "hops"),
        ({"family": "summhay", "cell": "real", "haystacks": ["news9"]}, "haystacks"),
        ({"family": "musique", "cell": "real", "placements": [1]}, "not a list of names"),
    ):
        with pytest.raises(NeedlesError, match=match):
            train_spec(data)
