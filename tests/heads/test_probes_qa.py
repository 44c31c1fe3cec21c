"""MuSiQue and SummHay retrieval-head probes and knockout items (harness_ext.heads.probes_qa) on the fixtures with
the real SmolLM2 tokenizer: the needle is the answer inside the last hop's paragraph / the first gold document's ID,
it maps to tokens, and bad --qa-metadata is refused before any model loads (exit 2)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from harness_ext.cli.app import main
from harness_ext.core.errors import NeedlesError
from harness_ext.heads.probes_qa import parse_qa_metadata, placements_of, qa_docs, qa_probe
from harness_ext.heads.prompts import encode
from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("qa-probes")
    write_musique_fixture(root / "m", num_questions=6)
    write_summhay_fixture(root / "s", num_documents=8)
    meta = {"musique_mirror": str(root / "m"), "summhay_mirror": str(root / "s"), "allow_unofficial_data": True}
    return AutoTokenizer.from_pretrained(smollm2_dir), meta, root


def test_musique_needle_is_the_answer_in_the_last_hop_paragraph(setup):
    tok, meta, root = setup
    rows = {json.loads(x)["id"]: json.loads(x) for x in (root / "m" / "musique_ans_v1.0_dev.jsonl").open()}
    docs = qa_docs("musique", tok, {**meta, "musique_lengths": [768], "musique_num_questions": 2})
    assert len(docs) == 6
    for doc in docs:
        probe = qa_probe(tok, "musique", doc, chat=True)
        lo, hi = probe.needle
        assert probe.text[lo:hi] in doc["answers"] and probe.meta["needle_is_answer"]
        last = rows[doc["id"]]["question_decomposition"][-1]
        para = rows[doc["id"]]["paragraphs"][last["paragraph_support_idx"]]["paragraph_text"]
        line = probe.text[probe.text.rfind("\n", 0, lo) + 1 : probe.text.find("\n", hi)]
        assert line.endswith(para) and doc["layout"][doc["last_hop_position"] - 1].endswith("*")
        ids, (a, b) = encode(tok, probe, True)
        assert b > a and doc["answers"][0].split()[0] in tok.decode(ids[a:b])


def test_summhay_needle_is_the_first_gold_id(setup):
    tok, meta, _root = setup
    docs = qa_docs("summhay", tok, {**meta, "summhay_lengths": [1024], "summhay_num_insights": 2})
    for doc in docs:
        probe = qa_probe(tok, "summhay", doc, chat=False)
        lo, hi = probe.needle
        assert probe.text[lo:hi] == str(doc["gold_ids"][0]) and probe.text[hi] == ":"
        assert probe.text[:lo].endswith("\nArticle ") or probe.text[:lo].endswith("\nConversation ")


def test_placements_and_bad_metadata(capsys, tmp_path):
    assert placements_of([0.0, 0.25, 0.5, 0.75, 1.0]) == ["early", "spread", "late"]
    assert placements_of([0.5]) == ["spread"] and placements_of([1.0, 0.9]) == ["late"]
    with pytest.raises(NeedlesError, match="not a JSON object"):
        parse_qa_metadata("[1]")
    for argv in (
        ["heads", "--probes", "musique", "--qa-metadata", "{nope"],
        ["heads", "--probes", "summhay", "--qa-metadata", '{"summhay_lenghts": [512]}'],
        ["heads", "--knockout-task", "musique", "--qa-metadata", '{"musique_lengths": [5]}'],
    ):
        assert main([*argv, "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "needles: error:" in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
