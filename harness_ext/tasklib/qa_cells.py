"""Training data for the study's other two tasks: the ``musique`` and ``summhay`` data families and their cells.

The generator interface of :mod:`harness_ext.tasklib.synth_mdqa`: a spec (:class:`QASpec`) -> :func:`generate`
(rows + their SHA-256s, cached with :data:`GENERATOR_VERSION` in the key). Cells (:data:`CELLS`):

* ``real``: the real-data baseline, built by the scored task's own row builder
  (:func:`harness_ext.tasklib.musique.build_rows`, :func:`harness_ext.tasklib.summhay.build_rows`) from data that
  is never scored: MuSiQue's *train* file (the task scores the dev file), and the SummHay haystacks the evaluation
  does not score (``haystacks``; by default every haystack outside the evaluation's ``summhay_haystacks``).
* ``symbolic``, ``templated``: synthetic needles (:mod:`harness_ext.tasklib.qa_cells_draw`): multi-hop chains for
  MuSiQue, facts to cite for SummHay.

Every row has the scored task's prompt (its template and renderer), exact token length (the evaluated model's
tokenizer, :func:`harness_ext.tasklib.haystack_fit.fit_haystack`) and placements, and a ``target``: the reply the
model is trained to give (MuSiQue the answer, SummHay the bracketed IDs). Sample ``i`` draws from
``random.Random("qa:<family>:<cell>:<split>:<seed>:<i>")``; rows are sample-major, then length, then placement.

:func:`check_overlap` is the family's part of the finetune leakage check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import tokenizer_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256
from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_TRAIN, SUMMHAY, SUMMHAY_HAYSTACKS, summhay_path
from harness_ext.data.sources import alias_mark, fetch
from harness_ext.tasklib import musique, summhay
from harness_ext.tasklib.haystack_fit import PLACEMENTS, fit_haystack
from harness_ext.tasklib.qa_cells_draw import (
    Draw,
    DrawFn,
    musique_symbolic,
    musique_templated,
    summhay_symbolic,
    summhay_templated,
)
from harness_ext.tasklib.real_baseline import question_hash

GENERATOR_VERSION = 2  # part of the cache key: bump whenever a cell's rows change for the same spec
FAMILIES = ("musique", "summhay")
TASKS = {"musique": "musique", "summhay": "summhay_citation"}  # the lm-eval task each family's rows look like
SPLITS = ("train", "eval")
MIN_LENGTH = 128


@dataclass(frozen=True)
class QACell:
    name: str
    concept: str
    summary: str
    draw: DrawFn | None  # None: the real-data baseline


CELLS: dict[str, dict[str, QACell]] = {
    "musique": {
        "real": QACell("real", "real", "MuSiQue train questions (never scored), padded as the task pads", None),
        "symbolic": QACell(
            "symbolic",
            "symbolic",
            "chained key-value records: key A -> key B -> value (hops lookups)",
            musique_symbolic,
        ),
        "templated": QACell(
            "templated",
            "templated",
            "a chain of templated facts about invented entities, composed question",
            musique_templated,
        ),
    },
    "summhay": {
        "real": QACell("real", "real", "insights of SummHay haystacks the evaluation does not score", None),
        "symbolic": QACell(
            "symbolic",
            "symbolic",
            "cite the records that state 'key K has value V' (lures share the key)",
            summhay_symbolic,
        ),
        "templated": QACell(
            "templated",
            "templated",
            "cite the articles that state a templated fact (lures share the entity)",
            summhay_templated,
        ),
    },
}


@dataclass(frozen=True)
class QASpec:
    """Everything (besides data files and tokenizer) that determines a training set's bytes."""

    family: str
    cell: str
    num_samples: int = 64
    seed: int = 0
    lengths: tuple[int, ...] = (1024,)
    placements: tuple[str, ...] = PLACEMENTS
    hops: tuple[int, ...] = (2,)  # MuSiQue synthetic: hop count of sample i is hops[i % len(hops)]
    num_gold: int = 2  # SummHay: documents that state the fact
    haystacks: tuple[str, ...] | None = None  # SummHay real: default every haystack the evaluation does not score
    split: str = "train"

    def validate(self) -> None:
        def bad(problem: str, fix: str) -> None:
            raise NeedlesError(f"{self.family} training data: {problem}", fix=fix)

        if self.family not in CELLS:
            bad(f"unknown family {self.family!r}", f"use one of {', '.join(CELLS)}")
        if self.cell not in CELLS[self.family]:
            bad(f"unknown cell {self.cell!r}", f"use one of {', '.join(CELLS[self.family])}")
        if self.split not in SPLITS:
            bad(f"unknown split {self.split!r}", f"use one of {SPLITS}")
        if not 1 <= self.num_samples <= 100_000:
            bad(f"num_samples={self.num_samples}", "use 1..100000 samples")
        if not self.lengths or min(self.lengths) < MIN_LENGTH:
            bad(f"lengths={list(self.lengths)}", f"use token targets of at least {MIN_LENGTH}, e.g. [1024]")
        if not self.placements or set(self.placements) - set(PLACEMENTS):
            bad(f"placements={list(self.placements)}", f"use some of {list(PLACEMENTS)}")
        if not self.hops or any(h not in (2, 3, 4) for h in self.hops):
            bad(f"hops={list(self.hops)}", "use hop counts of 2, 3 or 4 (MuSiQue's)")
        if not 1 <= self.num_gold <= 10:
            bad(f"num_gold={self.num_gold}", "use 1..10 documents")
        if self.haystacks is not None and (not self.haystacks or set(self.haystacks) - set(SUMMHAY_HAYSTACKS)):
            bad(f"haystacks={self.haystacks}", f"use some of {list(SUMMHAY_HAYSTACKS)}")


