"""MuSiQue answer F1/EM and SummHay citation P/R/F1 against the official scorers, on adversarial cases.

The references below are written out independently, as the official code does it, line by line:
MuSiQue ``metrics/answer.py`` (``normalize_answer``, ``get_tokens``, ``compute_exact``, ``compute_f1``,
``metric_max_over_ground_truths``, called by ``evaluate_v1.0.py`` with ``[answer] + answer_aliases``) and
SummHay ``utils_eval.py`` (``extract_citations`` and the P/R/F1 of ``compute_single_sample_scores``).
"""

from __future__ import annotations

import collections
import re
import string

import pytest

from harness_ext.tasklib import musique, summhay
from harness_ext.tasklib.metrics import citation_scores, musique_em, musique_f1, summhay_citations


# ---------------------------------------------------------------------------------- MuSiQue reference
def ref_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_get_tokens(s):
    if not s:
        return []
    return ref_normalize_answer(s).split()


def ref_compute_exact(a_gold, a_pred):
    return int(ref_normalize_answer(a_gold) == ref_normalize_answer(a_pred))


def ref_compute_f1(a_gold, a_pred):
    gold_toks = ref_get_tokens(a_gold)
    pred_toks = ref_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def ref_max(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)  # the reference passes (prediction, gold)


MUSIQUE_CASES = [
    ("Miquette Giraudy", ["Miquette Giraudy"]),
    ("Giraudy", ["Miquette Giraudy"]),
    ("The performer is Steve Hillage, whose partner is Miquette Giraudy.", ["Miquette Giraudy"]),
    ("the", ["The"]),  # both normalise to nothing: F1 1, EM 1
    ("the", ["An apple"]),  # prediction empty after normalisation: 0
    ("", ["x"]),
    ("", [""]),
    ("apple apple apple", ["apple"]),  # repeated tokens: Counter intersection
    ("apple", ["apple apple banana"]),
    ("U.S.A.", ["USA"]),
    ("usa", ["United States", "U.S.A", "America"]),  # max over aliases
    ("théâtre", ["Théâtre"]),
    ("Café—del Mar", ["café del mar"]),  # the em dash is not ASCII punctuation: stays a character
    ("1,025 hp", ["1025 hp"]),
    ("  multiple\n\tspaces  ", ["multiple spaces"]),
    ("a an the", ["anthe"]),
    ("theatre", ["the atre"]),  # \b: "the" inside a word is not an article
    ("Paris, France", ["Paris", "France", "Paris France"]),
    ("x" * 3 + " y", ["y x"]),
]


@pytest.mark.parametrize("prediction,answers", MUSIQUE_CASES)
def test_musique_scores_equal_the_official_scorer(prediction, answers):
    assert musique_f1(prediction, answers) == pytest.approx(ref_max(ref_compute_f1, prediction, answers), abs=1e-12)
    assert musique_em(prediction, answers) == ref_max(ref_compute_exact, prediction, answers)


def test_musique_worked_examples():
    assert musique_f1("Giraudy", ["Miquette Giraudy"]) == pytest.approx(2 / 3)
    long = "The performer is Steve Hillage, whose partner is Miquette Giraudy."
    assert musique_f1(long, ["Miquette Giraudy"]) == pytest.approx(4 / 11)  # 2 of 9 tokens, recall 1
    assert musique_em("the Miquette  Giraudy.", ["Miquette Giraudy"]) == 1.0


def test_musique_reply_reading_and_breakdowns():
    assert musique.reply_answer("\n\n  Answer: Paris\nbecause ...") == "Paris"
    assert musique.reply_answer("answer:Lyon") == "Lyon"
    assert musique.reply_answer("") == ""
    doc = {"answers": ["Sadunia", "Republic of Sadunia"], "target_tokens": 2048, "placement": "late", "hops": 3}
    out = musique.process_results(doc, ["Republic of Sadunia\nmore text"])
    assert out["answer_em"] == out["answer_f1"] == 1.0
    for key in ("answer_f1_len2048", "answer_f1_place_late", "answer_f1_len2048_place_late", "answer_em_hops3"):
        assert out[key] == 1.0
    assert musique.process_results(doc, ["Paris"])["answer_f1_len2048_place_late"] == 0.0


# ---------------------------------------------------------------------------------- SummHay reference
def ref_extract_citations(bullet):
    matches = re.findall(r"\[([\d, ]+)\]", bullet)
    ref_ids = []
    for match in matches:
        ref_ids += [int(m.strip()) for m in match.split(",") if len(m.strip()) > 0]
    return ref_ids


def ref_prf(bullet, ref_citations):
    gen_citations = set(ref_extract_citations(bullet))
    P = 0 if len(gen_citations) == 0 else len(gen_citations & ref_citations) / len(gen_citations)
    R = 0 if len(ref_citations) == 0 else len(gen_citations & ref_citations) / len(ref_citations)
    F1 = 0 if P + R == 0 else 2 * P * R / (P + R)
    return P, R, F1


SUMMHAY_CASES = [
    ("[1][4]", {1, 4}),
    ("[1, 4]", {1, 4, 7}),
    ("[4][4][4]", {4}),  # duplicates count once
    ("[1],[2]", {3}),
    ("no citation at all", {1}),
    ("[]", {1}),  # the pattern needs one character inside
    ("[ , ,]", {2}),
    ("[01][002]", {1, 2}),  # leading zeros: int()
    ("[1][2] and again [2, 3]", {2}),
    ("(1) {2} <3> [a4] [4]", {4}),  # only brackets of digits, commas and spaces
    ("[12][1][2]", {12}),
    ("[1][2]", set()),  # an empty gold set: recall 0
    ("Article [3] states it [7]", {3, 7}),
    ("[٣]", {3}),  # an Arabic-Indic digit is \d and int() reads it
    ("[1,2,3,4,5,6,7,8,9,10]", {10}),
]


@pytest.mark.parametrize("reply,gold", SUMMHAY_CASES)
def test_citation_scores_equal_the_official_scorer(reply, gold):
    got = citation_scores(summhay_citations(reply), gold)
    p, r, f1 = ref_prf(reply, gold)
    assert (got["citation_precision"], got["citation_recall"], got["citation_f1"]) == pytest.approx((p, r, f1))


def test_where_the_official_scorer_raises_we_read_each_number():
    with pytest.raises(ValueError):
        ref_extract_citations("[1 2]")  # int("1 2") in the reference
    assert summhay_citations("[1 2]") == {1, 2}


def test_summhay_process_results_breakdowns():
    doc = {"gold_ids": [2, 5], "target_tokens": 4096, "placement": "spread"}
    out = summhay.process_results(doc, ["[2][3]"])
    assert out["citation_precision"] == 0.5 and out["citation_recall"] == 0.5 and out["citation_f1"] == 0.5
    assert out["citation_f1_len4096_place_spread"] == 0.5 and out["citation_recall_place_spread"] == 0.5
