"""The natural-language needle-in-a-haystack family (Wu et al.'s retrieval-head data): datasets and scoring.

A *sample* is one (needle, haystack window) draw: needle ``i mod n`` of the needles in a seeded
order, and a window starting at a seeded sentence start of the book haystack
(:mod:`harness_ext.tasklib.niah_haystack`; the rows are built by
:mod:`harness_ext.tasklib.niah_generator`). Each sample is rendered at every target length (the
window grows from the same start) and, for each length, at every depth with the *same* window and
needle, so depth effects are paired. The window is a run of words for which the prompt at every
depth fits the target in the evaluated model's tokens while one more word would not (both by exact
counts: whole-prompt tokenization, or for byte-level tokenizers an exact sum of separately tokenized
parts, see :mod:`harness_ext.tasklib.niah_count`); the needle goes in at the sentence boundary
nearest to the requested depth (in tokens of the window).

Determinism: the needle order is SHA-256 based and window starts come from
``numpy.random.default_rng([seed, 7, sample])`` (PCG64), so equal metadata, data files and
tokenizer give byte-identical rows on every machine; they are cached and hashed per row.

Scores (Wu et al.): ``niah_success`` = ROUGE-1 recall of ``real_needle`` in the reply > 0.5, and
the recall itself as ``rouge1_recall``, with ``_len<L>``, ``_depth<D>`` and ``_len<L>_depth<D>`` breakdowns.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_choice, as_distinct_lengths, as_int, as_list, as_string, bad_value
from harness_ext.core.paths import templates_dir
from harness_ext.core.tokenizers import required_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256, file_sha256
from harness_ext.data.sources import alias_mark
from harness_ext.tasklib.metadata_keys import FAMILY_KEYS, check_family_metadata
from harness_ext.tasklib.metrics import niah_success, rouge1_recall
from harness_ext.tasklib.niah_generator import NiahGenerator
from harness_ext.tasklib.niah_haystack import (
    DEFAULT_TEMPLATE,
    HAYSTACK_MODES,
    SPLITS,
    NiahSpec,
    depth_label,
    load_haystack,
    load_reference_needles,
    needle_key,
    piece_stream,
    read_needles,
    select_needles,
)

GENERATOR_VERSION = 1
MIN_LENGTH = 128

NIAH_KEYS = FAMILY_KEYS["niah"]


# ---------------------------------------------------------------------------------- metadata


def parse_depths(value: object, key: str = "niah_depths") -> tuple[float, ...]:
    """Depths in 0..1, told apart to 2 decimals (the breakdown keys' precision); ``key`` names them in errors."""
    example = "[0.0, 0.25, 0.5, 0.75, 1.0]"
    out = []
    for d in as_list(key, value, example):
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise bad_value(key, value, "is not a list of numbers", example)
        if not 0.0 <= d <= 1.0:
            raise bad_value(key, value, "has a depth outside 0.0 (start) .. 1.0 (end)", example)
        out.append(float(d))
    labels = [depth_label(d) for d in out]
    if len(set(labels)) != len(labels):
        raise bad_value(key, value, "repeats a depth (depths are told apart to 2 decimals)", example)
    return tuple(out)


def _exclusions(value: object) -> tuple[str, ...]:
    key = "niah_exclude_needles"
    if isinstance(value, str):
        return tuple(sorted({needle_key(n.needle) for n in read_needles(value, f"--metadata {key}")}))
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(sorted({needle_key(v) for v in value}))
    raise bad_value(
        key, value, "is neither a needles .jsonl path nor a list of needle sentences", '"train_needles.jsonl"'
    )


def grid_from_metadata(family: str, metadata: dict) -> dict:
    """The given fields of a :class:`GridSpec` from ``<family>_lengths``, ``_depths``, ``_num_samples`` and
    ``_seed``, validated."""
    kw: dict = {}
    if f"{family}_lengths" in metadata:
        key = f"{family}_lengths"
        kw["lengths"] = as_distinct_lengths(key, metadata[key], MIN_LENGTH, 1 << 22, "[1024, 2048]")
    if f"{family}_depths" in metadata:
        kw["depths"] = parse_depths(metadata[f"{family}_depths"], f"{family}_depths")
    if f"{family}_num_samples" in metadata:
        kw["num_samples"] = as_int(f"{family}_num_samples", metadata[f"{family}_num_samples"], 1, 1_000_000, "20")
    if f"{family}_seed" in metadata:
        kw["seed"] = as_int(f"{family}_seed", metadata[f"{family}_seed"], 0, 2**63 - 1, "0")
    return kw


def spec_from_metadata(task: str, metadata: dict) -> NiahSpec:
    """The validated spec; unknown keys get ``did you mean``, wrong types and ranges a clear error."""
    check_family_metadata("niah", metadata, task)
    kw = grid_from_metadata("niah", metadata)
    if "niah_haystack" in metadata:
        kw["haystack"] = as_choice("niah_haystack", metadata["niah_haystack"], HAYSTACK_MODES)
    if metadata.get("niah_needles") is not None:
        kw["needles"] = as_string("niah_needles", metadata["niah_needles"], '"my_needles.jsonl"')
    if metadata.get("niah_exclude_needles") is not None:
        kw["exclude"] = _exclusions(metadata["niah_exclude_needles"])
    if "niah_split" in metadata:
        kw["split"] = as_choice("niah_split", metadata["niah_split"], SPLITS)
    if "niah_train_fraction" in metadata:
        v = metadata["niah_train_fraction"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise bad_value("niah_train_fraction", v, "is not a number strictly between 0 and 1", "0.5")
        kw["train_fraction"] = float(v)
    if metadata.get("niah_prompt_template") is not None:
        kw["prompt_template"] = as_string("niah_prompt_template", metadata["niah_prompt_template"], '"my_niah.jinja"')
    return NiahSpec(**kw)


# ---------------------------------------------------------------------------------- dataset
def _template_sha(spec: NiahSpec) -> str:
    path = Path(spec.prompt_template).expanduser() if spec.prompt_template else templates_dir() / DEFAULT_TEMPLATE
    if not path.is_file():
        raise NeedlesError(f"prompt template {path} does not exist", fix="pass an existing .jinja file")
    return file_sha256(path)


def niah_dataset(task: str, metadata: dict) -> datasets.DatasetDict:
    """One NIAH task's rows (cached) and the facts results must carry (``needles_info``)."""
    spec = spec_from_metadata(task, metadata)
    fingerprint = required_fingerprint(task, metadata)
    text, got = load_haystack(spec.haystack, metadata)
    if spec.needles is None:
        all_needles, needles_file = load_reference_needles(metadata)
        got.append(needles_file)
        needles_files = {needles_file.relpath: needles_file.sha256}
    else:
        all_needles = read_needles(spec.needles, "--metadata niah_needles")
        needles_files = {str(Path(spec.needles).expanduser().resolve()): file_sha256(Path(spec.needles).expanduser())}
    needles = select_needles(all_needles, spec.split, spec.train_fraction, set(spec.exclude), f"task {task}")
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": {**asdict(spec), "needles": sorted(needles_files.values())},
        "needles": [asdict(n) for n in needles],
        "haystack_files": {g.relpath: g.sha256 for g in got},
        "tokenizer": fingerprint,
        "template": _template_sha(spec),
    }

    def build() -> list[dict]:
        tok = tokenizer_from_metadata(metadata)
        return NiahGenerator(spec, needles, piece_stream(text, tok), tok).generate()

    rows, path, _hit = cached_rows("niah", payload, build)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = _info(spec, got, needles_files, len(needles), len(all_needles), rows, path)
    return out


def _info(spec: NiahSpec, got, needles_files: dict, n_used: int, n_all: int, rows: list[dict], path) -> dict:
    official = all(g.official for g in got)
    label = "; ".join(sorted({g.label for g in got}))
    marks = [] if official else [alias_mark(label)]
    if spec.needles is not None:
        marks.append("custom needles")
    if n_used != n_all:
        marks.append(f"{n_used} of {n_all} needles")
    if spec.haystack != "text":
        marks.append(f"{spec.haystack} haystack")
    if spec.prompt_template is not None:
        marks.append("custom prompt")
    return {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": str(path),
        "needles_data_official": official,
        "needles_data_label": label,
        "needles_data_files": {**{g.relpath: g.sha256 for g in got}, **needles_files},
        "needles_data_origin": sorted({g.origin for g in got}),
        "needles_niah_haystack": spec.haystack,
        "needles_niah_needles": "reference" if spec.needles is None else spec.needles,
        "needles_niah_num_needles": n_used,
        "needles_alias_marks": marks,
    }


# ---------------------------------------------------------------------------------- scoring
def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Wu et al.'s success rule and the ROUGE-1 recall, overall and per length / depth cell."""
    reply = results[0].strip()  # the reference scores the decoded reply, stripped
    recall = rouge1_recall(doc["real_needle"], reply)
    scores = {"niah_success": niah_success(doc["real_needle"], reply), "rouge1_recall": recall}
    length, depth = f"_len{doc['target_tokens']}", f"_depth{depth_label(doc['depth'])}"
    out = dict(scores)
    for suffix in (length, depth, length + depth):
        for metric, value in scores.items():
            out[f"{metric}{suffix}"] = value
    return out
