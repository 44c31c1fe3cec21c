"""The synthetic MDQA cells: one draw function per (needle concept x haystack diversity) cell.

Each draw function has the signature ``draw(ctx, rng, index, count) -> Sample``: sample ``index`` of
the split, with a pool of ``count`` distractor documents in prompt order. It consumes ``rng``
(``numpy`` PCG64, seeded per sample by :mod:`harness_ext.tasklib.synth_mdqa`) sequentially, gold first,
so a larger pool extends a smaller one instead of changing it.

* ``symbolic_kv``: records of UUID ``key K: value V`` pairs; the question asks for one key's value.
* ``templated_entities``: documents about invented entities, each a few facts from :data:`TEMPLATES`;
  every distractor holds a fact of the question's relation about another entity.
* ``templated_in_prose``: one templated fact inside a real train-split Wikipedia passage (LitM oracle
  file); the distractors are other real passages.
* ``natural_in_prose``: a natural-language needle (:data:`NATURAL_FACTS`, optionally Wu et al.'s
  needles) inside a real passage; the distractors are real passages. Needles are split 50/50 by a
  hash of the needle sentence, so training and evaluation never share one.

Every invented string (names, values, UUIDs) is redrawn until it collides with no NQ-Open answer or
passage (:meth:`harness_ext.tasklib.synth_corpus.Corpus.collides`); a natural fact that collides is
dropped from the pool.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.tasklib.synth_corpus import (
    Corpus,
    Sample,
    draw_passages,
    insert_sentence,
    invented_name,
    invented_person,
)

NATURAL_TRAIN_FRACTION = 0.5
_NATURAL_SALT = "synth-natural-split-v1"


@dataclass(frozen=True)
class Template:
    relation: str
    fact: str  # with {e} (entity) and {v} (value)
    question: str
    kind: str  # how the value is invented: place | language | person | creature


TEMPLATES = (
    Template("capital", "The capital of {e} is {v}.", "What is the capital of {e}?", "place"),
    Template("language", "The official language of {e} is {v}.", "What is the official language of {e}?", "language"),
    Template("ruler", "The current ruler of {e} is {v}.", "Who is the current ruler of {e}?", "person"),
    Template("river", "The longest river in {e} is the {v}.", "What is the longest river in {e}?", "place"),
    Template("animal", "The national animal of {e} is the {v}.", "What is the national animal of {e}?", "creature"),
    Template("founder", "{e} was founded by {v}.", "Who founded {e}?", "person"),
)


@dataclass(frozen=True)
class NaturalFact:
    needle: str
    question: str
    answer: str


# Natural-language needles in the style of NIAH tests: plausible, specific, and unknowable from memory.
NATURAL_FACTS = tuple(
    NaturalFact(*t)
    for t in (
        (
            "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
            "What is the best thing to do in San Francisco?",
            "eat a sandwich and sit in Dolores Park on a sunny day",
        ),
        (
            "Marisol keeps her spare house key inside a hollow garden gnome by the back door.",
            "Where does Marisol keep her spare house key?",
            "inside a hollow garden gnome",
        ),
        (
            "Priya named her sailboat the Quiet Heron after a bird she saw on her first voyage.",
            "What did Priya name her sailboat?",
            "Quiet Heron",
        ),
        (
            "The book club of the Lindenhurst library meets every second Thursday in the greenhouse room.",
            "Where does the book club of the Lindenhurst library meet?",
            "in the greenhouse room",
        ),
        (
            "Every morning Tobias feeds his three goats oat biscuits before he opens the bakery.",
            "What does Tobias feed his goats every morning?",
            "oat biscuits",
        ),
        (
            "The password of the workshop's wireless network is written on the back of the blue toolbox.",
            "Where is the password of the workshop's wireless network written?",
            "on the back of the blue toolbox",
        ),
        (
            "Grandmother Ilse hid the family recipes in a biscuit tin under the attic stairs.",
            "Where did Grandmother Ilse hide the family recipes?",
            "in a biscuit tin under the attic stairs",
        ),
        (
            "The harbour festival in Kestrel Bay always ends with a race of paper lanterns across the water.",
            "How does the harbour festival in Kestrel Bay always end?",
            "with a race of paper lanterns",
        ),
        (
            "Dr. Okafor's favourite way to relax is restoring old clocks in her garage.",
            "What is Dr. Okafor's favourite way to relax?",
            "restoring old clocks",
        ),
        (
            "The lighthouse keeper on Morrow Island plays the cello to the seals every evening.",
            "What does the lighthouse keeper on Morrow Island do every evening?",
            "plays the cello to the seals",
        ),
        (
            "The winning entry at the Fernhill pumpkin show was carved to look like a sleeping walrus.",
            "What was the winning entry at the Fernhill pumpkin show carved to look like?",
            "a sleeping walrus",
        ),
        (
            "Jonas learned to juggle from a retired circus clown who lived above the pharmacy.",
            "Who taught Jonas to juggle?",
            "a retired circus clown",
        ),
        (
            "Mei's bicycle bell plays the first four notes of a lullaby her mother used to sing.",
            "What does Mei's bicycle bell play?",
            "the first four notes of a lullaby",
        ),
        (
            "The old stone bridge in Harrowgate was repaired with bricks taken from a demolished chapel.",
            "What was the old stone bridge in Harrowgate repaired with?",
            "bricks taken from a demolished chapel",
        ),
        (
            "Captain Reyes steers the night ferry with a brass compass she won in a card game.",
            "What does Captain Reyes steer the night ferry with?",
            "a brass compass she won in a card game",
        ),
        (
            "Sunday dinners at the Kowalczyk house always start with a bowl of beetroot soup with dill.",
            "How do Sunday dinners at the Kowalczyk house always start?",
            "with a bowl of beetroot soup with dill",
        ),
        (
            "The most popular exhibit of the Pellworth museum is a mechanical owl that blinks when visitors whisper.",
            "What is the most popular exhibit of the Pellworth museum?",
            "a mechanical owl that blinks",
        ),
        (
            "Luca's first job was sorting lost umbrellas at the central railway station.",
            "What was Luca's first job?",
            "sorting lost umbrellas",
        ),
        (
            "The choir of Wrenfield rehearses in an empty grain silo because of its echo.",
            "Where does the choir of Wrenfield rehearse?",
            "in an empty grain silo",
        ),
        (
            "Nadia trains for marathons by running up the steps of the old water tower twice a day.",
            "How does Nadia train for marathons?",
            "running up the steps of the old water tower",
        ),
        (
            "The rare apple grown behind the Halloway school tastes faintly of pear and cardamom.",
            "What does the rare apple grown behind the Halloway school taste of?",
            "pear and cardamom",
        ),
        (
            "Oskar repaired the village radio with a spring taken from his grandfather's pocket watch.",
            "What did Oskar repair the village radio with?",
            "a spring taken from his grandfather's pocket watch",
        ),
        (
            "The night market in Sorrel Lane is famous for its grilled corn dusted with smoked chili salt.",
            "What is the night market in Sorrel Lane famous for?",
            "grilled corn dusted with smoked chili salt",
        ),
        (
            "Elena practises the violin in the laundry room because the tiles make it sound brighter.",
            "Where does Elena practise the violin?",
            "in the laundry room",
        ),
    )
)


@dataclass
class DrawContext:
    """What a draw function needs besides its random stream."""

    corpus: Corpus
    split: str
    seed: int
    facts_per_document: int
    natural_facts: tuple[NaturalFact, ...] = ()


DrawFn = Callable[[DrawContext, np.random.Generator, int, int], Sample]


# ---------------------------------------------------------------------------------- natural facts
def natural_split(fact: NaturalFact) -> str:
    """``train`` or ``eval`` by a hash of the needle sentence (case- and whitespace-insensitive)."""
    key = " ".join(fact.needle.split()).lower()
    h = int(hashlib.sha256(f"{_NATURAL_SALT}\0{key}".encode()).hexdigest()[:15], 16)
    return "train" if h / 16**15 < NATURAL_TRAIN_FRACTION else "eval"


def natural_pool(corpus: Corpus, split: str, extra: tuple[NaturalFact, ...] = ()) -> tuple[NaturalFact, ...]:
    """The split's natural facts (built-in plus ``extra``) whose answer collides with no NQ-Open answer or passage."""
    pool = tuple(f for f in NATURAL_FACTS + extra if natural_split(f) == split and not corpus.collides(f.answer))
    if not pool:
        raise NeedlesError(f"no natural fact is left in the {split} split", fix="add natural facts")
    return pool


