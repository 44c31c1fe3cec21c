"""FLenQA scoring against hand-worked replies (reference notebook: response_category, response_analysis)."""

from __future__ import annotations

import pytest

from harness_ext.tasklib.metrics import FLENQA_OTHER, flenqa_category, flenqa_correct


@pytest.mark.parametrize(
    ("reply", "category"),
    [
        ("True", "true"),
        ("False.", "false"),
        ("TRUE", "true"),  # capitalised
        ("Answer: FALSE", "false"),
        ("Not true.", "false"),  # "not true" -> "false"
        ("The statement is NOT TRUE", "false"),
        ("not\ntrue", "false"),  # whitespace collapses first, then "not true" matches
        ("not the true one", "false"),  # the article becomes a space, which collapses: "not true one"
        # CoT that mentions both words: the later of the last "true" and the last "false" wins
        ("Is it true that Alice is older than Carol? Step 1 ... Therefore the answer is False.", "false"),
        ("At first this looks false, but step 3 shows it is true.", "true"),
        ("True or false? Alice is older than Bob, Bob is older than Carol, so: true", "true"),
        ("\u2019true\u2019", "true"),  # the CoT prompts ask for \u2019true\u2019 / \u2019false\u2019
        ("untrue", "true"),  # plain substring search, as in the reference
        # refusals and other replies
        ("I cannot answer that question.", FLENQA_OTHER),
        ("", FLENQA_OTHER),
        ("Yes.", FLENQA_OTHER),
    ],
)
def test_flenqa_category_hand_checked(reply, category):
    assert flenqa_category(reply) == category


@pytest.mark.parametrize(
    ("reply", "label", "score"),
    [
        ("True", "True", 1.0),
        ("True", "False", 0.0),
        ("Not true.", "False", 1.0),
        ("Not true.", "True", 0.0),
        ("I refuse.", "True", 0.0),
        ("I refuse.", "False", 0.0),
        ("false", True, 0.0),  # labels as booleans are compared by their text too
        ("true", True, 1.0),
    ],
)
def test_flenqa_correct(reply, label, score):
    assert flenqa_correct(reply, label) == score
