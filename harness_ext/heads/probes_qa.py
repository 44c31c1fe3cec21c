"""MuSiQue and SummHay as retrieval-head probes and as knockout / patching items: ``needles heads --probes musique
summhay``, ``--knockout-task musique|summhay`` and ``needles heads patch --task musique|summhay``.

Items are rows of the scored tasks ``musique`` and ``summhay_citation``, built by their own row builders with the
probed model's tokenizer (exact lengths, paired placements) from ``--qa-metadata`` (the tasks' ``--metadata``
keys and data mirrors) over :data:`PROBE_DEFAULTS`. The needle a retrieval head must copy:

* MuSiQue: the answer inside the *last hop's* supporting paragraph (the paragraph that states the answer; the
  decomposition's last ``paragraph_support_idx``), as MDQA's needle is the answer inside the gold document; the
  whole paragraph when no answer string is written there.
* SummHay: the ID of the first gold document in its header (``Article 3:``): a correct reply (``[3][7]``) copies
  those tokens first.

Success (a probe counts as retrieved above 0.5; knockout and patching score it per item): MuSiQue ``answer_f1``,
SummHay ``citation_f1``, the tasks' own scorers. Knockout and patching take the items of ``--eval-lengths``,
``--eval-samples`` questions or insights, ``--eval-seed`` (the task's ordering seed) and ``--eval-depths`` as
placements (depth <= 1/3 early, >= 2/3 late, otherwise spread).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from harness_ext.core.errors import NeedlesError
from harness_ext.heads.prompts import Probe, format_input

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from harness_ext.heads.knockout import EvalSet

QA_PROBES = ("musique", "summhay")
PROBE_DEFAULTS = {
    "musique": {"musique_num_questions": 4, "musique_lengths": [1024]},  # x 3 placements: 12 probes
    "summhay": {"summhay_num_insights": 4, "summhay_lengths": [4096]},  # real documents are ~1,000 tokens each
}
_COUNT_KEY = {"musique": "musique_num_questions", "summhay": "summhay_num_insights"}
_METRIC = {"musique": "answer_f1", "summhay": "citation_f1"}


def parse_qa_metadata(text: str | None) -> dict:
    """``--qa-metadata`` JSON (an object of musique_* / summhay_* keys, mirrors, allow_unofficial_data)."""
    if not text:
        return {}
    fix = 'pass a JSON object, e.g. --qa-metadata \'{"musique_mirror": "DIR", "musique_lengths": [1024]}\''
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise NeedlesError(f"--qa-metadata is not valid JSON ({exc})", fix=fix) from None
    if not isinstance(value, dict):
        raise NeedlesError("--qa-metadata is not a JSON object", fix=fix)
    return value


def check_qa_metadata(names: Sequence[str], metadata: dict) -> None:
    """Refuse bad task keys of the requested QA probes / eval tasks before any model loads."""
    from harness_ext.tasklib import musique, summhay

    for name in names:
        if name in QA_PROBES:
            spec_of = musique.spec_from_metadata if name == "musique" else summhay.spec_from_metadata
            spec_of({**PROBE_DEFAULTS[name], **metadata})


def qa_docs(task: str, tokenizer: PreTrainedTokenizerBase, metadata: dict) -> list[dict]:
    """Rows of the scored task (``musique`` or ``summhay``) for ``metadata`` over the probe defaults; MuSiQue rows
    also get ``last_hop_position`` (1-based paragraph of the last hop)."""
    from harness_ext.data.sources import fetch

    metadata = {**PROBE_DEFAULTS[task], **metadata}
    if task == "musique":
        from harness_ext.data.qa_sources import MUSIQUE, MUSIQUE_DEV
        from harness_ext.tasklib import musique
        from harness_ext.tasklib.qa_cells import add_last_hop

        got = fetch(MUSIQUE, MUSIQUE_DEV, metadata)
        rows = musique.read_rows(str(got.path), got.sha256)
        return add_last_hop(musique.build_rows(musique.spec_from_metadata(metadata), rows, tokenizer), rows)
    from harness_ext.data.qa_sources import SUMMHAY, summhay_path
    from harness_ext.tasklib import summhay

    spec = summhay.spec_from_metadata(metadata)
    files = {h: fetch(SUMMHAY, summhay_path(h), metadata) for h in spec.haystacks}
    topics = {h: summhay.read_topic(str(g.path), g.sha256) for h, g in files.items()}
    return summhay.build_rows(spec, topics, tokenizer)


_DOC_LINE = re.compile(r"^Document \[(\d+)\]\(Title: [^\n]*?\) ", re.M)


def musique_needle(doc: dict) -> tuple[int, int]:
    """Character span of the answer inside the last hop's paragraph of a MuSiQue prompt (else that paragraph)."""
    prompt, n = doc["prompt"], doc.get("last_hop_position")
    starts = {int(m.group(1)): m for m in _DOC_LINE.finditer(prompt)}
    if n not in starts:
        raise NeedlesError(f"MuSiQue row {doc.get('id')}: no last-hop paragraph in the prompt", fix="report this bug")
    lo = starts[n].end()
    hi = prompt.find("\n", lo)
    hi = len(prompt) if hi < 0 else hi
    text = prompt[lo:hi].lower()
    for ans in doc["answers"]:
        k = text.find(ans.lower()) if ans.strip() else -1
        if k >= 0:
            return lo + k, lo + k + len(ans)
    return lo, hi


