"""The synthetic cells of the MuSiQue and SummHay data families: one draw function per (task x needle concept).

Each draw function has the signature ``draw(rng, index, pool) -> Draw``: sample ``index`` with ``pool`` filler
units, consuming ``rng`` (a ``random.Random`` seeded per sample by :mod:`harness_ext.tasklib.qa_cells`) keys first,
so the key units of a sample do not depend on the pool size.

* MuSiQue ``symbolic``: chained dictionaries. Records of ``key K: value V`` pairs (8 hex digits each); the value of
  the first key is the key of the next hop's pair, and so on for ``hops`` lookups; the question asks for the final
  value. Each hop's pair sits in its own record (a supporting paragraph); the other records hold unrelated pairs.
* MuSiQue ``templated``: a chain of templated facts about invented entities (``X was founded by Y.``,
  ``Y was born in Z.``); the question composes the relations (*What is the birthplace of the founder of X?*). The
  fillers state the same relations about look-alike entities, so only the chain answers it.
* SummHay ``symbolic``: records of key-value pairs; the fact ``key K has value V`` is stated by ``num_gold`` records.
  Some fillers hold the same key with another value, so citing by the key alone is wrong.
* SummHay ``templated``: short articles of templated facts (:data:`harness_ext.tasklib.synth_cells.TEMPLATES`) about
  invented entities; the fact is one sentence stated by ``num_gold`` articles. Some fillers state another fact about
  the same entity, so citing by the entity alone is wrong.

Invented strings are drawn from syllables and hex digits; within a sample every one is distinct.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from harness_ext.tasklib.haystack_fit import Unit
from harness_ext.tasklib.synth_cells import TEMPLATES

_SYL = ("bra", "ce", "dor", "fen", "gal", "hix", "jo", "kel", "lum", "mar", "nev", "osk", "pri", "quo", "ru", "sil")
_SYL += ("tav", "ul", "ven", "wex", "yor", "zan")
_LURES = 3  # SummHay: fillers that share the key (symbolic) or the entity (templated) but not the fact


@dataclass
class Draw:
    """One sample: the question (MuSiQue) or the fact to cite (SummHay), its key units and the filler pool."""

    question: str
    keys: list[Unit]  # supporting paragraphs / the documents that state the fact, in prompt order
    pool: list[Unit]  # fillers in the order they are taken (order_key: their display order)
    answers: list[str] = field(default_factory=list)  # MuSiQue
    hops: int = 0  # MuSiQue
    last_hop: str = ""  # MuSiQue: uid of the paragraph that holds the answer
    kind: str = "Article"  # SummHay: how the documents are introduced


DrawFn = Callable[[random.Random, int, int, int, int], Draw]


class _Names:
    """Distinct invented strings of one sample."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def _fresh(self, make: Callable[[], str]) -> str:
        while True:
            value = make()
            if value.lower() not in self.used:
                self.used.add(value.lower())
                return value

    def hex(self) -> str:
        return self._fresh(lambda: "".join(self.rng.choice("0123456789abcdef") for _ in range(8)))

    def word(self) -> str:
        return self._fresh(lambda: "".join(self.rng.choice(_SYL) for _ in range(self.rng.randint(2, 3))).capitalize())

    def entity(self, kind: str) -> str:
        if kind == "person":
            return self._fresh(lambda: f"{self.word()} {self.word()}")
        suffix = {"org": " Holdings", "city": "ville", "country": "ia"}.get(kind, "")
        return self._fresh(lambda: self.word() + suffix)


def _units(rng: random.Random, prefix: str, texts: list[tuple[str, str]]) -> list[Unit]:
    """Filler units with a seeded display order (order_key) independent of how many are taken."""
    return [Unit(f"{prefix}{j}", t, x, False, f"{rng.random():.17f}") for j, (t, x) in enumerate(texts)]


def _shuffled(rng: random.Random, items: list) -> list:
    out = list(items)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------- MuSiQue
def _record(pairs: list[tuple[str, str]]) -> str:
    return " ".join(f"key {k}: value {v}." for k, v in pairs)


def musique_symbolic(rng: random.Random, index: int, pool: int, hops: int, _num_gold: int) -> Draw:
    names = _Names(rng)
    chain = [names.hex() for _ in range(hops + 1)]  # key_1 -> key_2 -> ... -> value
    keys = []
    for h in range(hops):
        pairs = [(names.hex(), names.hex()) for _ in range(2)]
        pairs.insert(rng.randint(0, 2), (chain[h], chain[h + 1]))
        keys.append(Unit(f"s{index}:hop{h + 1}", f"record {names.hex()}", _record(pairs), True))
    last = keys[-1].uid
    fillers = [(f"record {names.hex()}", _record([(names.hex(), names.hex()) for _ in range(3)])) for _ in range(pool)]
    question = (
        f"Look up key {chain[0]}. Its value is another key: look that key up too"
        + (", and so on" if hops > 2 else "")
        + f", {hops} lookups in all. What is the value the last lookup gives?"
    )
    return Draw(question, _shuffled(rng, keys), _units(rng, f"s{index}:f", fillers), [chain[-1]], hops, last)


