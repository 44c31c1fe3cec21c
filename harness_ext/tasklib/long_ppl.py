"""The continuation-loss family: the loss of a fixed continuation after P tokens of real long text, P on a ladder.

A *document* is a continuation of exactly C tokens (``long_ppl_continuation``) at a fixed place of a long text;
it is scored after each context length P of ``long_ppl_contexts``, the context being the P tokens right before
it (exact counts in the evaluated model's tokens: :mod:`harness_ext.tasklib.long_ppl_cut`). The continuation is
the same text at every P, so the curve NLL(P) is paired per document: how much a model gains from more context,
and where past its window it stops gaining or breaks down. Each (document, P) is one lm-eval ``loglikelihood``
request (no generation).

Where documents sit: the texts are read in order (:mod:`harness_ext.tasklib.long_ppl_text`); documents go
round-robin to the texts with room (a continuation needs the longest P of text before it), and within a text
at evenly spaced token positions, each moved to the next junction where every count comes out exact. Nothing is
random, so equal metadata, texts and tokenizer give byte-identical rows on every machine.

Scores per request: ``nll`` = -log-likelihood / C (mean per-token negative log-likelihood, nats) and ``ppl`` =
exp(nll), each also as ``<metric>_len<P>``. Every document scores exactly C tokens (the length guard checks the
count lm-eval scores), so the mean of ``nll`` over documents is total NLL / total tokens, and ``ppl`` aggregates
as the geometric mean of the documents' perplexities, i.e. exp(mean NLL) (:func:`perplexity_of`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import datasets

from harness_ext.core.errors import NeedlesError
from harness_ext.core.metadata import as_choice, as_distinct_lengths, as_int, as_list, bad_value
from harness_ext.core.tokenizers import required_fingerprint, tokenizer_from_metadata
from harness_ext.data.dataset_cache import cached_rows, dataset_sha256
from harness_ext.tasklib.breakdowns import key_suffix, with_breakdowns
from harness_ext.tasklib.long_ppl_cut import TextCutter
from harness_ext.tasklib.long_ppl_text import TEXT_CHOICES, LongText, TextSet, load_texts
from harness_ext.tasklib.metadata_keys import check_family_metadata

GENERATOR_VERSION = 1
METRICS = ("nll", "ppl")
MIN_CONTEXT = 16


@dataclass(frozen=True)
class LongPPLSpec:
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)
    continuation: int = 128
    num_docs: int = 16
    text: str = "book"
    files: tuple[str, ...] = ()


def spec_from_metadata(task: str, metadata: dict) -> LongPPLSpec:
    """The validated spec; unknown keys get ``did you mean``, wrong types and ranges a clear error."""
    check_family_metadata("long_ppl", metadata, task)
    kw: dict = {}
    if "long_ppl_contexts" in metadata:
        v, ex = metadata["long_ppl_contexts"], "[1024, 4096, 16384]"
        kw["contexts"] = tuple(sorted(as_distinct_lengths("long_ppl_contexts", v, MIN_CONTEXT, 1 << 22, ex)))
    if "long_ppl_continuation" in metadata:
        kw["continuation"] = as_int("long_ppl_continuation", metadata["long_ppl_continuation"], 1, 8192, "128")
    if "long_ppl_num_docs" in metadata:
        kw["num_docs"] = as_int("long_ppl_num_docs", metadata["long_ppl_num_docs"], 1, 100_000, "16")
    files = metadata.get("long_ppl_files")
    if files is not None:
        items = [files] if isinstance(files, str) else as_list("long_ppl_files", files, '["my_book.txt"]')
        if not all(isinstance(f, str) and f.strip() for f in items):
            raise bad_value("long_ppl_files", files, "is not a list of file paths", '["a.txt", "b.txt"]')
        kw["files"] = tuple(items)
    text = metadata.get("long_ppl_text")
    kw["text"] = as_choice("long_ppl_text", text, TEXT_CHOICES) if text is not None else "files" if files else "book"
    if kw["text"] == "files" and not kw.get("files"):
        raise bad_value("long_ppl_text", text, "is 'files' but long_ppl_files names none", '["my_book.txt"]')
    if kw["text"] != "files" and kw.get("files"):
        raise bad_value("long_ppl_files", files, f"is given with long_ppl_text {kw['text']!r}", '"files"')
    return LongPPLSpec(**kw)


# ---------------------------------------------------------------------------------- documents
def _rows(spec: LongPPLSpec, texts: Sequence[LongText], tokenizer: object) -> list[dict]:
    longest, c = spec.contexts[-1], spec.continuation
    plan: list[tuple[LongText, TextCutter, int]] = []  # (text, cutter, its room in continuations)
    most = 0
    for text in texts:  # tokenized in order until there are enough texts for round-robin
        if len(plan) >= spec.num_docs:
            break
        cutter = TextCutter(text.text, tokenizer)
        most = max(most, cutter.n_tokens)
        lo, hi = cutter.capacity(longest, c)
        room = max(0, (hi - lo) // (c + 8))  # disjoint continuations, with slack for moving to a junction
        if room:
            plan.append((text, cutter, room))
    share = _round_robin([room for _, _, room in plan], spec.num_docs)
    if sum(share) < spec.num_docs:
        raise NeedlesError(
            f"the texts hold room for {sum(share)} of {spec.num_docs} documents of a {c}-token continuation after "
            f"{longest} tokens of context (longest text: {most} tokens)",
            fix="lower long_ppl_num_docs or the largest long_ppl_contexts, or give longer texts "
            "(long_ppl_files, or long_ppl_text 'pg19')",
        )
    docs: list[list[dict]] = [[] for _ in plan]
    for s, ((text, cutter, _), n) in enumerate(zip(plan, share, strict=True)):
        lo, hi = cutter.capacity(longest, c)
        floor = lo
        for r in range(n):
            at = max(floor, lo + int((r + 0.5) * (hi - lo) / n))
            cut = cutter.cut(at, spec.contexts, c, hi + 1)
            if cut is None:
                raise NeedlesError(
                    f"{text.name}: no place near token {at} gives exact counts for every context length",
                    fix="try other long_ppl_contexts or long_ppl_continuation (report the tokenizer if it persists)",
                )
            floor = int(cutter.tok_piece[cutter.piece.searchsorted(cut.continuation_start)]) + c  # no overlap
            docs[s].append(_doc_rows(text, cutter, cut, spec))
    # documents round-robin over the texts, each at every P: `--limit` keeps whole documents from several texts
    ordered = [docs[s][r] for r in range(max(share, default=0)) for s in range(len(plan)) if r < len(docs[s])]
    return [{"doc": i, **row} for i, group in enumerate(ordered) for row in group]


def _doc_rows(text: LongText, cutter: TextCutter, cut, spec: LongPPLSpec) -> list[dict]:
    continuation = cutter.text[cut.continuation_start : cut.continuation_end]
    out = []
    for p in spec.contexts:
        start, in_word = cut.context_starts[p]
        context = cutter.text[start : cut.continuation_start]
        row = {
            "source": text.name,
            "context_tokens": p,
            "continuation_tokens": spec.continuation,
            "context_start": start,
            "context_start_in_word": in_word,
            "continuation_start": cut.continuation_start,
            "continuation_sha256": hashlib.sha256(continuation.encode()).hexdigest(),
            "context": context,
            "continuation": continuation,
        }
        row["doc_sha256"] = hashlib.sha256(json.dumps([context, continuation]).encode()).hexdigest()
        out.append(row)
    return out


def _round_robin(rooms: list[int], n: int) -> list[int]:
    """Documents per text: one at a time to each text with room left, in order, until ``n`` are placed."""
    share = [0] * len(rooms)
    placed = 0
    while placed < n and any(s < r for s, r in zip(share, rooms, strict=True)):
        for k, room in enumerate(rooms):
            if placed < n and share[k] < room:
                share[k] += 1
                placed += 1
    return share


def long_ppl_dataset(task: str, metadata: dict) -> datasets.DatasetDict:
    """The (document, P) rows (cached) and the facts results must carry (``needles_info``)."""
    spec = spec_from_metadata(task, metadata)
    fingerprint = required_fingerprint(task, metadata, "cuts text at exact counts of the evaluated model's tokens")
    found = load_texts(spec.text, spec.files, metadata)
    payload = {
        "generator": GENERATOR_VERSION,
        "spec": {**asdict(spec), "files": []},  # files enter by content, below
        "texts": [[t.name, t.sha256] for t in found.texts],
        "tokenizer": fingerprint,
    }

    def build() -> list[dict]:
        return _rows(spec, found.texts, tokenizer_from_metadata(metadata))

    rows, path, _hit = cached_rows("long_ppl", payload, build)
    out = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)})
    out.needles_info = _info(found, rows, path)
    return out


def _info(found: TextSet, rows: list[dict], path) -> dict:
    used = sorted({r["source"] for r in rows})
    return {
        "needles_data_sha256": dataset_sha256(rows),
        "needles_data_cache": str(path),
        "needles_data_official": found.official,
        "needles_data_label": found.label,
        "needles_data_files": {t.name: t.sha256 for t in found.texts if t.name in used},
        "needles_data_origin": found.origin,
        "needles_alias_marks": found.marks,
    }


# ---------------------------------------------------------------------------------- scoring
def process_results(doc: dict, results: list) -> dict[str, float]:
    """Per-token NLL and perplexity of the continuation, overall and at this document's context length."""
    loglikelihood = float(results[0][0])
    nll = -loglikelihood / doc["continuation_tokens"]
    scores = {"nll": nll, "ppl": math.exp(nll)}
    return with_breakdowns(scores, [key_suffix("length", doc["context_tokens"])])


def perplexity_of(ppls: Sequence[float]) -> float:
    """The perplexity of documents of equal token counts: exp(mean NLL), the geometric mean of their perplexities."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls))


def check_plain_prompt(task: str, num_fewshot: int, system_instruction: str | None, chat_template: bool) -> None:
    """Refuse what would put text before the context: the loss after exactly P tokens of text is measured."""
    extra = [
        name
        for name, on in (
            ("--apply_chat_template", chat_template),
            ("--system_instruction", bool(system_instruction)),
            (f"--num_fewshot {num_fewshot}", bool(num_fewshot)),
        )
        if on
    ]
    if extra:
        raise NeedlesError(
            f"task {task} scores a continuation after exactly P tokens of plain text; {', '.join(extra)} would "
            "add text before it and change P",
            fix=f"run {task} without {', '.join(e.split()[0] for e in extra)} (in a separate lm_eval call)",
        )
