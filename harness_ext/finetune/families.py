"""Training-data families of ``needles finetune``: ``kv`` (the default) and the synthetic MDQA grid.

``data: {family: kv, ...}`` (or no ``family``) is the KV generator of the ``kv_retrieval`` tasks
(:func:`harness_ext.finetune.data.train_spec`). ``data: {family: synth_mdqa, cell: CELL, ...}`` trains
on the *train* split of a cell of :mod:`harness_ext.tasklib.synth_mdqa` (``cell: real`` is the
real-data baseline): the same generator, cache, LitM prompt and documents as the lm-eval tasks
``synth_mdqa_<cell>``, which score the *eval* split. The keys are :class:`SynthSpec`'s fields (the
knobs ``synth_<key>`` of the tasks' ``--metadata``); ``num_samples`` defaults to
:data:`TRAIN_NUM_SAMPLES` and every sample is rendered at each gold position (and length).
``data: {family: musique | summhay, cell: real | symbolic | templated, ...}`` trains on a cell of
:mod:`harness_ext.tasklib.qa_cells` (the keys are :class:`QASpec`'s fields): the scored task's prompt and
exact lengths, multi-hop chains or facts to cite, or the real-data baseline from data that is never scored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import DATA_FAMILIES

SYNTH_FAMILY = "synth_mdqa"
QA_FAMILIES = ("musique", "summhay")  # harness_ext.tasklib.qa_cells
TRAIN_SPLIT = "train"
TRAIN_NUM_SAMPLES = 350  # as the KV family's default documents per length
_LIST_KEYS = ("positions", "lengths")
_BOOL_KEYS = ("reference_needles",)
_QA_LIST_KEYS = {"lengths": int, "placements": str, "hops": int, "haystacks": str}
# the trained reply of a synth_mdqa row: its first answer (what the metric looks for), or the sentence of the gold
# document that holds an answer (the restating reply form the base model writes; docs/study.md "Diagnosis")
TARGET_FORMS = ("answer", "sentence")


def data_family(data: dict) -> str:
    """The family of a ``data`` mapping (``kv`` when not given)."""
    family = data.get("family", "kv") if isinstance(data, dict) else "kv"
    if family not in DATA_FAMILIES:
        raise NeedlesError(
            f"unknown data family {family!r} (data.family, --data-family)",
            fix=f"use one of {', '.join(DATA_FAMILIES)} (`needles data list families` shows them)",
        )
    return family


def synth_keys() -> list[str]:
    """The ``data`` keys of the synth_mdqa family (besides ``family``): SynthSpec's fields but the split, and the
    trained reply's form (``target``)."""
    from harness_ext.tasklib.synth_mdqa import SynthSpec

    return [f.name for f in dataclasses.fields(SynthSpec) if f.name != "split"] + ["target"]


def kv_keys_fix(unknown: list[str], known: list[str]) -> str:
    """The fix for data keys the KV family does not know: say when they belong to the synth family."""
    theirs = [k for k in unknown if k in synth_keys()]
    if theirs:
        return f"{theirs} are keys of --data-family {SYNTH_FAMILY} (data.family); the kv family uses {known}"
    return f"use keys among {known}"


@dataclass
class SynthTrainSpec:
    """The training set of a synth_mdqa cell: its SynthSpec (train split) and, once generated, its data facts."""

    synth: Any  # harness_ext.tasklib.synth_mdqa.SynthSpec, split "train"
    family: str = SYNTH_FAMILY
    info: dict = field(default_factory=dict)  # dataset SHA-256 and data files, filled by synth_train_docs
    target: str = "answer"  # TARGET_FORMS (synth_mdqa only)

    @property
    def seed(self) -> int:
        return self.synth.seed

    def to_json(self) -> dict:
        # the default form is left out, so specs written before the option keep their JSON (and run folders resume)
        form = {"target": self.target} if self.target != "answer" else {}
        return {"family": self.family, **form, **dataclasses.asdict(self.synth)}

    def manifest_fields(self) -> dict:
        """What the finetune manifest records besides the spec: family, cell, split and the data's hashes."""
        return {
            "family": self.family,
            "cell": self.synth.cell,
            "split": self.synth.split,
            "dataset_sha256": self.info.get("needles_data_sha256"),
            "data_files": self.info.get("needles_data_files"),
            "data_official": self.info.get("needles_data_official"),
            **(
                {"target": self.target, "answer_fallbacks": self.info.get("answer_fallbacks")}
                if self.target != "answer"
                else {}
            ),
        }


def manifest_fields(spec: Any) -> dict:
    """The family facts of a training spec for the manifest's ``data`` (a KVSpec: just ``family: kv``)."""
    return spec.manifest_fields() if hasattr(spec, "manifest_fields") else {"family": "kv"}


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NeedlesError(f"data.{key}={value!r} is not a whole number", fix=f"write e.g. {key}: 10")
    return value