# relation: (subject kind, object kind, fact, phrase of the question)
_RELATIONS = {
    "founder": ("org", "person", "{s} was founded in {y} by {o}.", "the founder of {s}"),
    "spouse": ("person", "person", "{s} married {o} in {y}.", "the spouse of {s}"),
    "birthplace": ("person", "city", "{s} was born in {o} in {y}.", "the birthplace of {s}"),
    "country": ("city", "country", "{s} is a city in {o}, chartered in {y}.", "the country of {s}"),
}
_CHAINS = {2: ("founder", "birthplace"), 3: ("founder", "spouse", "birthplace"), 4: tuple(_RELATIONS)}
_FILLER = (
    "{t} is described in a regional almanac.",
    "Records from {y} mention {t} several times.",
    "{t} was the subject of a short survey in {y}.",
)


def _paragraph(rng: random.Random, title: str, fact: str) -> str:
    sentences = [t.format(t=title, y=rng.randint(1700, 2010)) for t in rng.sample(_FILLER, 2)]
    sentences.insert(rng.randint(0, 2), fact)
    return " ".join(sentences)


def _fact(rng: random.Random, rel: str, s: str, o: str) -> str:
    return _RELATIONS[rel][2].format(s=s, o=o, y=rng.randint(1800, 2000))


def musique_templated(rng: random.Random, index: int, pool: int, hops: int, _num_gold: int) -> Draw:
    names = _Names(rng)
    subject, keys, phrase = names.entity("org"), [], ""
    phrase = subject
    for h, rel in enumerate(_CHAINS[hops]):
        obj = names.entity(_RELATIONS[rel][1])
        keys.append(
            Unit(f"s{index}:hop{h + 1}", subject, _paragraph(rng, subject, _fact(rng, rel, subject, obj)), True)
        )
        phrase = _RELATIONS[rel][3].format(s=phrase)
        subject = obj
    fillers = []
    for _ in range(pool):  # look-alike entities with the chain's relations, none on the chain
        rel = rng.choice(_CHAINS[hops])
        s, o = names.entity(_RELATIONS[rel][0]), names.entity(_RELATIONS[rel][1])
        fillers.append((s, _paragraph(rng, s, _fact(rng, rel, s, o))))
    last = keys[-1].uid
    return Draw(f"What is {phrase}?", _shuffled(rng, keys), _units(rng, f"s{index}:f", fillers), [subject], hops, last)


# ---------------------------------------------------------------------------------- SummHay
def summhay_symbolic(rng: random.Random, index: int, pool: int, _hops: int, num_gold: int) -> Draw:
    names = _Names(rng)
    key, value = names.hex(), names.hex()

    def record(pair: tuple[str, str] | None) -> str:
        pairs = [(names.hex(), names.hex()) for _ in range(5)]
        if pair is not None:
            pairs.insert(rng.randint(0, 5), pair)
        return _record(pairs)

    keys = [Unit(f"s{index}:gold{g}", "", record((key, value)), True) for g in range(num_gold)]
    fillers = [("", record((key, names.hex()) if j < _LURES else None)) for j in range(pool)]
    return Draw(f"key {key} has value {value}", keys, _units(rng, f"s{index}:f", fillers))


def _article(rng: random.Random, names: _Names, facts: list[str]) -> str:
    out = list(facts)
    while len(out) < 5:
        t = rng.choice(TEMPLATES)
        out.append(t.fact.format(e=names.entity("country"), v=_value(names, t.kind)))
    return " ".join(_shuffled(rng, out))


def _value(names: _Names, kind: str) -> str:
    return {"person": names.entity("person"), "language": names.word() + "ish"}.get(kind, names.word())


def summhay_templated(rng: random.Random, index: int, pool: int, _hops: int, num_gold: int) -> Draw:
    names = _Names(rng)
    entity, template = names.entity("country"), rng.choice(TEMPLATES)
    fact = template.fact.format(e=entity, v=_value(names, template.kind))
    others = [t for t in TEMPLATES if t.relation != template.relation]
    keys = [Unit(f"s{index}:gold{g}", "", _article(rng, names, [fact]), True) for g in range(num_gold)]
    fillers = []
    for j in range(pool):
        lure = [rng.choice(others).fact.format(e=entity, v=_value(names, "place"))] if j < _LURES else []
        fillers.append(("", _article(rng, names, lure)))
    return Draw(fact.rstrip("."), keys, _units(rng, f"s{index}:f", fillers))
