"""What the synthetic MDQA cells draw from: the real NQ-Open corpus, its train/eval split, invented names.

* :class:`Corpus`: the Lost-in-the-Middle oracle file (NQ-Open questions, one gold Wikipedia passage
  each), its train-split passages (the only real passages synthetic data may use, so that no gold
  passage of an evaluation question ever appears in training data) and the normalised vocabulary of
  every answer and passage, against which invented strings are checked.
* :func:`question_split`: the held-out split of NQ-Open questions (``sha256(question) mod 10 < 2`` ->
  ``eval``), shared by the real-data baseline and the synthetic cells.
* :func:`invented_name` / :func:`invented_person`: pronounceable invented names, redrawn until their
  SQuAD-normalised form occurs nowhere among the NQ-Open answers and passages.
* :class:`Sample`: one MDQA-shaped sample before rendering (question, answers, gold document, a pool
  of distractor documents in prompt order); :func:`arrange` and :func:`prompt_of` render it with the
  LitM ``qa`` prompt, :func:`fit_documents` sizes it to a token target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import LOST_IN_THE_MIDDLE, Resolved, fetch
from harness_ext.tasklib.mdqa import EVAL_BUCKETS, ORACLE_FILE, question_split, render_prompt  # noqa: F401 (re-exported)
from harness_ext.tasklib.mdqa_fixture import read_oracle
from harness_ext.tasklib.metrics import squad_normalize
from harness_ext.tasklib.token_budget import count_tokens

SPLITS = ("train", "eval")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MAX_REDRAWS = 200


def sentences(text: str) -> list[str]:
    """``text`` cut at its sentence boundaries (the ones passages are inserted at), whitespace runs made one space."""
    return _SENTENCE.split(" ".join(text.split()))


# Syllables of invented names. Collisions with real text are checked, not assumed away.
_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "th", "m", "x", "nd")


@dataclass
class Sample:
    """One sample before rendering: the gold document and a pool of distractors (prompt order)."""

    question: str
    answers: list[str]
    gold: dict  # {"title", "text"}
    gold_span: str  # the text of the gold document that holds the answer
    distractors: list[dict]
    source: str  # what the sample was drawn from (template, fact key or question hash), for logs


@dataclass
class Corpus:
    """The NQ-Open oracle rows, the train-split passages and the vocabulary invented strings must avoid."""

    rows: list[dict]
    resolved: Resolved | None
    passages: list[dict] = field(default_factory=list)  # unique train-split gold passages {title, text}
    words: frozenset[str] = frozenset()
    answers: frozenset[str] = frozenset()
    blob: str = ""  # " " + every normalised passage and answer + " ", for multi-word checks

    @classmethod
    def from_rows(cls, rows: list[dict], resolved: Resolved | None = None) -> Corpus:
        # A passage that is the gold passage of any eval question never serves synthetic data (even if a
        # train question shares it): evaluation passages stay unseen in training.
        seen = {r["ctxs"][0]["text"] for r in rows if question_split(r["question"]) == "eval"}
        passages, normalised = [], []
        answers: set[str] = set()
        for row in rows:
            ctx = row["ctxs"][0]
            normalised.append(squad_normalize(f"{ctx.get('title') or ''} {ctx.get('text') or ''}"))
            answers.update(a for a in (squad_normalize(x) for x in row["answers"]) if a)
            if ctx["text"] not in seen:
                seen.add(ctx["text"])
                passages.append({"title": ctx.get("title") or "", "text": ctx["text"]})
        normalised.extend(answers)
        words = frozenset(w for text in normalised for w in text.split())
        blob = " " + " \n ".join(normalised) + " "
        return cls(rows, resolved, passages, words, frozenset(answers), blob)

    def collides(self, text: str) -> bool:
        """Whether ``text`` (normalised) is an NQ-Open answer or occurs as whole words in an answer or passage."""
        norm = squad_normalize(text)
        if not norm or norm in self.answers:
            return True
        if " " not in norm:
            return norm in self.words
        return f" {norm} " in self.blob


def load_corpus(metadata: dict) -> Corpus:
    """The oracle file through the MDQA source (``mdqa_mirror``, cache or verified download)."""
    got = fetch(LOST_IN_THE_MIDDLE, ORACLE_FILE, metadata)
    return _corpus_for(str(got.path), got.sha256, got)


_CORPORA: dict[tuple[str, str], Corpus] = {}


def _corpus_for(path: str, sha256: str, got: Resolved) -> Corpus:
    key = (path, sha256)
    if key not in _CORPORA:
        _CORPORA.clear()  # one corpus at a time: it holds a few MB of text
        _CORPORA[key] = Corpus.from_rows(read_oracle(Path(path)), got)
    return _CORPORA[key]


# ---------------------------------------------------------------------------------- invented strings
def _syllables(rng: np.random.Generator, count: int) -> str:
    parts = []
    for _ in range(count):
        parts.append(_ONSETS[int(rng.integers(len(_ONSETS)))])
        parts.append(_VOWELS[int(rng.integers(len(_VOWELS)))])
        parts.append(_CODAS[int(rng.integers(len(_CODAS)))])
    return "".join(parts)


def invented_name(rng: np.random.Generator, corpus: Corpus, taken: set[str], suffix: str = "") -> str:
    """A capitalised invented word (plus ``suffix``) that collides with no real answer/passage nor ``taken``."""
    for _ in range(_MAX_REDRAWS):
        name = (_syllables(rng, 3 if rng.integers(4) == 0 else 2) + suffix).capitalize()
        if name.lower() not in taken and not corpus.collides(name):
            taken.add(name.lower())
            return name
    raise NeedlesError(
        f"could not invent a name absent from the NQ-Open corpus in {_MAX_REDRAWS} draws",
        fix="this should not happen with the official oracle file; check mdqa_mirror",
    )


def invented_person(rng: np.random.Generator, corpus: Corpus, taken: set[str]) -> str:
    return f"{invented_name(rng, corpus, taken)} {invented_name(rng, corpus, taken)}"


def insert_sentence(rng: np.random.Generator, text: str, sentence: str) -> str:
    """``text`` with ``sentence`` inserted at a uniformly drawn sentence boundary (start and end included).

    The passage's own bytes are kept (no re-spacing): only ``sentence`` and one space are added.
    """
    text = text.strip()
    cuts = [0] + [m.end() for m in _SENTENCE.finditer(text)] + [len(text)]
    at = cuts[int(rng.integers(len(cuts)))]
    if at == len(text):
        return f"{text} {sentence}"
    return f"{text[:at]}{sentence} {text[at:]}"


def draw_passages(rng: np.random.Generator, corpus: Corpus, count: int, exclude: set[int]) -> list[int]:
    """``count`` distinct train-split passage indices not in ``exclude``, in draw order."""
    available = len(corpus.passages) - len(exclude)
    if count > available:
        raise NeedlesError(
            f"{count} real passages needed but the train split has {available}",
            fix="use fewer documents or a shorter synth_lengths target",
        )
    picked: list[int] = []
    seen = set(exclude)
    while len(picked) < count:
        j = int(rng.integers(len(corpus.passages)))
        if j not in seen:
            seen.add(j)
            picked.append(j)
    return picked


# ---------------------------------------------------------------------------------- rendering and length
def arrange(sample: Sample, num_documents: int, position: int) -> list[dict]:
    """The prompt's documents: the first ``num_documents - 1`` distractors with the gold one at ``position``."""
    ctxs = [dict(c, isgold=False) for c in sample.distractors[: num_documents - 1]]
    ctxs.insert(position - 1, dict(sample.gold, isgold=True))
    return ctxs