def summhay_needle(doc: dict) -> tuple[int, int]:
    """Character span of the first gold document's ID in its header (``Article 3:``)."""
    prompt, first = doc["prompt"], doc["gold_ids"][0]
    m = re.search(rf"^(?:Article|Conversation|Document) ({first}):$", prompt, re.M)
    if m is None:
        raise NeedlesError(f"SummHay row {doc.get('insight_id')}: header {first} not found", fix="report this bug")
    return m.span(1)


def qa_probe(tokenizer: PreTrainedTokenizerBase, task: str, doc: dict, chat: bool, index: int = 0) -> Probe:
    """A MuSiQue or SummHay row as a probe (see the module doc for the needle)."""
    lo, hi = musique_needle(doc) if task == "musique" else summhay_needle(doc)
    text, offset = format_input(tokenizer, doc["prompt"], None, chat)
    ident = doc["id"] if task == "musique" else doc["insight_id"]
    answer = " | ".join(doc["answers"]) if task == "musique" else doc["target"]
    return Probe(
        probe_id=f"{task}/{ident}/s{doc.get('sample', index)}/len{doc['target_tokens']}/{doc['placement']}",
        family=task,
        text=text,
        needle=(offset + lo, offset + hi),
        answer=answer,
        doc=doc,
        meta={
            "length": doc["target_tokens"],
            "placement": doc["placement"],
            "needle_is_answer": task == "summhay" or doc["prompt"][lo:hi].lower() in map(str.lower, doc["answers"]),
        },
    )


def qa_probes(tokenizer: PreTrainedTokenizerBase, task: str, metadata: dict, chat: bool) -> list[Probe]:
    return [qa_probe(tokenizer, task, d, chat, i) for i, d in enumerate(qa_docs(task, tokenizer, metadata))]


def qa_success(probe: Probe, response: str) -> float:
    """The task's own per-item score of a reply: MuSiQue answer F1, SummHay citation F1."""
    return item_score(probe.family, probe.doc, response)


def item_score(task: str, doc: dict, reply: str) -> float:
    from harness_ext.tasklib import musique, summhay

    scorer = musique.process_results if task == "musique" else summhay.process_results
    return float(scorer(doc, [reply])[_METRIC[task]])


def placements_of(depths: Sequence[float]) -> list[str]:
    """``--eval-depths`` as placements of the key paragraphs: <= 1/3 early, >= 2/3 late, otherwise spread."""
    chosen = {"early" if d <= 1 / 3 else "late" if d >= 2 / 3 else "spread" for d in depths}
    return [p for p in ("early", "spread", "late") if p in chosen]


def qa_eval_set(
    lm,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int,
    max_new_tokens: int,
    metadata: dict,
) -> EvalSet:
    """Knockout / patching items of ``task``: its rows at ``lengths`` x placements, scored per item."""
    from harness_ext.heads.knockout import EvalSet

    prefix = "musique" if task == "musique" else "summhay"
    chosen = {f"{prefix}_lengths": list(lengths), f"{prefix}_placements": placements_of(depths)}
    chosen |= {_COUNT_KEY[task]: samples, f"{prefix}_seed": seed}
    docs = qa_docs(task, lm.tokenizer, {**metadata, **chosen})
    texts = [format_input(lm.tokenizer, d["prompt"], None, lm.chat)[0] for d in docs]

    def scorer(doc: dict):
        return lambda reply: item_score(task, doc, reply)

    sha = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return EvalSet(task, _METRIC[task], texts, [scorer(d) for d in docs], max_new_tokens, sha)
