"""A small FLenQA FIXTURE in the dataset's schema, for tests (the real data is not on this machine).

Same columns and value sets as ``alonj/FLenQA`` (all three tasks, balanced labels, several
``ctx_size`` values, all padding types and dispersions), but invented, simple instances and
padding. The parquet file carries ``needles_fixture`` in its schema metadata and the folder a
``NEEDLES_FIXTURE.json`` marker: tasks refuse it without ``allow_unofficial_data`` and mark results.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import FIXTURE_MARKER, FLENQA_FILE

LABEL = "FLenQA FIXTURE (invented instances; not the FLenQA data)"
PADDING_TYPES = ("identity", "same", "books")
DISPERSIONS = ("first", "middle", "last", "random")
_NAMES = ("Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi")
_ROOMS = (("kitchen", "blue"), ("library", "red"), ("garage", "green"), ("attic", "yellow"))
_BOOK = (
    "The morning fog lay over the harbour while the fishing boats waited for the tide.",
    "She folded the letter twice and placed it carefully inside the old wooden drawer.",
    "Across the valley the church bells rang out, echoing against the grey stone walls.",
    "He had never seen a winter so long, nor a spring that arrived so quietly.",
    "The merchants counted their coins by candlelight and argued about the price of wool.",
    "A narrow path wound through the orchard towards the river and the mill beyond it.",
)


def _monorel(i: int, label: bool) -> dict:
    a, b, c = (_NAMES[(i + k) % len(_NAMES)] for k in range(3))
    facts = [f"{a} is older than {b}.", f"{b} is older than {c}."]
    question = f"Is {a} older than {c}?" if label else f"Is {c} older than {a}?"
    return {"facts": facts, "rule": None, "statement": None, "assertion/question": question}


def _pir(i: int, label: bool) -> dict:
    name = _NAMES[i % len(_NAMES)]
    room, colour = _ROOMS[i % len(_ROOMS)]
    other = _ROOMS[(i + 1) % len(_ROOMS)][1]
    facts = [f"{name} is in the {room}.", f"The {room} is a {colour} room."]
    question = f"Is {name} in a {colour if label else other} room?"
    return {"facts": facts, "rule": None, "statement": None, "assertion/question": question}


def _ruletaker(i: int, label: bool) -> dict:
    name = _NAMES[i % len(_NAMES)]
    statement = [f"{name} is big.", f"{name} is red."] if label else [f"{name} is big.", f"{name} is blue."]
    rule = "If someone is big and red then they are kind."
    return {"facts": statement, "rule": rule, "statement": statement, "assertion/question": f"{name} is kind."}


_MAKERS = {"MonoRel": _monorel, "PIR": _pir, "Simplified RuleTaker": _ruletaker}


def _padding(kind: str, facts: list[str], words: int, rng: random.Random) -> list[str]:
    if kind == "identity":  # duplicate: the key facts repeated
        pool = facts
    elif kind == "same":  # similar: facts of other invented instances, never about this one's people
        names = {n for n in _NAMES if any(n in f for f in facts)}
        pool = [f for m in _MAKERS.values() for i in range(8) for f in m(i, True)["facts"]]
        pool = [f for f in pool if not any(n in f for n in names)]
    else:  # books: unrelated prose
        pool = list(_BOOK)
    out, count = [], 0
    while count < words:
        sentence = rng.choice(pool)
        out.append(sentence)
        count += len(sentence.split())
    return out


def _mixin(facts: list[str], padding: list[str], dispersion: str, rng: random.Random) -> str:
    sentences = list(padding)
    n = len(sentences)
    if dispersion == "first":
        slots = list(range(len(facts)))
    elif dispersion == "last":
        slots = [n + k for k in range(len(facts))]
    elif dispersion == "middle":
        slots = [n // 2 + k for k in range(len(facts))]
    else:
        slots = sorted(rng.sample(range(n + len(facts)), len(facts)))
    for slot, fact in zip(slots, facts, strict=True):
        sentences.insert(slot, fact)
    return " ".join(sentences)


def build_rows(ctx_sizes: tuple[int, ...] = (250, 500, 1000), instances: int = 4, seed: int = 0) -> list[dict]:
    if not ctx_sizes or any(int(s) < 1 for s in ctx_sizes):
        raise NeedlesError(f"ctx sizes {list(ctx_sizes)} must be positive word counts", fix="e.g. --ctx-sizes 250 500")
    if instances < 1:
        raise NeedlesError(f"instances {instances} is not positive", fix="use at least 1 (--instances)")
    if seed < 0:
        raise NeedlesError(f"seed {seed} is negative", fix="use a seed of 0 or more (--seed)")
    rows, gid = [], 0
    for dataset, make in _MAKERS.items():
        for sample_id in range(instances):
            label = sample_id % 2 == 0  # balanced labels
            base = make(sample_id, label)
            for size in ctx_sizes:
                for padding in PADDING_TYPES:
                    for dispersion in DISPERSIONS:
                        rng = random.Random(f"{seed}:{gid}")
                        pad = _padding(padding, base["facts"], int(size * 0.7), rng)
                        rows.append(
                            {
                                "global_sample_id": gid,
                                "sample_id": sample_id,
                                "label": str(label),
                                "dataset": dataset,
                                "facts": base["facts"],
                                "rule": base["rule"],
                                "statement": base["statement"],
                                "assertion/question": base["assertion/question"],
                                "mixin": _mixin(base["facts"], pad, dispersion, rng),
                                "padding_type": padding,
                                "dispersion": dispersion,
                                "ctx_size": size,
                            }
                        )
                        gid += 1
    return rows


def write_fixture(out: Path, ctx_sizes: tuple[int, ...] = (250, 500, 1000), instances: int = 4, seed: int = 0) -> Path:
    """Write the fixture mirror (``out/<FLENQA_FILE>`` + marker); returns the parquet path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = build_rows(ctx_sizes, instances, seed)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({b"needles_fixture": LABEL.encode()})
    path = out / FLENQA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    marker = {
        "kind": "fixture",
        "label": LABEL,
        "seed": seed,
        "ctx_sizes": list(ctx_sizes),
        "instances": instances,
        "rows": len(rows),
        "built_by": "needles data flenqa-fixture",
    }
    (out / FIXTURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return path
