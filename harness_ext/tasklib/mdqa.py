"""lm-eval glue for multi-document QA (Lost in the Middle): data, prompts, scoring.

Data are the reference's official files (harness_ext.data.sources: verified download, cache or
mirror). A gold position without an official file is derived from ``gold_at_0`` of the same
setting by moving the gold passage and keeping the distractor order, which is how the reference
built its files.

Paired design: every task orders its questions by SHA-256 of ``"<mdqa_order_seed>\\0<question>"``.
lm-eval's ``--limit N`` takes the first N documents, so it selects the same N questions at every
position and in both baselines. ``mdqa_num_questions`` keeps the first N questions of that order.

Held-out split: :func:`question_split` assigns every NQ-Open question to ``train`` or ``eval`` by its hash
(the split the real-data baseline and the synthetic MDQA cells train on). ``mdqa_split: eval`` keeps only
eval-split questions (still in the paired order), so a model finetuned on the train split is scored on
questions it never saw; the finetune's leakage check verifies it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import truthy
from harness_ext.core.templating import load_template
from harness_ext.data.sources import LOST_IN_THE_MIDDLE, Resolved, alias_mark, fetch
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.metrics import best_subspan_em

ORACLE_FILE = "qa_data/nq-open-oracle.jsonl.gz"
# Official gold indices (0-based) per number of documents, as in the reference repository.
OFFICIAL_GOLD_INDICES = {10: (0, 4, 9), 20: (0, 4, 9, 14, 19), 30: (0,)}
PROMPTS = {
    "qa": "mdqa/qa.jinja",
    "query_aware": "mdqa/qa_with_query_aware_contextualization.jinja",
    "closedbook": "mdqa/closedbook_qa.jinja",
}
DEFAULT_SWEEP_POSITIONS = (1, 2, 5, 10, 15, 20)


def official_path(num_documents: int, gold_index: int) -> str:
    return (
        f"qa_data/{num_documents}_total_documents/nq-open-{num_documents}_total_documents_gold_at_{gold_index}.jsonl.gz"
    )


@lru_cache(maxsize=2)  # positions 1 and 2 both read gold_at_0: keep the last two files parsed
def _read_rows(path: str, sha256: str) -> tuple[dict, ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _int(metadata: dict, key: str, default: int | None) -> int | None:
    value = metadata.get(key, default)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NeedlesError(f"--metadata {key}={value!r} is not an integer", fix=f'e.g. "{key}": 20') from None


EVAL_BUCKETS = 2  # sha256(question) mod 10 < EVAL_BUCKETS -> eval split (20% of the questions)
SPLITS = ("train", "eval")


# ---------------------------------------------------------------------------------- ordering
def question_split(question: str) -> str:
    """``eval`` or ``train``: a fixed function of the question text, the same on every machine."""
    return "eval" if int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10 < EVAL_BUCKETS else "train"


def order_key(question: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{question}".encode()).hexdigest()


def question_order(rows: tuple[dict, ...], seed: int, limit: int | None, split: str | None = None) -> list[int]:
    """Indices of ``rows`` in the paired order (by question text, so it is the same in every file), only the
    questions of ``split`` when given."""
    keep = (
        range(len(rows))
        if split is None
        else [i for i in range(len(rows)) if question_split(rows[i]["question"]) == split]
    )
    order = sorted(keep, key=lambda i: (order_key(rows[i]["question"], seed), i))
    return order[:limit] if limit is not None else order


def question_set_sha256(rows: tuple[dict, ...]) -> str:
    h = hashlib.sha256()
    for q in sorted(r["question"] for r in rows):
        h.update(q.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------- documents
def _ctx(c: dict) -> dict:
    # Only what the prompt and the per-sample log need, with one schema for gold and distractors.
    return {
        "title": c.get("title") or "",
        "text": c.get("text") or "",
        "isgold": bool(c.get("isgold", False)),
        "hasanswer": bool(c.get("hasanswer", False)),
    }


def gold_index(ctxs: list[dict], where: str) -> int:
    found = [i for i, c in enumerate(ctxs) if c.get("isgold")]
    if len(found) != 1:
        raise NeedlesError(
            f"{where}: expected exactly one gold passage (isgold=true), found {len(found)}",
            fix="use the official Lost-in-the-Middle files (see `needles data fetch`)",
        )
    return found[0]


def move_gold(ctxs: list[dict], position: int) -> list[dict]:
    """The documents with the gold one moved to ``position`` (1-based), distractors in their order."""
    ctxs = list(ctxs)
    gold = ctxs.pop(gold_index(ctxs, "move_gold"))
    ctxs.insert(position - 1, gold)
    return ctxs


def _load(relpath: str, metadata: dict) -> tuple[tuple[dict, ...], Resolved]:
    got = fetch(LOST_IN_THE_MIDDLE, relpath, metadata)
    return _read_rows(str(got.path), got.sha256), got


def source_for(num_documents: int, position: int) -> tuple[str, bool]:
    """(official file to read, whether the gold passage must be moved)."""
    if num_documents not in OFFICIAL_GOLD_INDICES:
        raise NeedlesError(
            f"mdqa_num_documents={num_documents} has no official data",
            fix=f"use one of {sorted(OFFICIAL_GOLD_INDICES)}",
        )
    if not 1 <= position <= num_documents:
        raise NeedlesError(
            f"gold position {position} is outside 1..{num_documents}",
            fix=f"choose positions between 1 and {num_documents}",
        )
    if position - 1 in OFFICIAL_GOLD_INDICES[num_documents]:
        return official_path(num_documents, position - 1), False
    return official_path(num_documents, 0), True


def _documents(
    rows: tuple[dict, ...], order: list[int], position: int | None, relpath: str, derive: bool, variant: str
) -> list[dict]:
    docs = []
    for qid in order:
        row = rows[qid]
        ctxs = row["ctxs"]
        if position is None:  # closed book
            ctxs = []
        elif derive:
            ctxs = move_gold(ctxs, position)
        elif gold_index(ctxs, f"{relpath} line {qid + 1}") != position - 1:
            raise NeedlesError(
                f"{relpath} line {qid + 1}: gold passage is not at position {position}",
                fix="the file is not the official one for this position",
            )
        docs.append(
            {
                "qid": qid,
                "question": row["question"],
                "answers": list(row["answers"]),
                "ctxs": [_ctx(c) for c in ctxs],
                "num_documents": len(ctxs),
                "gold_position": position or 0,
                "prompt_variant": "closedbook" if position is None else variant,
            }
        )
    return docs


def _info(
    got: list[Resolved], rows: tuple[dict, ...], seed: int, limit: int | None, extra: dict, split: str | None = None
) -> dict:
    official = all(g.official for g in got)
    info = {
        "needles_data_official": official,
        "needles_data_label": "; ".join(sorted({g.label for g in got})),
        "needles_data_files": {g.relpath: g.sha256 for g in got},
        "needles_data_origin": sorted({g.origin for g in got}),
        "needles_question_set_sha256": question_set_sha256(rows),
        "needles_order": f"sha256('{seed}\\0' + question)",
        "needles_num_questions": limit if limit is not None else len(rows),
        **({"needles_question_split": split} if split else {}),
        **extra,
    }
    marks = [] if official else [alias_mark(info["needles_data_label"])]
    if extra.get("needles_prompt") == "query_aware":
        marks.append("query-aware prompt")
    info["needles_alias_marks"] = marks
    return info


def _dataset(docs: list[dict], info: dict) -> datasets.DatasetDict:
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)})
    out.needles_info = info
    return out


def _settings(metadata: dict) -> tuple[int, int | None, str, str | None]:
    check_family_metadata("mdqa", metadata)
    seed = _int(metadata, "mdqa_order_seed", 0)
    limit = _int(metadata, "mdqa_num_questions", None)
    if limit is not None and limit < 1:
        raise NeedlesError(
            f"--metadata mdqa_num_questions={limit} must be at least 1", fix='e.g. "mdqa_num_questions": 100'
        )
    variant = "query_aware" if truthy(metadata.get("mdqa_query_aware", False)) else "qa"
    split = metadata.get("mdqa_split")
    if split is not None and split not in SPLITS:
        raise NeedlesError(
            f"--metadata mdqa_split={split!r} is not a split of the NQ-Open questions",
            fix='use "eval" (the held-out questions, never trained on) or "train", or leave it out for all',
        )
    return seed, limit, variant, split


# ---------------------------------------------------------------------------------- custom_dataset
def mdqa_dataset(
    mdqa_task_kind: str = "position", mdqa_task_documents: int = 20, mdqa_task_position: int = 1, **metadata
) -> datasets.DatasetDict:
    """One task's data. ``mdqa_task_*`` come from the YAML's dataset_kwargs; the rest is metadata."""
    seed, limit, variant, split = _settings(metadata)
    if mdqa_task_kind in ("closedbook", "oracle"):
        rows, got = _load(ORACLE_FILE, metadata)
        order = question_order(rows, seed, limit, split)
        position = None if mdqa_task_kind == "closedbook" else 1
        docs = _documents(rows, order, position, ORACLE_FILE, False, variant)
        extra = {"needles_setting": mdqa_task_kind, "needles_prompt": "closedbook" if position is None else variant}
        return _dataset(docs, _info([got], rows, seed, limit, extra, split))
    if mdqa_task_kind == "sweep":
        return _sweep(metadata, seed, limit, variant, split)
    n, position = int(mdqa_task_documents), int(mdqa_task_position)
    relpath, derive = source_for(n, position)
    rows, got = _load(relpath, metadata)
    docs = _documents(rows, question_order(rows, seed, limit, split), position, relpath, derive, variant)
    extra = {
        "needles_setting": f"{n} documents, gold at position {position}",
        "needles_num_documents": n,
        "needles_gold_position": position,
        "needles_prompt": variant,
        "needles_derived": f"gold moved from {relpath}" if derive else None,
    }
    return _dataset(docs, _info([got], rows, seed, limit, extra, split))


def data_files(task: str, metadata: dict) -> list[str]:
    """The files of the Lost-in-the-Middle data a task (or the ``mdqa20`` group) reads with this metadata."""
    if task in ("mdqa_closedbook", "mdqa_oracle"):
        return [ORACLE_FILE]
    if task == "mdqa_sweep":
        n = _int(metadata, "mdqa_num_documents", 20)
        return list(dict.fromkeys(source_for(n, p)[0] for p in _positions(metadata, n)))
    if task.startswith("mdqa20_pos"):
        return [source_for(20, int(task.removeprefix("mdqa20_pos")))[0]]
    if task == "mdqa20":
        return list(dict.fromkeys(source_for(20, p)[0] for p in DEFAULT_SWEEP_POSITIONS))
    return []


def _positions(metadata: dict, n: int) -> list[int]:
    value = metadata.get("mdqa_positions")
    if value is None:
        value = [p for p in DEFAULT_SWEEP_POSITIONS if p <= n] if n == 20 else sorted({1, (n + 1) // 2, n})
    if isinstance(value, (int, str)):
        value = [value]
    try:
        positions = sorted({int(p) for p in value})
    except (TypeError, ValueError):
        raise NeedlesError(
            f"--metadata mdqa_positions={value!r} is not a list of integers", fix='e.g. "mdqa_positions": [1, 3, 7]'
        ) from None
    return positions


def _sweep(metadata: dict, seed: int, limit: int | None, variant: str, split: str | None) -> datasets.DatasetDict:
    """Any positions of any official setting, question-major: all positions of question 1, then 2, ..."""
    n = _int(metadata, "mdqa_num_documents", 20)
    positions = _positions(metadata, n)
    per_position, got, base_rows = {}, [], None
    for p in positions:
        relpath, derive = source_for(n, p)
        rows, g = _load(relpath, metadata)
        base_rows = base_rows or rows
        got.append(g)
        per_position[p] = _documents(rows, question_order(rows, seed, limit, split), p, relpath, derive, variant)
    by_question: dict[str, list[dict]] = {}
    for p in positions:
        for doc in per_position[p]:
            by_question.setdefault(doc["question"], []).append(doc)
    order = [doc["question"] for doc in per_position[positions[0]]]
    docs = [d for q in order for d in by_question[q]]
    extra = {
        "needles_setting": f"{n} documents, gold at positions {positions}",
        "needles_num_documents": n,
        "needles_positions": positions,
        "needles_prompt": variant,
        "needles_limit_hint": f"--limit counts rows: use {len(positions)} x N for N questions",
    }
    unique = {g.relpath: g for g in got}
    return _dataset(docs, _info(list(unique.values()), base_rows, seed, limit, extra, split))


# ---------------------------------------------------------------------------------- prompt + score
def search_results(ctxs: list[dict]) -> str:
    return "\n".join(f"Document [{i}](Title: {c['title']}) {c['text']}" for i, c in enumerate(ctxs, start=1))


def render_prompt(doc: dict) -> str:
    """The reference prompt (``qa.prompt`` and friends), byte for byte; it ends at ``Answer:``."""
    variant = doc.get("prompt_variant") or "qa"
    if variant == "closedbook" or not doc["ctxs"]:
        return load_template(PROMPTS["closedbook"]).render(question=doc["question"])
    return load_template(PROMPTS[variant]).render(question=doc["question"], search_results=search_results(doc["ctxs"]))


def doc_to_text(doc: dict) -> str:
    return render_prompt(doc)


def doc_to_target(doc: dict) -> list[str]:
    return list(doc["answers"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    score = best_subspan_em(results[0], doc["answers"])
    return {"best_subspan_em": score}


def process_results_sweep(doc: dict, results: list[str]) -> dict[str, float]:
    score = best_subspan_em(results[0], doc["answers"])
    return with_breakdowns({"best_subspan_em": score}, [key_suffix("doc", doc["gold_position"])])