def qa_keys() -> list[str]:
    """The ``data`` keys of the musique and summhay families (besides ``family``): QASpec's fields but the split."""
    from harness_ext.tasklib.qa_cells import QASpec

    return [f.name for f in dataclasses.fields(QASpec) if f.name not in ("family", "split")]


def qa_train_spec(data: dict) -> SynthTrainSpec:
    """The validated training spec of ``data: {family: musique | summhay, cell: ..., ...}`` (unknown keys refused)."""
    from harness_ext.tasklib.qa_cells import CELLS, QASpec

    family = data["family"]
    cell = _checked_cell(data, family, qa_keys(), CELLS[family])
    kwargs: dict = {"family": family, "cell": cell}
    for key, value in data.items():
        if key in ("family", "cell") or value is None:
            continue
        kind = _QA_LIST_KEYS.get(key)
        if kind is None:
            kwargs[key] = _int(key, value)
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if kind is int:
            kwargs[key] = tuple(_int(key, v) for v in values)
        elif all(isinstance(v, str) for v in values):
            kwargs[key] = tuple(values)
        else:
            raise NeedlesError(f"data.{key}={value!r} is not a list of names", fix=f"write e.g. {key}: [early, late]")
    spec = QASpec(**kwargs, split=TRAIN_SPLIT)
    spec.validate()
    return SynthTrainSpec(spec, family=family)


def _checked_cell(data: dict, family: str, keys: list[str], cells, hint: str = "") -> str:
    """``data.cell`` of a non-KV family, after refusing keys the family does not take."""
    unknown = sorted(set(data) - set(keys) - {"family"})
    if unknown:
        raise NeedlesError(
            f"data key(s) {unknown} do not apply to the {family} family", fix=f"use keys among {keys}{hint}"
        )
    cell = data.get("cell")
    if cell not in cells:
        raise NeedlesError(
            f"data.cell={cell!r} is not a {family} cell (set by --data-cell)",
            fix=f"use one of {', '.join(cells)} (`needles data list families` describes them)",
        )
    return cell


def synth_train_spec(data: dict) -> SynthTrainSpec:
    """The validated training spec of a non-KV family (``data: {family: synth_mdqa, cell: ..., ...}``, or a
    :data:`QA_FAMILIES` one); unknown keys refused."""
    from harness_ext.tasklib.synth_mdqa import CELLS, SynthSpec

    if data.get("family") in QA_FAMILIES:
        return qa_train_spec(data)

    cell = _checked_cell(data, SYNTH_FAMILY, synth_keys(), CELLS, " (drop the kv family's keys, e.g. variant)")
    target = data.get("target") or "answer"
    if target not in TARGET_FORMS:
        raise NeedlesError(
            f"data.target={target!r} is not a target form of the {SYNTH_FAMILY} family (--data-target)",
            fix=f"use one of {', '.join(TARGET_FORMS)}",
        )
    kwargs: dict = {"cell": cell, "num_samples": TRAIN_NUM_SAMPLES}
    for key, value in data.items():
        if key in ("family", "cell", "target") or value is None:
            continue
        if key in _BOOL_KEYS:
            kwargs[key] = bool(value)
        elif key in _LIST_KEYS:
            values = value if isinstance(value, (list, tuple)) else [value]
            kwargs[key] = tuple(_int(key, v) for v in values)
        else:
            kwargs[key] = _int(key, value)
    spec = SynthSpec(**kwargs, split=TRAIN_SPLIT)
    spec.validate()
    return SynthTrainSpec(spec, target=target)


def data_metadata(eval_metadata: dict, pretrained: str) -> dict:
    """Where the training data are read from: the evaluation's data sources (mirrors) and the model's tokenizer."""
    return {**{k: v for k, v in eval_metadata.items() if not k.startswith("synth_")}, "pretrained": pretrained}


def answer_sentence(gold_span: str, answers: list[str]) -> str | None:
    """The first sentence of the gold document's text that holds an answer (as the metric matches it: normalised,
    so a reply that copies it is credited), on one line; None when no sentence does (an answer cut by a split)."""
    from harness_ext.tasklib.metrics import best_subspan_em
    from harness_ext.tasklib.synth_corpus import sentences

    for sentence in sentences(gold_span):
        if best_subspan_em(sentence, answers):
            return sentence
    return None


def _targets(rows: list[dict], form: str, info: dict) -> list[dict]:
    """Rows with their trained reply: the first answer, or (``sentence``) the gold document's answer sentence, the
    first answer where none holds one (counted in ``info["answer_fallbacks"]``)."""
    if form == "answer":
        return [{**r, "target": r["answers"][0]} for r in rows]
    sentences = [answer_sentence(r["gold_span"], r["answers"]) for r in rows]
    info["answer_fallbacks"] = sum(s is None for s in sentences)
    return [{**r, "target": s or r["answers"][0]} for r, s in zip(rows, sentences, strict=True)]


