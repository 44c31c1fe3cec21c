"""The reply form of an lm-eval sample log (harness_ext.reporting.reply_form), from hand-made MDQA-like logs: lengths,
the gold answer anywhere (best_subspan_em's normalisation, every line) against what the metric credited, empty
replies, and bad logs refused with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.reporting.reply_form import contains_gold, markdown, reply_form
from harness_ext.tasklib.metrics import best_subspan_em

# (reply, answers): credited on its first line; an answer past the first line (the metric reads the first line
# only); empty (a reply cut at a stop string before anything); wrong; the answer with articles and punctuation
REPLIES = [
    ("Paris", ["Paris"]),
    ("I am not sure.\nThe answer is Paris.", ["Paris"]),
    ("", ["Berlin"]),
    ("London", ["Berlin"]),
    ("the Eiffel Tower!", ["Eiffel Tower"]),
]


def write_log(path: Path, replies: list[tuple[str, list[str]]], metric: str = "best_subspan_em") -> Path:
    """A samples_*.jsonl as lm_eval --log_samples writes it for a generate_until task, the metric logged per row."""
    rows = []
    for i, (reply, answers) in enumerate(replies):
        row = {"doc_id": i, "doc": {"question": f"q{i}", "answers": answers}, "target": answers,
               "arguments": [["prompt", {"until": ["\n"]}]], "resps": [[reply]], "filtered_resps": [reply],
               "filter": "none", "metrics": [metric], metric: best_subspan_em(reply, answers)}  # fmt: skip
        rows.append(row)
    rows.append({**rows[0], "filter": "other", "resps": [["x y z"]], "filtered_resps": ["x y z"]})  # not counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_an_answer_past_the_first_line_is_found_but_not_credited(tmp_path):
    assert best_subspan_em(REPLIES[1][0], ["Paris"]) == 0.0 and contains_gold(REPLIES[1][0], ["Paris"])
    form = reply_form(write_log(tmp_path / "samples_mdqa_sweep_x.jsonl", REPLIES))
    assert form == {
        "n": 5,
        "mean_words": (1 + 8 + 0 + 1 + 3) / 5,
        "mean_chars": sum(len(r) for r, _ in REPLIES) / 5,
        "contains_answer": 3 / 5,  # Paris, Paris past the first line, the Eiffel Tower
        "credited": 2 / 5,
        "answer_not_credited": 1 / 5,
        "empty": 1 / 5,
    }


def test_the_answer_anywhere_uses_the_metrics_normalisation():
    assert contains_gold("The EIFFEL tower, of course", ["Eiffel Tower"])  # case, article, punctuation
    assert contains_gold("line one\nline two: 1,000 metres", ["1000 metres"])  # every line, punctuation dropped
    assert not contains_gold("Eiffel", ["Eiffel Tower"]) and not contains_gold("anything", [""])


def test_the_report_table_has_a_row_per_run_and_task(tmp_path):
    form = reply_form(write_log(tmp_path / "s.jsonl", REPLIES))
    lines = markdown({"base": {"mdqa_sweep": form}, "recipe": {"mdqa_sweep": form}})
    assert lines[0] == "## Reply form" and "| run | task | n | mean words |" in lines[4]
    assert "| recipe | mdqa_sweep | 5 | 2.6 | " in lines[-2] and lines[-2].endswith("| 0.600 | 0.400 | 0.200 | 0.200 |")
    assert markdown({}) == []


@pytest.mark.parametrize(
    "row,problem",
    [
        ({"doc_id": 0, "resps": [["a"]], "best_subspan_em": 1.0}, "has no gold answer"),
        ({"doc_id": 0, "resps": [["a"]], "target": ["a"]}, "has no best_subspan_em value"),
    ],
)
def test_a_log_without_answers_or_metric_is_refused_with_the_file(tmp_path, row, problem):
    path = tmp_path / "samples_t_x.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(NeedlesError, match=problem) as exc:
        reply_form(path)
    assert str(path) in exc.value.problem
    with pytest.raises(NeedlesError, match="no samples with filter 'strict'"):
        reply_form(write_log(path, REPLIES), filter="strict")
