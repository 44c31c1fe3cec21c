"""The synthetic MDQA cells as `needles heads` probes: the lm-eval task's own documents, the answer as needle.

Data: the real Lost-in-the-Middle oracle file (../shared/data) as the MDQA mirror; the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from harness_ext.cli import main as cli_main
from harness_ext.heads.probes import success
from harness_ext.heads.probes_synth import ProbeChoices, synth_docs, synth_probe_names, synth_probes
from harness_ext.heads.prompts import encode
from harness_ext.tasklib.synth_mdqa import CELLS, synth_dataset

META = {"synth_num_documents": 4, "synth_positions": [1, 4]}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def meta(shared_data) -> dict:
    return {**META, "mdqa_mirror": str(shared_data / "lost-in-the-middle")}


def test_every_cell_is_a_probe_choice_and_nothing_else_is():
    names = synth_probe_names()
    assert names == [f"synth_mdqa:{c}" for c in CELLS] and "synth_mdqa:real" in names
    choices = ProbeChoices(["niah", "kv", "mdqa"])
    assert all(n in choices for n in ["niah", "mdqa", *names]) and list(choices) == ["niah", "kv", "mdqa", *names]
    assert "synth_mdqa:nope" not in choices and "synth_mdqa" not in choices and None not in choices


@pytest.mark.parametrize("cell", list(CELLS))
def test_probes_are_the_task_documents_with_the_answer_as_needle(cell, tok, meta):
    docs = synth_docs(cell, meta)
    task_rows = synth_dataset(cell, **{**meta, "synth_num_samples": 4})["test"].to_list()
    assert [d["doc_sha256"] for d in docs] == [r["doc_sha256"] for r in task_rows]  # the same documents
    assert all(d["split"] == "eval" for d in docs) and len(docs) == 4 * 2
    for chat in (True, False):
        probes = synth_probes(tok, cell, meta, chat)
        assert [p.doc["doc_sha256"] for p in probes] == [d["doc_sha256"] for d in docs]
        for p in probes:
            assert p.family == f"synth_mdqa:{cell}" and p.probe_id.startswith(f"synth_mdqa/{cell}/s")
            lo, hi = p.needle
            gold = p.doc["ctxs"][p.doc["gold_position"] - 1]
            assert gold["isgold"] and p.text[lo:hi] in gold["text"]
            if cell != "real":  # invented values are written out verbatim in the gold document
                assert p.meta["needle_is_answer"] and p.text[lo:hi] == p.doc["answers"][0]
            ids, (t0, t1) = encode(tok, p, chat)
            assert 0 <= t0 < t1 <= len(ids)
            # scored like the task: best_subspan_em of the answer
            assert success(p, f"{p.doc['answers'][0]}\n") == 1.0 and success(p, "no idea") == 0.0


def test_needles_heads_detects_on_a_synth_cell(tiny_llama_dir, meta, tmp_path, capsys):
    out = tmp_path / "heads"
    meta_arg = json.dumps({**meta, "synth_num_samples": 1})
    argv = ["heads", "--model", str(tiny_llama_dir), "-o", str(out), "--probes", "synth_mdqa:templated_entities"]
    code = cli_main([*argv, "--mdqa-metadata", meta_arg, "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    report = json.loads((out / "heads.json").read_text())
    assert report["num_probes"] == 2 and list(report["families"]) == ["synth_mdqa:templated_entities"]
    assert report["settings"]["synth_mdqa"]["cells"] == ["synth_mdqa:templated_entities"]
    assert {p["gold_position"] for p in report["probes"]} == {1, 4}


def test_bad_synth_probe_metadata_fails_before_the_model_loads(tmp_path, meta, capsys):
    out = tmp_path / "heads"
    bad = json.dumps({**meta, "synth_positions": [9]})
    code = cli_main(
        ["heads", "--model", "/nonexistent", "-o", str(out), "--probes", "synth_mdqa:real", "--mdqa-metadata", bad]
    )
    err = capsys.readouterr().err
    assert code == 2 and "positions=[9] with 4 documents" in err and "fix:" in err and not out.exists()