# ---------------------------------------------------------------------------------- synthetic rows
def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()


def _layout(units: list) -> list[str]:
    return [u.uid + ("*" if u.key else "") + (f"[:{u.words}w]" if u.words else "") for u in units]


def _synthetic_rows(spec: QASpec, tokenizer) -> list[dict]:
    cell = CELLS[spec.family][spec.cell]
    pool = max(spec.lengths) // 24 + 8  # fillers are >= 24 tokens, so the pool always outgrows the target
    out = []
    for i in range(spec.num_samples):
        rng = random.Random(f"qa:{spec.family}:{spec.cell}:{spec.split}:{spec.seed}:{i}")
        draw: Draw = cell.draw(rng, i, pool, spec.hops[i % len(spec.hops)], spec.num_gold)
        if spec.family == "musique":
            render = functools.partial(musique.render, draw.question)
        else:
            salt = f"{spec.cell}:{spec.split}:{spec.seed}:{i}"
            render = functools.partial(summhay.render, draw.question, draw.kind, salt)
        what = f"{spec.family} {spec.cell} sample {i}"
        for length in spec.lengths:
            got = fit_haystack(draw.keys, draw.pool, spec.placements, length, render, tokenizer, what)
            for placement in spec.placements:
                units = got.layouts[placement]
                keys = [n for n, u in enumerate(units, start=1) if u.key]
                doc = {"sample": i, "target_tokens": length, "placement": placement, "n_tokens": got.tokens[placement]}
                doc |= {"layout": _layout(units), "prompt": got.prompts[placement]}
                if spec.family == "musique":
                    last = next(n for n, u in enumerate(units, start=1) if u.uid == draw.last_hop)
                    doc |= {"id": f"{spec.cell}-{spec.split}-{spec.seed}-{i}", "question": draw.question}
                    doc |= {"answers": draw.answers, "hops": draw.hops, "num_paragraphs": len(units)}
                    doc |= {"supporting_positions": keys, "last_hop_position": last, "target": draw.answers[0]}
                    doc["doc_sha256"] = _sha(doc["prompt"], doc["answers"])
                else:
                    doc |= {"haystack": None, "insight_id": f"{spec.cell}-{spec.split}-{spec.seed}-{i}"}
                    ids = summhay.document_ids(units, salt)
                    gold = [ids[u.uid] for u in units if u.key]
                    doc |= {"insight": draw.question, "gold_ids": gold, "gold_positions": keys}
                    doc |= {"num_documents": len(units), "target": "".join(f"[{n}]" for n in gold)}
                    doc["doc_sha256"] = _sha(doc["prompt"], doc["gold_ids"])
                out.append(doc)
    return out


# ---------------------------------------------------------------------------------- real-data rows
def train_haystacks(spec: QASpec, metadata: Mapping[str, object]) -> tuple[str, ...]:
    """The SummHay haystacks the real cell trains on: ``haystacks``, else every one the evaluation does not score."""
    if spec.haystacks is not None:
        return spec.haystacks
    scored = summhay.spec_from_metadata({k: v for k, v in metadata.items() if k.startswith("summhay_")}).haystacks
    left = tuple(h for h in SUMMHAY_HAYSTACKS if h not in scored)
    if not left:
        raise NeedlesError(
            "the summhay real-data baseline has no held-out haystack: the evaluation scores all ten",
            fix='score fewer haystacks (e.g. --metadata \'{"summhay_haystacks": ["news1", "news2", "news3", "news4", '
            '"conv1", "conv2", "conv3", "conv4"]}\') or set data.haystacks to haystacks you do not score',
        )
    return left


def _real_files(spec: QASpec, metadata: dict) -> dict:
    if spec.family == "musique":
        return {MUSIQUE_TRAIN: fetch(MUSIQUE, MUSIQUE_TRAIN, metadata)}
    return {summhay_path(h): fetch(SUMMHAY, summhay_path(h), metadata) for h in train_haystacks(spec, metadata)}


