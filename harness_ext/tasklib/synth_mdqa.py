"""Synthetic MDQA-shaped data along two axes (Zhao, Yin & Durrett, ICML 2025), and the real-data baseline.

Axes: *needle concept* (symbolic, templated, natural) x *haystack diversity* (low: generated documents;
high: real Wikipedia passages of the Lost-in-the-Middle oracle file). Cells (:data:`CELLS`):
``symbolic_kv``, ``templated_entities``, ``templated_in_prose``, ``natural_in_prose``, plus ``real``
(:mod:`harness_ext.tasklib.real_baseline`). Every cell yields the same document schema, rendered with
the LitM ``qa`` prompt (:func:`harness_ext.tasklib.mdqa.render_prompt`), so scores compare with mdqa20.

One interface: :class:`SynthSpec` -> :func:`generate` (rows + dataset SHA-256, cached by
``cached_rows`` with :data:`GENERATOR_VERSION` in the key). Sample ``i`` draws from
``numpy.random.default_rng([seed, cell, split, i])`` (PCG64), once, with a distractor pool large enough
for every target length; it is then rendered at every (length, gold position), rows ordered
sample-major, so positions and lengths are paired and ``--limit`` counts rows.

Length: without ``lengths`` every prompt has ``num_documents`` documents. With ``lengths`` (tokens of
the evaluated model's tokenizer, special tokens included) a sample gets the largest number of
documents whose prompt fits the target at every requested position: the prompt is at most the target
and one more document would exceed it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import datasets
import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_int, as_ints, truthy
from harness_ext.core.tokenizers import tokenizer_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256
from harness_ext.data.sources import alias_mark
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.mdqa import ORACLE_FILE
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.metrics import best_subspan_em
from harness_ext.tasklib.niah_haystack import load_reference_needles
from harness_ext.tasklib.real_baseline import real_sample
from harness_ext.tasklib.synth_cells import (
    DrawContext,
    DrawFn,
    NaturalFact,
    natural_in_prose,
    natural_pool,
    symbolic_kv,
    templated_entities,
    templated_in_prose,
)
from harness_ext.tasklib.synth_corpus import SPLITS, Corpus, Sample, arrange, fit_documents, load_corpus, prompt_of

GENERATOR_VERSION = 1  # part of the cache key: bump whenever any cell, template or natural fact changes its output
MIN_LENGTH = 64
_TOKENS_PER_DOC_FLOOR = 20  # first distractor pool for a length target: target / 20 documents, doubled if short
_MAX_POOL_DOUBLINGS = 4


@dataclass(frozen=True)
class Cell:
    name: str
    cell_id: int  # part of the random seed: never reuse or renumber
    concept: str
    diversity: str
    summary: str
    knobs: tuple[str, ...]
    draw: DrawFn


_COMMON_KNOBS = ("synth_num_documents", "synth_positions", "synth_num_samples", "synth_seed", "synth_lengths")
CELLS: dict[str, Cell] = {
    c.name: c
    for c in (
        Cell(
            "symbolic_kv",
            1,
            "symbolic",
            "low",
            "records of UUID 'key K: value V' pairs; the question asks for one key's value",
            _COMMON_KNOBS + ("synth_facts_per_document",),
            symbolic_kv,
        ),
        Cell(
            "templated_entities",
            2,
            "templated",
            "low",
            "templated facts about invented entities; every distractor states the asked relation of another entity",
            _COMMON_KNOBS + ("synth_facts_per_document",),
            templated_entities,
        ),
        Cell(
            "templated_in_prose",
            3,
            "templated",
            "high",
            "one templated fact about an invented entity inside a real Wikipedia passage; real passages as distractors",
            _COMMON_KNOBS,
            templated_in_prose,
        ),
        Cell(
            "natural_in_prose",
            4,
            "natural",
            "high",
            "a natural-language needle (NIAH style) inside a real Wikipedia passage; real passages as distractors",
            _COMMON_KNOBS + ("synth_reference_needles",),
            natural_in_prose,
        ),
        Cell(
            "real",
            5,
            "real",
            "real",
            "NQ-Open question, its real gold passage, answer-free real passages as distractors (held-out split)",
            _COMMON_KNOBS,
            real_sample,
        ),
    )
}
_SPLIT_ID = {"eval": 0, "train": 1}


@dataclass(frozen=True)
class SynthSpec:
    """Everything (besides data files and tokenizer) that determines a dataset's bytes."""

    cell: str
    num_documents: int = 10
    positions: tuple[int, ...] = (1, 5, 10)
    num_samples: int = 20
    seed: int = 0
    lengths: tuple[int, ...] | None = None
    facts_per_document: int = 3
    split: str = "eval"
    reference_needles: bool = False

    def validate(self) -> None:
        def bad(problem: str, fix: str) -> None:
            raise NeedlesError(f"synthetic MDQA spec: {problem}", fix=fix)

        if self.cell not in CELLS:
            bad(f"unknown cell {self.cell!r}", f"use one of {', '.join(CELLS)}")
        if self.split not in SPLITS:
            bad(f"unknown split {self.split!r}", f"use one of {SPLITS}")
        if not 1 <= self.num_documents <= 1000:
            bad(f"num_documents={self.num_documents}", "use 1..1000 documents")
        if not self.positions or any(p < 1 for p in self.positions):
            bad(f"positions={list(self.positions)}", "give 1-based gold positions, e.g. [1, 5, 10]")
        if self.lengths is None and max(self.positions) > self.num_documents:
            bad(f"positions={list(self.positions)} with {self.num_documents} documents", "use positions <= documents")
        if not 1 <= self.num_samples <= 100_000:
            bad(f"num_samples={self.num_samples}", "use 1..100000 samples")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < MIN_LENGTH):
            bad(f"lengths={list(self.lengths)}", f"use token targets of at least {MIN_LENGTH}")
        if not 1 <= self.facts_per_document <= 6:
            bad(f"facts_per_document={self.facts_per_document}", "use 1..6")