def prompt_of(question: str, ctxs: list[dict]) -> str:
    """The LitM ``qa`` prompt (templates/mdqa/qa.jinja), ending at ``Answer:``."""
    return render_prompt({"question": question, "ctxs": ctxs, "prompt_variant": "qa"})


def fit_documents(sample: Sample, length: int, positions: tuple[int, ...], tokenizer) -> tuple[int, dict[int, int]]:
    """(documents, tokens per position): the most documents whose prompt fits ``length`` at every position.

    Returns documents = len(pool) + 2 when even the whole pool fits (the caller draws a larger pool).
    """
    pool = len(sample.distractors) + 1

    def tokens(n: int, position: int = 1) -> int:
        return count_tokens(tokenizer, [prompt_of(sample.question, arrange(sample, n, position))])[0]

    if tokens(pool) <= length:
        return pool + 1, {}
    lo, hi = 0, pool  # tokens(lo) <= length < tokens(hi); tokens(0) means "nothing", always fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= length else (lo, mid)
    n = lo
    while n >= max(positions):
        counts = dict(
            zip(
                positions,
                count_tokens(tokenizer, [prompt_of(sample.question, arrange(sample, n, p)) for p in positions]),
            )
        )
        if max(counts.values()) <= length:
            return n, counts
        n -= 1
    raise NeedlesError(
        f"a target of {length} tokens holds only {max(n, lo)} document(s) of sample {sample.source!r}; "
        f"gold position {max(positions)} does not fit",
        fix="raise synth_lengths or use smaller synth_positions",
    )