def _real_rows(spec: QASpec, files: dict, tokenizer) -> list[dict]:
    if spec.family == "musique":
        got = files[MUSIQUE_TRAIN]
        rows = musique.read_rows(str(got.path), got.sha256)
        mspec = musique.MusiqueSpec(spec.lengths, spec.placements, spec.num_samples, spec.seed)
        return [
            {**d, "target": d["answers"][0]} for d in add_last_hop(musique.build_rows(mspec, rows, tokenizer), rows)
        ]
    topics = {h: summhay.read_topic(str(g.path), g.sha256) for h, g in zip(_names(files), files.values())}
    sspec = summhay.SummhaySpec(
        spec.lengths, spec.placements, spec.num_samples, spec.num_gold, tuple(topics), spec.seed
    )
    return summhay.build_rows(sspec, topics, tokenizer)


def add_last_hop(built: list[dict], rows: tuple[dict, ...]) -> list[dict]:
    """MuSiQue task rows with ``last_hop_position``: the 1-based paragraph that states the answer (the supporting
    paragraph of the decomposition's last step; None when the file does not say)."""
    by_id = {r["id"]: r for r in rows}
    for doc in built:
        steps = by_id[doc["id"]].get("question_decomposition") or [{}]
        uid = f"{doc['id']}:{steps[-1].get('paragraph_support_idx')}*"
        doc["last_hop_position"] = next((n for n, u in enumerate(doc["layout"], 1) if u == uid), None)
    return built


def _names(files: dict) -> list[str]:
    return [next(h for h in SUMMHAY_HAYSTACKS if summhay_path(h) == rel) for rel in files]


# ---------------------------------------------------------------------------------- generation
def generate(spec: QASpec, metadata: Mapping[str, object] | None = None) -> tuple[list[dict], dict]:
    """(rows, info) for ``spec`` from the dataset cache or built; ``metadata`` names the tokenizer
    (``pretrained``) and where real data live (mirrors, ``allow_unofficial_data``, the scored ``summhay_haystacks``)."""
    metadata = dict(metadata or {})
    spec.validate()
    fingerprint = tokenizer_fingerprint(metadata)
    if fingerprint is None:
        raise NeedlesError(
            f"{spec.family} training data are sized in the model's tokens and need its tokenizer",
            fix="pass the model (needles finetune --model ...; metadata pretrained=...)",
        )
    real = CELLS[spec.family][spec.cell].draw is None
    files = _real_files(spec, metadata) if real else {}
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": {rel: g.sha256 for rel, g in files.items()},
        "tokenizer": fingerprint,
    }

    def build() -> list[dict]:
        tokenizer = tokenizer_from_metadata(metadata)
        rows = _real_rows(spec, files, tokenizer) if real else _synthetic_rows(spec, tokenizer)
        return [{"family": spec.family, "cell": spec.cell, "split": spec.split, **r} for r in rows]

    rows, path, _hit = cached_rows("qa_cells", payload, build)
    official = all(g.official for g in files.values())
    marks = sorted({alias_mark(g.label) for g in files.values() if not g.official})
    info = {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": str(path),
        "needles_data_files": payload["files"],
        "needles_data_official": official,
        "needles_qa_cell": f"{spec.family}:{spec.cell}",
        "needles_qa_spec": asdict(spec),
        "needles_alias_marks": marks,
    }
    return rows, info


def training_examples(spec: QASpec, metadata: Mapping[str, object] | None = None) -> list[dict]:
    """``{"prompt", "completion"}`` pairs of ``spec`` (the scored task's prompt text)."""
    rows, _info = generate(spec, metadata)
    return [{"prompt": r["prompt"], "completion": " " + r["target"]} for r in rows]


# ---------------------------------------------------------------------------------- leakage
def check_overlap(train: list[dict], eval_docs: list[dict], task: str) -> int:
    """Refuse SummHay training rows that cite an evaluation insight or come from a scored haystack; returns the
    number of evaluation insights compared. (Questions are compared by the caller, by question hash.)"""
    scored = [d for d in eval_docs if isinstance(d.get("insight"), str)]
    if not scored:
        return 0
    insights = {question_hash(d["insight"]) for d in scored}
    leaked = insights & {question_hash(d["insight"]) for d in train if isinstance(d.get("insight"), str)}
    if leaked:
        raise NeedlesError(
            f"evaluation set {task}: {len(leaked)} of its {len(insights)} insights also occur in the training set",
            fix="train the summhay real cell on haystacks the evaluation does not score (data.haystacks)",
        )
    shared = {d.get("haystack") for d in scored} & {d.get("haystack") for d in train if d.get("haystack")}
    if shared:
        raise NeedlesError(
            f"evaluation set {task} scores haystack(s) {sorted(shared)} that the training set's documents come from",
            fix="leave them out of data.haystacks, or out of the evaluation's summhay_haystacks",
        )
    return len(insights)


def describe() -> list[dict]:
    """Every cell of both families with its concept and summary (``needles data list families``)."""
    return [
        {"family": family, "cell": c.name, "concept": c.concept, "summary": c.summary, "task": TASKS[family]}
        for family, cells in CELLS.items()
        for c in cells.values()
    ]