# ---------------------------------------------------------------------------------- rows
def _doc(spec: SynthSpec, i: int, sample: Sample, length: int | None, n: int, position: int, n_tokens) -> dict:
    ctxs = arrange(sample, n, position)
    prompt = prompt_of(sample.question, ctxs)
    doc = {
        "cell": spec.cell,
        "split": spec.split,
        "sample": i,
        "target_tokens": length,
        "n_tokens": n_tokens,
        "gold_position": position,
        "num_documents": n,
        "question": sample.question,
        "answers": list(sample.answers),
        "gold_span": sample.gold_span,
        "source": sample.source,
        "ctxs": ctxs,
        "prompt": prompt,
    }
    doc["doc_sha256"] = hashlib.sha256(json.dumps([prompt, doc["answers"], position]).encode()).hexdigest()
    return doc


# ---------------------------------------------------------------------------------- generation
def draw_sample(spec: SynthSpec, ctx: DrawContext, i: int, count: int) -> Sample:
    """Sample ``i`` of the spec with a pool of ``count`` distractors (same gold and prefix for any count)."""
    cell = CELLS[spec.cell]
    rng = np.random.default_rng([spec.seed, cell.cell_id, _SPLIT_ID[spec.split], i])
    return cell.draw(ctx, rng, i, count)


def context_for(spec: SynthSpec, corpus: Corpus, extra_needles: tuple[NaturalFact, ...] = ()) -> DrawContext:
    natural = natural_pool(corpus, spec.split, extra_needles) if spec.cell == "natural_in_prose" else ()
    return DrawContext(corpus, spec.split, spec.seed, spec.facts_per_document, natural)


def generate_rows(
    spec: SynthSpec, corpus: Corpus, tokenizer=None, extra_needles: tuple[NaturalFact, ...] = ()
) -> list[dict]:
    """All rows of ``spec``: sample-major, then length, then gold position."""
    spec.validate()
    if spec.lengths is not None and tokenizer is None:
        raise NeedlesError(
            "synthetic MDQA with synth_lengths needs the evaluated model's tokenizer",
            fix="pass --model_args pretrained=... (or tokenizer=...), or drop synth_lengths and set synth_num_documents",
        )
    ctx = context_for(spec, corpus, extra_needles)
    rows = []
    for i in range(spec.num_samples):
        if spec.lengths is None:
            sample = draw_sample(spec, ctx, i, spec.num_documents - 1)
            for p in spec.positions:
                rows.append(_doc(spec, i, sample, None, spec.num_documents, p, None))
            continue
        count = max(spec.lengths) // _TOKENS_PER_DOC_FLOOR + 2
        for _ in range(_MAX_POOL_DOUBLINGS + 1):
            sample = draw_sample(spec, ctx, i, count)
            fits = [fit_documents(sample, length, spec.positions, tokenizer) for length in spec.lengths]
            if all(n <= count + 1 for n, _ in fits):
                break
            count *= 2
        else:
            raise NeedlesError(
                f"sample {i} of {spec.cell}: {count} distractors do not fill {max(spec.lengths)} tokens",
                fix="use a shorter synth_lengths target",
            )
        for length, (n, counts) in zip(spec.lengths, fits):
            for p in spec.positions:
                rows.append(_doc(spec, i, sample, length, n, p, counts[p]))
    return rows


