"""Scoring functions of the reference implementations, as pure functions.

* ``best_subspan_em``: Lost in the Middle (github.com/nelson-liu/lost-in-the-middle,
  ``src/lost_in_the_middle/metrics.py`` + ``scripts/evaluate_qa_responses.py``).
* ``flenqa_category`` / ``flenqa_correct``: Same Task, More Tokens (github.com/alonj/Same-Task-More-Tokens,
  ``FLenQA analysis.ipynb``: ``normalize_answer``, ``response_category``, ``response_analysis``).
* ``musique_em`` / ``musique_f1``: MuSiQue (github.com/StonyBrookNLP/musique, ``metrics/answer.py`` as
  ``evaluate_v1.0.py`` calls it: max over ``[answer] + answer_aliases``).
* ``summhay_citations`` / ``citation_scores``: Summary of a Haystack (github.com/salesforce/summary-of-a-haystack,
  ``utils_eval.py``: ``extract_citations`` and the P/R/F1 of ``compute_single_sample_scores``).
* ``rouge1_recall`` / ``niah_success``: Retrieval Head (github.com/nightdessert/Retrieval_Head,
  ``retrieval_head_detection.py``: ``rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)``,
  a test succeeds when ``score(real_needle, response)['rouge1'].recall * 100 > 50``).

They are reproduced step for step, quirks included (see the comments); tests/tasklib/test_mdqa_metric.py,
test_flenqa_metric.py, test_niah.py and test_musique_summhay_metrics.py check them against hand-worked cases
and independent re-implementations.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable
from functools import cache

# The reference uses the third-party ``regex`` module for the article pattern. Its ``\b`` treats
# combining marks as word characters where ``re`` does not, so unicode answers could score
# differently with ``re``. ``regex`` ships with transformers; ``re`` is only a fallback.
try:
    import regex as _article_re
except ImportError:  # pragma: no cover - transformers always installs regex
    _article_re = re

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = _article_re.compile(r"\b(a|an|the)\b")


# ------------------------------------------------------------------------------ Lost in the Middle
def squad_normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, articles -> space, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(prediction: str) -> str:
    """What the reference scores: the reply up to its first newline, stripped.

    Splitting *before* stripping matters: a reply that starts with a newline scores as empty.
    """
    return prediction.split("\n")[0].strip()


def best_subspan_em(prediction: str, answers: Iterable[str]) -> float:
    """1.0 if a normalised gold answer is a substring of the normalised first line of the reply."""
    normalized_prediction = squad_normalize(first_line(prediction))
    for answer in answers:
        # The reference lowercases both sides again; normalisation already did, so it is a no-op.
        if squad_normalize(answer).lower() in normalized_prediction.lower():
            return 1.0
    return 0.0


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """Whether ``text`` contains a non-empty normalised answer as a whole-word sequence.

    Used to pick answer-free distractors. Whole words, like the reference's token-based
    ``hasanswer``, so that a one-letter answer ("S") does not match every passage.
    """
    padded = f" {squad_normalize(text)} "
    return any(a and f" {a} " in padded for a in (squad_normalize(x) for x in answers))


# ------------------------------------------------------------------------------ MuSiQue
_MUSIQUE_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)  # the reference uses ``re`` here, not ``regex``


def musique_normalize(text: str) -> str:
    """``normalize_answer`` of MuSiQue's ``metrics/answer.py``: lowercase, drop ASCII punctuation, articles ->
    space, collapse whitespace (same steps as SQuAD, with ``re``'s word boundaries)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_MUSIQUE_ARTICLES.sub(" ", text).split())


def _musique_tokens(text: str) -> list[str]:
    return musique_normalize(text).split() if text else []


def musique_f1(prediction: str, answers: Iterable[str]) -> float:
    """Token F1 of the reply against each gold answer, the maximum (``compute_f1`` + ``metric_max_over_...``).

    As the reference: when either side normalises to no tokens, the score is 1 if both do, else 0.
    """
    best = 0.0
    pred = _musique_tokens(prediction)
    for answer in answers:
        gold = _musique_tokens(answer)
        if not gold or not pred:
            score = float(gold == pred)
        else:
            same = sum((collections.Counter(gold) & collections.Counter(pred)).values())
            precision, recall = same / len(pred), same / len(gold)
            score = 0.0 if same == 0 else 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


def musique_em(prediction: str, answers: Iterable[str]) -> float:
    """1.0 when the normalised reply equals a normalised gold answer (``compute_exact``, max over answers)."""
    pred = musique_normalize(prediction)
    return float(any(musique_normalize(a) == pred for a in answers))


# ------------------------------------------------------------------------------ SummHay
_CITATION = re.compile(r"\[([\d, ]+)\]")  # the reference's pattern: digits, commas and spaces in brackets


def summhay_citations(text: str) -> set[int]:
    """The document ids a reply cites: every ``[...]`` of digits, commas and spaces (``extract_citations``).

    One deviation, where the reference has no answer: it calls ``int()`` on each comma-separated part, so
    ``[1 2]`` raises ``ValueError`` there; here such a part counts as the numbers it holds (1 and 2).
    """
    ids: set[int] = set()
    for match in _CITATION.findall(text):
        for part in match.split(","):
            ids.update(int(n) for n in part.split())
    return ids


def citation_scores(cited: set[int], gold: set[int]) -> dict[str, float]:
    """Citation precision, recall and F1 of ``compute_single_sample_scores``: no citation -> precision 0, an empty
    gold set -> recall 0, F1 0 when precision + recall is 0."""
    hit = len(cited & gold)
    precision = hit / len(cited) if cited else 0.0
    recall = hit / len(gold) if gold else 0.0
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"citation_precision": precision, "citation_recall": recall, "citation_f1": f1}


