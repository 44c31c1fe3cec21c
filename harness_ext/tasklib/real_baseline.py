"""The real-data baseline of the synthetic MDQA grid ("Real Data (Limited)", Zhao, Yin & Durrett 2025).

MDQA-format samples from the NQ-Open questions of the Lost-in-the-Middle oracle file, split by a hash
of the question (:func:`harness_ext.tasklib.synth_corpus.question_split`: ``sha256(question) mod 10 < 2``
-> ``eval``). The gold document is the question's real gold passage; the distractors are gold passages
of *other questions of the same split* without any of the answers, drawn exactly as the MDQA fixture
draws them (:func:`harness_ext.tasklib.mdqa_fixture.draw_distractors`), so no passage of an evaluation
question ever reaches training data. Samples follow the MDQA paired order (SHA-256 of seed + question).

:func:`check_no_leakage` refuses a training set that shares a question with an evaluation set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.mdqa import order_key
from harness_ext.tasklib.mdqa_fixture import draw_distractors
from harness_ext.tasklib.synth_cells import DrawContext
from harness_ext.tasklib.synth_corpus import Corpus, Sample, question_split

_ANSWER_LINE = "\nQuestion: "


def split_rows(corpus: Corpus, split: str, seed: int) -> list[dict]:
    """The oracle rows of ``split`` in the paired order of MDQA (``order_key(question, seed)``)."""
    rows = [r for r in corpus.rows if question_split(r["question"]) == split]
    return sorted(rows, key=lambda r: (order_key(r["question"], seed), r["question"]))


_PICKS: dict[tuple[str, int, int], tuple[Corpus, list[dict], list[list[int]]]] = {}


def _picks(corpus: Corpus, split: str, seed: int, count: int) -> tuple[list[dict], list[list[int]]]:
    # Drawing for a whole split is the fixture's procedure; keep the last result (every sample reuses it).
    key = (split, seed, count)
    cached = _PICKS.get(key)
    if cached is None or cached[0] is not corpus:
        rows = split_rows(corpus, split, seed)
        _PICKS.clear()
        _PICKS[key] = cached = (corpus, rows, draw_distractors(rows, count, seed))
    return cached[1], cached[2]


def real_sample(ctx: DrawContext, rng: np.random.Generator, index: int, count: int) -> Sample:
    """Question ``index`` of the split with its gold passage and ``count`` answer-free real distractors."""
    rows, picks = _picks(ctx.corpus, ctx.split, ctx.seed, count)
    if index >= len(rows):
        raise NeedlesError(
            f"the {ctx.split} split of NQ-Open has {len(rows)} questions; sample {index + 1} does not exist",
            fix=f"use synth_num_samples <= {len(rows)}",
        )
    row = rows[index]
    gold = {"title": row["ctxs"][0].get("title") or "", "text": row["ctxs"][0]["text"]}
    distractors = [
        {"title": rows[j]["ctxs"][0].get("title") or "", "text": rows[j]["ctxs"][0]["text"]} for j in picks[index]
    ]
    return Sample(
        question=row["question"],
        answers=list(row["answers"]),
        gold=gold,
        gold_span=gold["text"],
        distractors=distractors,
        source=f"nq-open question {question_hash(row['question'])[:12]}",
    )


# ---------------------------------------------------------------------------------- leakage
def question_hash(question: str) -> str:
    """SHA-256 of the question, case- and whitespace-insensitive."""
    return hashlib.sha256(" ".join(question.split()).lower().encode()).hexdigest()


def question_of(doc: dict) -> str:
    """A document's question: its ``question`` field, else the last ``Question:`` line of its LitM prompt."""
    if isinstance(doc.get("question"), str):
        return doc["question"]
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or _ANSWER_LINE not in prompt:
        raise NeedlesError(
            "a document has neither a question nor a LitM prompt with a 'Question:' line",
            fix="pass documents made by harness_ext.tasklib.synth_mdqa (rows or training_examples)",
        )
    return prompt.rsplit(_ANSWER_LINE, 1)[1].split("\n", 1)[0].strip()


def check_no_leakage(train_docs: Iterable[dict], eval_docs: Iterable[dict]) -> None:
    """Refuse (NeedlesError) training documents whose question hash occurs among the evaluation documents."""
    eval_hashes = {question_hash(question_of(d)) for d in eval_docs}
    train_hashes = {question_hash(question_of(d)) for d in train_docs}
    leaked = eval_hashes & train_hashes
    if leaked:
        raise NeedlesError(
            f"{len(leaked)} evaluation question(s) of {len(eval_hashes)} also occur in the training set (leaked)",
            fix="build training data from the train split only (training_examples does) and evaluate on the eval split",
        )
