"""Multi-hop QA over a haystack (MuSiQue-Answerable, Trivedi et al. TACL 2022), as Zhao, Yin & Durrett use it.

Data: the official ``musique_ans_v1.0_dev.jsonl`` (:data:`harness_ext.data.qa_sources.MUSIQUE`: verified
download, cache or mirror). Each question has 20 paragraphs (17-20 in the file), 2-4 of them supporting.

A sample is one question. Its haystack is the question's own paragraphs, padded with paragraphs of *other*
questions that contain none of its answers (SQuAD-normalised, whole words: the study's construction), cut to
each target length in the evaluated model's tokens and laid out at each placement of the supporting
paragraphs (``early`` / ``spread`` / ``late``) by :mod:`harness_ext.tasklib.haystack_fit`: the same units at
every placement of a length, the prompt at most the target, one more word of filler over it. Fillers are
taken in a fixed order, the question's own non-supporting paragraphs first (a seeded order), then the padding
(drawn with ``random.Random(f"{seed}:{id}")``), so a shorter length keeps a front of the same pool.

Order: questions by SHA-256 of ``"<seed>\\0<id>"``; rows sample-major, then length, then placement, so
``--limit`` keeps lengths and placements balanced. Rows are cached and hashed like every generated family.

Scores (``evaluate_v1.0.py``): ``answer_f1`` and ``answer_em``, max over ``[answer] + answer_aliases``, of the
first non-empty line of the reply (a leading ``Answer:`` label dropped); breakdowns ``_len<L>``,
``_place_<P>``, both combined, and ``_hops<H>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from functools import lru_cache

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_int, as_ints
from harness_ext.core.templating import load_template
from harness_ext.core.tokenizers import required_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256
from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_DEV
from harness_ext.data.sources import Resolved, alias_mark, fetch
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.haystack_fit import PLACEMENTS, Unit, fit_haystack, placements_from
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.metrics import musique_em, musique_f1, squad_normalize

GENERATOR_VERSION = 1  # part of the cache key: bump whenever rows change for the same inputs
TEMPLATE = "musique/qa.jinja"
MIN_LENGTH = 128
_FIX = "use the official musique_ans_v1.0_dev.jsonl (`needles data fetch musique`) or a fixture in its schema"


@dataclass(frozen=True)
class MusiqueSpec:
    lengths: tuple[int, ...] = (2048, 4096)
    placements: tuple[str, ...] = PLACEMENTS
    num_questions: int = 100
    seed: int = 0


def spec_from_metadata(metadata: dict) -> MusiqueSpec:
    """The validated spec; unknown keys get ``did you mean``, wrong types and ranges a clear error."""
    check_family_metadata("musique", metadata, "musique")
    kw: dict = {}
    if "musique_lengths" in metadata:
        kw["lengths"] = as_ints("musique_lengths", metadata["musique_lengths"], MIN_LENGTH, 1 << 22, "[2048, 4096]")
    if "musique_placements" in metadata:
        kw["placements"] = placements_from("musique_placements", metadata["musique_placements"])
    if "musique_num_questions" in metadata:
        kw["num_questions"] = as_int("musique_num_questions", metadata["musique_num_questions"], 1, 100_000, "100")
    if "musique_seed" in metadata:
        kw["seed"] = as_int("musique_seed", metadata["musique_seed"], 0, 2**32 - 1, "0")
    return MusiqueSpec(**kw)


# ---------------------------------------------------------------------------------- data
def _check_row(row: object, where: str) -> dict:
    keys = {"id", "question", "answer", "answer_aliases", "paragraphs", "question_decomposition"}
    if not isinstance(row, dict) or not keys <= row.keys():
        missing = sorted(keys - row.keys()) if isinstance(row, dict) else ["(not an object)"]
        raise NeedlesError(f"{where}: not a MuSiQue row (missing {', '.join(missing)})", fix=_FIX)
    paras = row["paragraphs"]
    if not isinstance(paras, list) or not all(
        isinstance(p, dict) and {"title", "paragraph_text", "is_supporting"} <= p.keys() for p in paras
    ):
        raise NeedlesError(f"{where}: paragraphs lack title / paragraph_text / is_supporting", fix=_FIX)
    if not any(p["is_supporting"] for p in paras):
        raise NeedlesError(f"{where}: question {row['id']} has no supporting paragraph", fix=_FIX)
    return row


@lru_cache(maxsize=2)
def read_rows(path: str, sha256: str) -> tuple[dict, ...]:
    """The rows of a MuSiQue JSONL file (schema checked); ``sha256`` keys the cache."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_check_row(json.loads(line), f"{path} line {n}"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeedlesError(f"{path} is not a readable MuSiQue JSONL file ({exc})", fix=_FIX) from None
    if not rows:
        raise NeedlesError(f"{path} holds no questions", fix=_FIX)
    return tuple(rows)