# ---------------------------------------------------------------------------------- helpers
def _uuid(rng: np.random.Generator, corpus: Corpus, taken: set[str]) -> str:
    while True:
        value = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if value not in taken and not corpus.collides(value):
            taken.add(value)
            return value


def _value(kind: str, rng: np.random.Generator, corpus: Corpus, taken: set[str]) -> str:
    if kind == "person":
        return invented_person(rng, corpus, taken)
    return invented_name(rng, corpus, taken, suffix="ish" if kind == "language" else "")


def _entity_document(
    ctx: DrawContext, rng: np.random.Generator, taken: set[str], first: Template
) -> tuple[str, dict, str, str]:
    """(entity, document, sentence of ``first``, value of ``first``): facts of ``first`` and other relations."""
    entity = invented_name(rng, ctx.corpus, taken, suffix="ia")
    others = [t for t in TEMPLATES if t is not first]
    k = min(ctx.facts_per_document, len(TEMPLATES)) - 1
    chosen = [first] + [others[int(j)] for j in rng.permutation(len(others))[:k]]
    values = [_value(t.kind, rng, ctx.corpus, taken) for t in chosen]
    facts = [t.fact.format(e=entity, v=v) for t, v in zip(chosen, values)]
    text = " ".join(facts[int(j)] for j in rng.permutation(len(facts)))
    return entity, {"title": entity, "text": text}, facts[0], values[0]