# ------------------------------------------------------------------------------ FLenQA
def flenqa_normalize(text: str) -> str:
    """The notebook's ``normalize_answer``.

    Its punctuation step, ``s.replace("".join(set(string.punctuation)), '')``, replaces the whole
    32-character punctuation string, which never occurs in a reply: it removes nothing, so it is
    left out here. Lowercasing, articles -> space (``re``, as in the notebook) and whitespace
    collapsing are kept; the collapse is why "not\\ntrue" counts as "not true".
    """
    text = str(text).lower()
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


FLENQA_OTHER = "other/refused"


def flenqa_category(reply: str) -> str:
    """``true``, ``false`` or ``other/refused``: the later of the last "true" and the last "false".

    As the reference: normalised twice (``response_analysis`` normalises, ``response_category``
    again), ``not true`` -> ``false``, then plain substring positions (so "untrue" counts as "true").
    """
    text = flenqa_normalize(flenqa_normalize(reply)).replace("not true", "false")
    last_true, last_false = text.rfind("true"), text.rfind("false")
    if last_true > last_false:
        return "true"
    if last_false > last_true:
        return "false"
    return FLENQA_OTHER


def flenqa_correct(reply: str, label: str) -> float:
    """1.0 when the reply's category is the label (``"True"``/``"False"``, any case), else 0.0."""
    # The reference tests ``category in label.lower()``; for the two labels that equals equality.
    return float(flenqa_category(reply) == str(label).strip().lower())


# ------------------------------------------------------------------------------ Retrieval Head (NIAH)
@cache
def _rouge1_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall of ``reference`` in ``prediction`` (unigrams, Porter stemming, as Wu et al.)."""
    return float(_rouge1_scorer().score(reference, prediction)["rouge1"].recall)


def niah_success(reference: str, prediction: str) -> float:
    """Wu et al.'s retrieval success: 1.0 when the ROUGE-1 recall of the answer span exceeds 0.5 (strictly)."""
    return float(rouge1_recall(reference, prediction) * 100 > 50)  # the reference's comparison, verbatim
