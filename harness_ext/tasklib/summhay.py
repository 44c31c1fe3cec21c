"""Citation over a haystack (Summary of a Haystack, Laban et al. EMNLP 2024), the part Zhao, Yin & Durrett score.

Data: the ten official haystacks ``data/topic_{news,conv}{1..5}.json``
(:data:`harness_ext.data.qa_sources.SUMMHAY`: verified download, cache or mirror). Each has ~100 documents and
subtopics with insights; a document lists the insights it states in ``insights_included``.

A sample is one insight. Its haystack: ``summhay_num_gold`` documents that state it (the *gold* documents, in a
seeded order; fewer when fewer exist) and, as filler, documents of the same haystack that do not state it (a
seeded order), cut to each target length in the evaluated model's tokens and laid out at each placement of the
gold documents (``early`` / ``spread`` / ``late``) by :mod:`harness_ext.tasklib.haystack_fit`: the same
documents at every placement of a length, at most the target, one more word of filler over it. Documents that
state the insight but are not gold never appear, so the gold set is exactly the documents that hold it.

Prompt (``templates/summhay/citation.jinja``, fixed): the documents with the IDs 1..N in a seeded order of the
documents (:func:`document_ids`; not their prompt order, which would give the gold IDs away with the placement),
introduced as the reference's summarisation prompts introduce them (``Article N:`` for news, ``Conversation N:``
for conversations), the insight, and the instruction to answer with the supporting IDs in brackets (``[3][7]``,
the reference's citation format). Scores: the reference's citation precision / recall / F1
(:func:`harness_ext.tasklib.metrics.citation_scores`) of the IDs read from the reply by its
``extract_citations``, with ``_len<L>``, ``_place_<P>`` and combined breakdowns. No LLM judge: the insight is
given, so there is nothing to match.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_choice, as_int, as_ints, as_list
from harness_ext.core.templating import load_template
from harness_ext.core.tokenizers import required_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256
from harness_ext.data.qa_sources import SUMMHAY, SUMMHAY_HAYSTACKS, summhay_path
from harness_ext.data.sources import Resolved, alias_mark, fetch
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.haystack_fit import PLACEMENTS, Unit, fit_haystack, placements_from
from harness_ext.tasklib.metadata_keys import check_family_metadata
from harness_ext.tasklib.metrics import citation_scores, summhay_citations

GENERATOR_VERSION = 2  # part of the cache key: bump whenever rows change for the same inputs
TEMPLATE = "summhay/citation.jinja"
MIN_LENGTH = 128
_FIX = "use the official SummHay haystacks (`needles data fetch summhay`) or a fixture in their schema"


@dataclass(frozen=True)
class SummhaySpec:
    lengths: tuple[int, ...] = (4096, 8192)
    placements: tuple[str, ...] = PLACEMENTS
    num_insights: int = 60
    num_gold: int = 2
    haystacks: tuple[str, ...] = SUMMHAY_HAYSTACKS
    seed: int = 0


def spec_from_metadata(metadata: dict) -> SummhaySpec:
    check_family_metadata("summhay", metadata, "summhay_citation")
    kw: dict = {}
    if "summhay_lengths" in metadata:
        kw["lengths"] = as_ints("summhay_lengths", metadata["summhay_lengths"], MIN_LENGTH, 1 << 22, "[4096, 8192]")
    if "summhay_placements" in metadata:
        kw["placements"] = placements_from("summhay_placements", metadata["summhay_placements"])
    if "summhay_num_insights" in metadata:
        kw["num_insights"] = as_int("summhay_num_insights", metadata["summhay_num_insights"], 1, 100_000, "60")
    if "summhay_num_gold" in metadata:
        kw["num_gold"] = as_int("summhay_num_gold", metadata["summhay_num_gold"], 1, 50, "2")
    if "summhay_haystacks" in metadata:
        v = metadata["summhay_haystacks"]
        items = [v] if isinstance(v, str) else as_list("summhay_haystacks", v, '["news1", "conv1"]')
        chosen = {as_choice("summhay_haystacks", h, SUMMHAY_HAYSTACKS) for h in items}
        kw["haystacks"] = tuple(h for h in SUMMHAY_HAYSTACKS if h in chosen)
    if "summhay_seed" in metadata:
        kw["seed"] = as_int("summhay_seed", metadata["summhay_seed"], 0, 2**32 - 1, "0")
    return SummhaySpec(**kw)


# ---------------------------------------------------------------------------------- data
@lru_cache(maxsize=12)
def read_topic(path: str, sha256: str) -> dict:
    """One haystack file (schema checked); ``sha256`` keys the cache."""
    try:
        with open(path, encoding="utf-8") as f:
            topic = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeedlesError(f"{path} is not a readable SummHay haystack ({exc})", fix=_FIX) from None
    docs = topic.get("documents") if isinstance(topic, dict) else None
    subtopics = topic.get("subtopics") if isinstance(topic, dict) else None
    if not isinstance(docs, list) or not isinstance(subtopics, list) or not docs:
        raise NeedlesError(f"{path}: a SummHay haystack has `documents` and `subtopics` lists", fix=_FIX)
    for d in docs:
        if not isinstance(d, dict) or not {"document_id", "document_text", "insights_included"} <= d.keys():
            raise NeedlesError(f"{path}: a document lacks document_id / document_text / insights_included", fix=_FIX)
    for s in subtopics:
        if not all(isinstance(i, dict) and {"insight_id", "insight"} <= i.keys() for i in s.get("insights", [])):
            raise NeedlesError(f"{path}: an insight lacks insight_id / insight", fix=_FIX)
    return topic


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def insight_order(topics: dict[str, dict], seed: int, limit: int) -> list[tuple[str, dict]]:
    """(haystack, insight) pairs stated by at least one document, in the paired order; the first ``limit``."""
    pairs = []
    for name, topic in topics.items():
        stated = {i for d in topic["documents"] for i in d["insights_included"]}
        pairs += [
            (name, ins) for s in topic["subtopics"] for ins in s.get("insights", []) if ins["insight_id"] in stated
        ]
    pairs.sort(key=lambda p: _key(seed, p[0], p[1]["insight_id"]))
    if limit > len(pairs):
        raise NeedlesError(
            f"summhay_num_insights={limit} but the haystacks state {len(pairs)} insights",
            fix=f'use "summhay_num_insights": {len(pairs)} or fewer (or more summhay_haystacks)',
        )
    return pairs[:limit]


def document_ids(units: list[Unit], salt: str) -> dict[str, int]:
    """The IDs 1..N of one prompt's documents, in a seeded order of the documents (not their prompt order).

    Numbered in prompt order, the gold IDs would follow from the placement and the document count alone (the
    placements put the gold documents at fixed slots), and one reply would score at every length without reading
    a document. The order depends on the set of documents, so every placement of a length carries the same IDs."""
    order = sorted(units, key=lambda u: hashlib.sha256(f"{salt}:{u.uid}".encode()).hexdigest())
    ids = {u.uid: i for i, u in enumerate(order, start=1)}
    if len(ids) != len(units):
        raise NeedlesError(f"two documents of one prompt share an id ({salt})", fix="report this bug")
    return ids


def render(insight: str, kind: str, salt: str, units: list[Unit]) -> str:
    ids = document_ids(units, salt)
    docs = "\n\n".join(f"{kind} {ids[u.uid]}:\n{u.text}" for u in units)
    return load_template(TEMPLATE).render(documents=docs, insight=insight, kind=kind, n=len(units))


def build_rows(spec: SummhaySpec, topics: dict[str, dict], tokenizer) -> list[dict]:
    """All rows of ``spec``: sample-major, then length, then placement."""
    out = []
    for sample, (name, ins) in enumerate(insight_order(topics, spec.seed, spec.num_insights)):
        iid, docs = ins["insight_id"], topics[name]["documents"]
        kind = "Conversation" if name.startswith("conv") else "Article"
        holders = sorted(
            (d for d in docs if iid in d["insights_included"]), key=lambda d: _key(spec.seed, iid, d["document_id"])
        )
        keys = [Unit(d["document_id"], "", d["document_text"], True) for d in holders[: spec.num_gold]]
        pool = [
            Unit(d["document_id"], "", d["document_text"], False, _key(spec.seed, iid, d["document_id"]))
            for d in sorted(docs, key=lambda d: _key(spec.seed, "pool", iid, d["document_id"]))
            if iid not in d["insights_included"]
        ]
        salt = f"{spec.seed}:{name}:{iid}"
        for length in spec.lengths:
            got = fit_haystack(
                keys,
                pool,
                spec.placements,
                length,
                functools.partial(render, ins["insight"], kind, salt),
                tokenizer,
                f"SummHay insight {iid} ({name})",
            )
            for placement in spec.placements:
                layout = got.layouts[placement]
                ids = document_ids(layout, salt)
                doc = {
                    "sample": sample,
                    "haystack": name,
                    "insight_id": iid,
                    "insight": ins["insight"],
                    "gold_ids": [ids[u.uid] for u in layout if u.key],
                    "gold_positions": [i for i, u in enumerate(layout, start=1) if u.key],
                    "num_documents": len(layout),
                    "holders_in_haystack": len(holders),
                    "target_tokens": length,
                    "placement": placement,
                    "n_tokens": got.tokens[placement],
                    "layout": [u.uid + ("*" if u.key else "") + (f"[:{u.words}w]" if u.words else "") for u in layout],
                    "prompt": got.prompts[placement],
                }
                doc["target"] = "".join(f"[{i}]" for i in doc["gold_ids"])
                doc["doc_sha256"] = hashlib.sha256(json.dumps([doc["prompt"], doc["gold_ids"]]).encode()).hexdigest()
                out.append(doc)
    return out


def summhay_dataset(**metadata) -> datasets.DatasetDict:
    """The ``summhay_citation`` task's rows (cached) and the facts its results carry (``needles_info``)."""
    spec = spec_from_metadata(metadata)
    fingerprint = required_fingerprint("summhay_citation", metadata)
    got = {h: fetch(SUMMHAY, summhay_path(h), metadata) for h in spec.haystacks}
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": {g.relpath: g.sha256 for g in got.values()},
        "tokenizer": fingerprint,
        "template": load_template(TEMPLATE).render(documents="{D}", insight="{I}", kind="{K}", n=0),
    }

    def build() -> list[dict]:
        topics = {h: read_topic(str(g.path), g.sha256) for h, g in got.items()}
        return build_rows(spec, topics, tokenizer_from_metadata(metadata))

    rows, path, _hit = cached_rows("summhay", payload, build)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = _info(spec, list(got.values()), rows, str(path))
    return out


def _info(spec: SummhaySpec, got: list[Resolved], rows: list[dict], path: str) -> dict:
    official = all(g.official for g in got)
    label = "; ".join(sorted({g.label for g in got}))
    return {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": path,
        "needles_data_official": official,
        "needles_data_label": label,
        "needles_data_files": {g.relpath: g.sha256 for g in got},
        "needles_data_origin": sorted({g.origin for g in got}),
        "needles_summhay_spec": asdict(spec),
        "needles_alias_marks": [] if official else [alias_mark(label)],
    }


# ---------------------------------------------------------------------------------- scoring
def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    scores = citation_scores(summhay_citations(results[0]), set(doc["gold_ids"]))
    return with_breakdowns(
        scores, [key_suffix("length", doc["target_tokens"]), key_suffix("placement", doc["placement"])]
    )
