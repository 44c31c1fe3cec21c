"""A significant in-distribution gain given by one reply to most held-out documents is not called "learned": on
SummHay haystacks of four or five documents the one reply "[2][4]" scores citation F1 about 0.5."""

from __future__ import annotations

import json

from planted import plant_run, values

from harness_ext.reporting.results_io import load_run
from harness_ext.workflow.in_distribution import CONSTANT, LEARNED, NOT_LEARNED, modal_reply, verdict

TASK = "summhay_citation"


def _run(tmp_path, replies: list[str]):
    path = plant_run(tmp_path / "r", values(TASK, "citation_f1", [0.5] * len(replies)))
    samples = next((tmp_path / "r").glob("samples_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row, reply in zip(rows, replies, strict=True):
        row["resps"] = [[reply]]  # what lm-eval logs for generate_until
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_run(path)


def test_one_reply_to_most_documents_is_a_constant_not_learning(tmp_path):
    modal = modal_reply(_run(tmp_path, ["[2][4]"] * 10 + [f"[{i}]" for i in range(10)]), TASK)
    assert modal == {"reply": "[2][4]", "count": 10, "n": 20}
    status, sentence = verdict(0.6, 1e-6, 0.05, None, modal)
    assert status == "constant" and sentence.startswith(CONSTANT) and "10 of 20 replies are '[2][4]'" in sentence
    # one reply short of half: the gain is read as learning; a loss stays a loss whatever the replies
    assert verdict(0.6, 1e-6, 0.05, None, {**modal, "count": 9}) == ("learned", LEARNED)
    assert verdict(-0.6, 1e-6, 0.05, None, modal) == ("not_learned", NOT_LEARNED)


def test_replies_that_differ_per_document_and_runs_without_replies(tmp_path):
    run = _run(tmp_path, [f" The value is {i}. " for i in range(20)])
    assert modal_reply(run, TASK) == {"reply": "The value is 0.", "count": 1, "n": 20}
    bare = load_run(plant_run(tmp_path / "b", values(TASK, "citation_f1", [1.0] * 5)))
    assert modal_reply(bare, TASK) is None  # no generated text logged: nothing to judge
    assert verdict(0.6, 1e-6, 0.05, None, None) == ("learned", LEARNED)