def question_order(rows: tuple[dict, ...], seed: int, limit: int) -> list[int]:
    """The first ``limit`` row indices in the paired order (SHA-256 of seed and question id)."""
    key = {i: hashlib.sha256(f"{seed}\0{r['id']}".encode()).hexdigest() for i, r in enumerate(rows)}
    order = sorted(range(len(rows)), key=lambda i: (key[i], i))
    if limit > len(order):
        raise NeedlesError(
            f"musique_num_questions={limit} but the data holds {len(order)} questions",
            fix=f'use "musique_num_questions": {len(order)} or fewer',
        )
    return order[:limit]


def answers_of(row: dict) -> list[str]:
    return [row["answer"], *row["answer_aliases"]]


def hops_of(row: dict) -> int:
    return len(row["question_decomposition"]) or sum(bool(p["is_supporting"]) for p in row["paragraphs"])


class _Corpus:
    """Every paragraph of the file once, with its normalised text for the answer-free test of padding."""

    def __init__(self, rows: tuple[dict, ...]) -> None:
        self.units: list[tuple[int, Unit]] = []
        for qi, row in enumerate(rows):
            for pi, p in enumerate(row["paragraphs"]):
                self.units.append((qi, Unit(f"{row['id']}:{p.get('idx', pi)}", p["title"], p["paragraph_text"], False)))
        self.normalised = [f" {squad_normalize(u.title + ' ' + u.text)} " for _, u in self.units]

    def padding(self, qi: int, row: dict, count: int, seed: int) -> list[Unit]:
        answers = [f" {a} " for a in (squad_normalize(x) for x in answers_of(row)) if a]
        seen = {p["paragraph_text"] for p in row["paragraphs"]}
        rng = random.Random(f"{seed}:{row['id']}")
        out: list[Unit] = []
        for _ in range(50 * count):
            j = rng.randrange(len(self.units))
            owner, unit = self.units[j]
            if owner == qi or unit.text in seen or any(a in self.normalised[j] for a in answers):
                continue
            seen.add(unit.text)
            out.append(unit)
            if len(out) == count:
                return out
        raise NeedlesError(
            f"question {row['id']}: found only {len(out)} answer-free padding paragraphs of {count} needed",
            fix="lower musique_lengths (or use the full data file)",
        )


def _order_key(seed: int, qid: str, uid: str) -> str:
    return hashlib.sha256(f"{seed}\0{qid}\0{uid}".encode()).hexdigest()


def render(question: str, units: list[Unit]) -> str:
    docs = "\n".join(f"Document [{i}](Title: {u.title}) {u.text}" for i, u in enumerate(units, start=1))
    return load_template(TEMPLATE).render(search_results=docs, question=question)