# ---------------------------------------------------------------------------------- cells
def symbolic_kv(ctx: DrawContext, rng: np.random.Generator, index: int, count: int) -> Sample:
    taken: set[str] = set()
    k = ctx.facts_per_document

    def record() -> tuple[dict, list[tuple[str, str]]]:
        pairs = [(_uuid(rng, ctx.corpus, taken), _uuid(rng, ctx.corpus, taken)) for _ in range(k)]
        title = f"record {_uuid(rng, ctx.corpus, taken)[:8]}"
        return {"title": title, "text": " ".join(f"key {a}: value {b}." for a, b in pairs)}, pairs

    gold, pairs = record()
    key, value = pairs[int(rng.integers(k))]
    distractors = [record()[0] for _ in range(count)]
    return Sample(
        question=f"What is the value of key {key}?",
        answers=[value],
        gold=gold,
        gold_span=f"key {key}: value {value}.",
        distractors=distractors,
        source="uuid records",
    )


def templated_entities(ctx: DrawContext, rng: np.random.Generator, index: int, count: int) -> Sample:
    taken: set[str] = set()
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    entity, gold, sentence, value = _entity_document(ctx, rng, taken, template)
    distractors = [_entity_document(ctx, rng, taken, template)[1] for _ in range(count)]
    return Sample(
        question=template.question.format(e=entity),
        answers=[value],
        gold=gold,
        gold_span=sentence,
        distractors=distractors,
        source=f"template {template.relation}",
    )


def templated_in_prose(ctx: DrawContext, rng: np.random.Generator, index: int, count: int) -> Sample:
    taken: set[str] = set()
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    entity = invented_name(rng, ctx.corpus, taken, suffix="ia")
    value = _value(template.kind, rng, ctx.corpus, taken)
    sentence = template.fact.format(e=entity, v=value)
    return _in_prose(
        ctx, rng, count, template.question.format(e=entity), [value], sentence, f"template {template.relation}"
    )


def natural_in_prose(ctx: DrawContext, rng: np.random.Generator, index: int, count: int) -> Sample:
    # Facts in turn (offset by the seed), so every fact of the split is used before any repeats.
    fact = ctx.natural_facts[(index + ctx.seed) % len(ctx.natural_facts)]
    return _in_prose(ctx, rng, count, fact.question, [fact.answer], fact.needle, f"fact {fact.needle[:40]!r}")


def _in_prose(
    ctx: DrawContext, rng: np.random.Generator, count: int, question: str, answers: list[str], sentence: str, src: str
) -> Sample:
    # Gold first (host passage, then where the sentence goes), distractors after: a larger pool extends a smaller one.
    (host,) = draw_passages(rng, ctx.corpus, 1, set())
    passage = ctx.corpus.passages[host]
    gold = {"title": passage["title"], "text": insert_sentence(rng, passage["text"], sentence)}
    distractors = [dict(ctx.corpus.passages[j]) for j in draw_passages(rng, ctx.corpus, count, {host})]
    return Sample(question, answers, gold, sentence, distractors, src)