def generate(spec: SynthSpec, metadata: Mapping[str, object] | None = None) -> tuple[list[dict], dict]:
    """(rows, info) for ``spec``, from the dataset cache or built; info carries the data's SHA-256s."""
    metadata = dict(metadata or {})
    spec.validate()
    corpus = load_corpus(metadata)
    extra, files = (), {ORACLE_FILE: corpus.resolved.sha256 if corpus.resolved else None}
    if spec.reference_needles and spec.cell == "natural_in_prose":
        needles, got = load_reference_needles(metadata)
        extra = tuple(NaturalFact(n.needle, n.question, n.real_needle) for n in needles)
        files[got.relpath] = got.sha256
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": files,
        "tokenizer": tokenizer_fingerprint(metadata) if spec.lengths is not None else None,
    }

    def build() -> list[dict]:
        tok = tokenizer_from_metadata(metadata) if spec.lengths is not None else None
        return generate_rows(spec, corpus, tok, extra)

    rows, path, _hit = cached_rows("synth_mdqa", payload, build)
    official = corpus.resolved is None or corpus.resolved.official
    info = {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": str(path),
        "needles_data_files": files,
        "needles_data_official": official,
        "needles_synth_cell": spec.cell,
        "needles_synth_spec": asdict(spec),
        "needles_alias_marks": [] if official else [alias_mark(corpus.resolved.label)],
    }
    return rows, info


def training_examples(spec: SynthSpec, metadata: Mapping[str, object] | None = None) -> list[dict]:
    """``{"prompt", "completion"}`` pairs of the *train* split of ``spec`` (the same LitM prompt text)."""
    rows, _info = generate(replace(spec, split="train"), metadata)
    return [{"prompt": r["prompt"], "completion": " " + r["answers"][0]} for r in rows]


def describe(metadata: Mapping[str, object] | None = None) -> dict[str, dict]:
    """The grid: cell -> axes, knobs, summary and one short rendered example (3 documents, gold at 2)."""
    corpus = load_corpus(dict(metadata or {}))
    out = {}
    for name, cell in CELLS.items():
        spec = SynthSpec(name, num_documents=3, positions=(2,), num_samples=1, facts_per_document=2)
        row = generate_rows(spec, corpus)[0]
        out[name] = {
            "concept": cell.concept,
            "diversity": cell.diversity,
            "summary": cell.summary,
            "knobs": list(cell.knobs),
            "example": {"prompt": row["prompt"], "answers": row["answers"]},
        }
    return out


# ---------------------------------------------------------------------------------- --metadata
def spec_from_metadata(cell: str, metadata: Mapping[str, object]) -> SynthSpec:
    """A validated :class:`SynthSpec` from ``--metadata`` (unknown keys, wrong types and ranges refused)."""
    check_family_metadata("synth_mdqa", metadata, f"synth_mdqa_{cell}")
    kwargs: dict = {"cell": cell}
    if "synth_num_documents" in metadata:
        kwargs["num_documents"] = as_int("synth_num_documents", metadata["synth_num_documents"], 1, 1000, "10")
    if "synth_positions" in metadata:
        kwargs["positions"] = as_ints("synth_positions", metadata["synth_positions"], 1, 1000, "[1, 5, 10]")
    if "synth_num_samples" in metadata:
        kwargs["num_samples"] = as_int("synth_num_samples", metadata["synth_num_samples"], 1, 100_000, "20")
    if "synth_seed" in metadata:
        kwargs["seed"] = as_int("synth_seed", metadata["synth_seed"], 0, 2**32 - 1, "0")
    if metadata.get("synth_lengths") not in (None, [], "none"):
        kwargs["lengths"] = as_ints("synth_lengths", metadata["synth_lengths"], MIN_LENGTH, 10**7, "[1024, 2048]")
    if "synth_facts_per_document" in metadata:
        kwargs["facts_per_document"] = as_int(
            "synth_facts_per_document", metadata["synth_facts_per_document"], 1, 6, "3"
        )
    if "synth_reference_needles" in metadata:
        kwargs["reference_needles"] = truthy(metadata["synth_reference_needles"])
    spec = SynthSpec(**kwargs)
    spec.validate()
    return spec


# ---------------------------------------------------------------------------------- lm-eval
def synth_dataset(synth_task_cell: str, **metadata) -> datasets.DatasetDict:
    """One task's data (``synth_task_cell`` comes from the YAML's dataset_kwargs; the rest is metadata)."""
    spec = spec_from_metadata(synth_task_cell, metadata)
    rows, info = generate(spec, metadata)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = info
    return out


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    scores = {"best_subspan_em": best_subspan_em(results[0], doc["answers"])}
    suffixes = [key_suffix("length", doc["target_tokens"])] if doc.get("target_tokens") is not None else []
    suffixes.append(key_suffix("doc", doc["gold_position"]))
    return with_breakdowns(scores, suffixes)