def synth_train_docs(spec: SynthTrainSpec, eval_metadata: dict, pretrained: str) -> list[dict]:
    """The training rows of ``spec`` (cached like the tasks' rows), each with its ``target`` (:func:`_targets`)."""
    if spec.family in QA_FAMILIES:  # their rows carry the trained reply (SummHay: the bracketed IDs)
        from harness_ext.tasklib.qa_cells import generate as generate_qa

        rows, spec.info = generate_qa(spec.synth, data_metadata(eval_metadata, pretrained))
        return rows
    from harness_ext.tasklib.synth_mdqa import generate

    rows, info = generate(spec.synth, data_metadata(eval_metadata, pretrained))
    spec.info = info
    return _targets(rows, spec.target, spec.info)


# ---------------------------------------------------------------------------------- the table of families
def _flag_of(key: str) -> str:
    from harness_ext.finetune.config import DataOptions, flag_names

    names = [max(flag_names(f), key=len) for f in dataclasses.fields(DataOptions) if f.name == key]
    return names[0] if names else "-"


def describe_families() -> list[dict]:
    """Every family and cell with what a user picks it by: the lm-eval task(s), the finetune ``data`` and
    the ``--probes`` name, its axes, and its knobs (data key, flag, ``--metadata`` key, defaults, cells)."""
    from harness_ext.finetune.config import default_data
    from harness_ext.finetune.leakage import expand_family_tasks, task_config
    from harness_ext.tasklib.kv_generator import KVSpec
    from harness_ext.tasklib.synth_mdqa import CELLS, SynthSpec

    kv_eval = task_config("kv_retrieval_simple")[1].get("metadata") or {}
    kv_train = {**{f.name: f.default for f in dataclasses.fields(KVSpec)}, "depths": None, **default_data()}
    kv_keys = ("variant", "answer_template", "num_samples", "seed", "lengths", "num_dicts", "depths")
    kv_knobs = [
        {
            "key": k,
            "flag": _flag_of(k),
            "metadata": k if k in kv_eval or k == "num_dicts" else "(task choice)",
            "train_default": kv_train.get(k),
            "eval_default": kv_eval.get(k, "-"),
            "cells": ["kv"],
        }
        for k in kv_keys
    ]
    rows = [
        {
            "family": "kv",
            "cell": None,  # one generator, no cells
            "concept": "symbolic",
            "diversity": "low",
            "summary": "dictionaries of numeric key-value pairs (Lost in the Middle KV retrieval); asks one key's value",
            "tasks": expand_family_tasks(["kv_retrieval"]),
            "data": {"family": "kv"},
            "probe": "kv",
            "knobs": kv_knobs,
        }
    ]
    defaults = {f.name: f.default for f in dataclasses.fields(SynthSpec)}
    for name, cell in CELLS.items():
        knobs = []
        for meta_key in cell.knobs:
            key = meta_key.removeprefix("synth_")
            train = TRAIN_NUM_SAMPLES if key == "num_samples" else defaults[key]
            users = [c for c, other in CELLS.items() if meta_key in other.knobs]
            knobs.append(
                {
                    "key": key,
                    "flag": _flag_of(key),
                    "metadata": meta_key,
                    "train_default": train,
                    "eval_default": defaults[key],
                    "cells": users,
                }
            )
        rows.append(
            {
                "family": SYNTH_FAMILY,
                "cell": name,
                "concept": cell.concept,
                "diversity": cell.diversity,
                "summary": cell.summary,
                "tasks": [f"synth_mdqa_{name}"],
                "data": {"family": SYNTH_FAMILY, "cell": name},
                "probe": f"synth_mdqa:{name}",
                "knobs": knobs,
            }
        )
    return rows + _describe_qa()


def _describe_qa() -> list[dict]:
    """The musique and summhay cells: training data only (they score on the task itself)."""
    from harness_ext.tasklib.qa_cells import CELLS, TASKS, QASpec, describe

    defaults = {f.name: f.default for f in dataclasses.fields(QASpec)}
    only = {"hops": "musique", "num_gold": "summhay", "haystacks": "summhay"}
    rows = []
    for d in describe():
        family, cells = d["family"], list(CELLS[d["family"]])
        knobs = [
            {"key": k, "flag": _flag_of(k), "metadata": "-", "train_default": defaults[k], "eval_default": "-"}
            | {"cells": cells if k != "haystacks" else ["real"]}
            for k in qa_keys()
            if k != "cell" and only.get(k, family) == family
        ]
        diversity = "real" if d["cell"] == "real" else "low"
        rows.append(
            {
                "family": family,
                "cell": d["cell"],
                "concept": d["concept"],
                "diversity": diversity,
                "summary": d["summary"],
                "tasks": [TASKS[family]],
                "data": {"family": family, "cell": d["cell"]},
                "probe": family,
                "knobs": knobs,
            }
        )
    return rows