def build_rows(spec: MusiqueSpec, rows: tuple[dict, ...], tokenizer) -> list[dict]:
    """All rows of ``spec``: sample-major, then length, then placement."""
    corpus = _Corpus(rows)
    out = []
    for sample, qi in enumerate(question_order(rows, spec.seed, spec.num_questions)):
        row = rows[qi]
        units = [
            Unit(f"{row['id']}:{p.get('idx', pi)}", p["title"], p["paragraph_text"], bool(p["is_supporting"]))
            for pi, p in enumerate(row["paragraphs"])
        ]
        keys = [u for u in units if u.key]
        own = sorted((u for u in units if not u.key), key=lambda u: _order_key(spec.seed, "own", u.uid))
        padding = corpus.padding(qi, row, max(spec.lengths) // 16 + 8, spec.seed)
        pool = [Unit(u.uid, u.title, u.text, False, _order_key(spec.seed, row["id"], u.uid)) for u in own + padding]
        for length in spec.lengths:
            got = fit_haystack(
                keys,
                pool,
                spec.placements,
                length,
                functools.partial(render, row["question"]),
                tokenizer,
                f"MuSiQue question {row['id']}",
            )
            for placement in spec.placements:
                layout = got.layouts[placement]
                doc = {
                    "sample": sample,
                    "id": row["id"],
                    "question": row["question"],
                    "answers": answers_of(row),
                    "hops": hops_of(row),
                    "target_tokens": length,
                    "placement": placement,
                    "n_tokens": got.tokens[placement],
                    "num_paragraphs": len(layout),
                    "supporting_positions": [i for i, u in enumerate(layout, start=1) if u.key],
                    "own_paragraphs": sum(u.uid.startswith(f"{row['id']}:") for u in layout),
                    "layout": [u.uid + ("*" if u.key else "") + (f"[:{u.words}w]" if u.words else "") for u in layout],
                    "prompt": got.prompts[placement],
                }
                doc["doc_sha256"] = hashlib.sha256(json.dumps([doc["prompt"], doc["answers"]]).encode()).hexdigest()
                out.append(doc)
    return out


def musique_dataset(**metadata) -> datasets.DatasetDict:
    """The ``musique`` task's rows (cached) and the facts its results carry (``needles_info``)."""
    spec = spec_from_metadata(metadata)
    fingerprint = required_fingerprint("musique", metadata)
    got = fetch(MUSIQUE, MUSIQUE_DEV, metadata)
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": {got.relpath: got.sha256},
        "tokenizer": fingerprint,
        "template": load_template(TEMPLATE).render(search_results="{S}", question="{Q}"),
    }

    def build() -> list[dict]:
        return build_rows(spec, read_rows(str(got.path), got.sha256), tokenizer_from_metadata(metadata))

    rows, path, _hit = cached_rows("musique", payload, build)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = _info(spec, got, rows, str(path))
    return out


def _info(spec: MusiqueSpec, got: Resolved, rows: list[dict], path: str) -> dict:
    return {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": path,
        "needles_data_official": got.official,
        "needles_data_label": got.label,
        "needles_data_files": {got.relpath: got.sha256},
        "needles_data_origin": [got.origin],
        "needles_musique_spec": asdict(spec),
        "needles_alias_marks": [] if got.official else [alias_mark(got.label)],
    }


# ---------------------------------------------------------------------------------- scoring
def reply_answer(reply: str) -> str:
    """What is scored: the first non-empty line of the reply, stripped, without a leading ``Answer:`` label."""
    line = next((x.strip() for x in reply.splitlines() if x.strip()), "")
    return line[len("answer:") :].strip() if line.lower().startswith("answer:") else line


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    answer = reply_answer(results[0])
    scores = {"answer_f1": musique_f1(answer, doc["answers"]), "answer_em": musique_em(answer, doc["answers"])}
    out = with_breakdowns(
        scores, [key_suffix("length", doc["target_tokens"]), key_suffix("placement", doc["placement"])]
    )
    out.update({f"{m}_hops{doc['hops']}": v for m, v in scores.items()})
    return out
