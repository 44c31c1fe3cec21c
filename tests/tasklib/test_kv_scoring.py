"""Reply parsing and per-cell metrics of the KV tasks."""

from __future__ import annotations

import pytest

from harness_ext.tasklib.kv import parse_reply, process_results


@pytest.mark.parametrize(
    "reply,gold_key,expected",
    [
        ("The value of key 4321 is 2222 and it is in Dictionary [12].", "4321", ("2222", "12")),
        ("The value of key 4321 is 2222.", "4321", ("2222", None)),
        ("  the value of the key 4321 is: 2222, found in dictionary 7", "4321", ("2222", "7")),
        ("4321: 2222", "4321", ("2222", None)),
        ("Dictionary [3] {4321: 2222, 555: 666}", "4321", ("2222", "3")),
        # a copied context: the first committed value counts, not any later appearance of the gold value
        ("Dictionary [1] {111: 999, 222: 888}\nDictionary [2] {4321: 2222}", "4321", ("999", "1")),
        ("Dictionary [5] {555: 666, 4321: 2222}", "4321", ("2222", "5")),
        ("Dictionary [1] {111: 999}", "4321", ("999", "1")),
        ("2222", "4321", ("2222", None)),
        ("I don't know.", "4321", (None, None)),
        ("The value of key 12, 34, 56 is 7890 and it is in Dictionary [4].", "12, 34, 56", ("7890", "4")),
        ("(12, 34, 56): 7890", "12, 34, 56", ("7890", None)),
    ],
)
def test_parse_reply(reply, gold_key, expected):
    assert parse_reply(reply, gold_key) == expected


def test_process_results_breakdowns():
    doc = {"gold_key": "4321", "gold_value": "2222", "gold_dict": 12, "target_tokens": 1024, "depth": 0.5}
    right = process_results(doc, ["The value of key 4321 is 2222 and it is in Dictionary [12]."])
    assert right["both_acc"] == 1.0 and right["both_acc_len1024_depth0.50"] == 1.0
    assert right["value_acc_len1024"] == 1.0 and right["dict_acc_depth0.50"] == 1.0
    wrong_dict = process_results(doc, ["The value of key 4321 is 2222 and it is in Dictionary [11]."])
    assert wrong_dict["value_acc"] == 1.0 and wrong_dict["dict_acc"] == 0.0 and wrong_dict["both_acc"] == 0.0
    uniform = process_results({**doc, "depth": None, "target_tokens": None}, ["2222"])
    assert set(uniform) == {"value_acc", "dict_acc", "both_acc"}
