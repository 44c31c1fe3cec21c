"""Prompts with a known needle for retrieval-head detection: NIAH, the plugin's KV task, MDQA (the
synthetic MDQA cells are in :mod:`harness_ext.heads.probes_synth`).

NIAH follows Wu et al.: a reference needle sentence inserted at a sentence boundary at a relative
depth of a filler haystack, then the question. The haystack is generated here (no network, no
corpus download): fluent, varied, deterministic sentences from small word lists and a seeded PCG64
generator, so the same seed gives the same bytes on every platform.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.heads.prompts import Probe, format_input
from harness_ext.tasklib.breakdowns import format_depth
from harness_ext.tasklib.metrics import rouge1_recall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Wu et al.'s retrieval-head prompt (system message and the question after the book).
NIAH_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
NIAH_USER = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
HAYSTACK_VERSION = 1

_SUBJECTS = [
    "The old farmer",
    "A young painter",
    "The village baker",
    "My neighbour",
    "The ship captain",
    "A quiet student",
    "The museum guide",
    "Our teacher",
    "The night watchman",
    "A travelling merchant",
    "The librarian",
    "The gardener",
    "A tired engineer",
    "The postman",
    "An elderly poet",
    "The mayor",
]
_VERBS = [
    "walked along",
    "painted",
    "talked about",
    "looked at",
    "wrote a letter about",
    "remembered",
    "cleaned",
    "visited",
    "described",
    "photographed",
    "repaired",
    "sketched",
    "forgot about",
    "admired",
]
_OBJECTS = [
    "the river bank",
    "the stone bridge",
    "an empty market",
    "the northern hills",
    "a wooden boat",
    "the tall lighthouse",
    "the orchard",
    "a crowded station",
    "the small chapel",
    "the harbour wall",
    "a field of barley",
    "the town square",
    "a broken clock",
    "the quiet forest",
    "the city library",
]
_TIMES = [
    "in the early morning",
    "after a long lunch",
    "before the storm",
    "on a grey afternoon",
    "late at night",
    "during the winter",
    "at the end of summer",
    "while it was raining",
    "on a market day",
    "just after sunrise",
]
_CLAUSES = [
    "and nobody seemed to notice",
    "because the weather had changed",
    "while a dog barked somewhere",
    "although it was already late",
    "as the bells started ringing",
    "and then went home to rest",
    "since there was nothing else to do",
    "and the wind grew colder",
    "as children played nearby",
    "and the light slowly faded",
]
_REMARKS = [
    "Some people say that patience is the rarest of skills.",
    "The road was longer than anyone expected.",
    "Few things are as calm as a slow river.",
    "Every town has a story that is told too often.",
    "It is strange how quickly a season passes.",
    "Good bread takes time and a warm kitchen.",
    "Old maps are rarely accurate but always beautiful.",
    "A long walk can settle a restless mind.",
    "The price of apples rose again that year.",
    "Nobody remembered who had planted the first tree.",
]


def haystack_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic filler sentences (platform independent: PCG64 integer draws only)."""
    rng = np.random.default_rng([seed, 7919, HAYSTACK_VERSION])
    out = []
    for _ in range(n):
        kind = int(rng.integers(4))
        if kind == 3:
            out.append(_REMARKS[int(rng.integers(len(_REMARKS)))])
            continue
        parts = [
            _SUBJECTS[int(rng.integers(len(_SUBJECTS)))],
            _VERBS[int(rng.integers(len(_VERBS)))],
            _OBJECTS[int(rng.integers(len(_OBJECTS)))],
        ]
        if kind >= 1:
            parts.append(_TIMES[int(rng.integers(len(_TIMES)))])
        if kind == 2:
            parts.append(_CLAUSES[int(rng.integers(len(_CLAUSES)))])
        out.append(" ".join(parts) + ".")
    return out


def load_needles(path: str | Path) -> list[dict]:
    """The NIAH needles of a JSONL in the reference format (needle, question, real_needle per line)."""
    fix = (
        "pass --needles FILE: a JSONL with needle/question/real_needle, such as haystack_for_detect/"
        "needles.jsonl of github.com/nightdessert/Retrieval_Head (or set NEEDLES_SHARED_DATA), "
        "or use --probes kv"
    )
    if Path(path).is_dir():
        raise NeedlesError(f"needles file {path} is a folder", fix=fix)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise NeedlesError(f"needles file {path} does not exist", fix=fix) from None
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise NeedlesError(f"cannot read needles from {path}: {exc}", fix=fix) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k] for k in ("needle", "question", "real_needle")
        ):
            raise NeedlesError(
                f"{path} line {i + 1} lacks needle/question/real_needle",
                fix="use the reference format of retrieval-head/needles.jsonl",
            )
    if not rows:
        raise NeedlesError(f"{path} holds no needles", fix="pass a non-empty needles JSONL")
    return rows


def _count(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    return [len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def niah_probe(
    tokenizer: PreTrainedTokenizerBase,
    needle: dict,
    length: int,
    depth: float,
    chat: bool,
    seed: int = 0,
    needle_index: int = 0,
) -> Probe:
    """A haystack of about ``length`` input tokens (chat template included) with the needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise NeedlesError(f"depth {depth} is outside [0, 1]", fix="give relative depths such as 0 0.5 1")
    pool = haystack_sentences(max(64, length // 6), seed)
    costs = np.cumsum(_count(tokenizer, [" " + s for s in pool]))

    def build(n: int) -> tuple[str, tuple[int, int]]:
        sents = pool[:n]
        k = int(round(depth * n))
        before, after = " ".join(sents[:k]), " ".join(sents[k:])
        context = " ".join(x for x in (before, needle["needle"], after) if x)
        user = NIAH_USER.format(context=context, question=needle["question"])
        text, offset = format_input(tokenizer, user, NIAH_SYSTEM, chat)
        start = offset + len("<book>") + (len(before) + 1 if before else 0)
        return text, (start, start + len(needle["needle"]))

    frame = _count(tokenizer, [build(0)[0]])[0]
    n = int(np.searchsorted(costs, length - frame, side="right"))
    if n == 0:
        raise NeedlesError(
            f"NIAH length {length} cannot hold the needle and the question ({frame} tokens)", fix="use longer --lengths"
        )
    text, span = build(n)
    while n > 1 and _count(tokenizer, [text])[0] > length:  # the per-sentence model is approximate
        n -= 1
        text, span = build(n)
    assert text[span[0] : span[1]] == needle["needle"]
    return Probe(
        probe_id=f"niah/n{needle_index}/len{length}/depth{format_depth(depth)}",
        family="niah",
        text=text,
        needle=span,
        answer=needle["real_needle"],
        meta={"length": length, "depth": depth, "needle_index": needle_index, "haystack_sentences": n},
    )


def niah_probes(
    tokenizer: PreTrainedTokenizerBase,
    needles: Sequence[dict],
    lengths: Sequence[int],
    depths: Sequence[float],
    chat: bool,
    seed: int = 0,
) -> list[Probe]:
    return [
        niah_probe(tokenizer, nd, length, depth, chat, seed, i)
        for i, nd in enumerate(needles)
        for length in lengths
        for depth in depths
    ]


def kv_probe(tokenizer: PreTrainedTokenizerBase, doc: dict, chat: bool, index: int = 0) -> Probe:
    """A KV-retrieval document (harness_ext.tasklib.kv_generator) as a probe: the gold value is the needle."""
    prompt = doc["prompt"]
    line_start = prompt.find(f"Dictionary [{doc['gold_dict']}] ")
    line_end = prompt.find("\n", line_start) if line_start >= 0 else -1
    line_end = len(prompt) if line_end < 0 else line_end
    value = re.compile(r"(?<!\d)" + re.escape(str(doc["gold_value"])) + r"(?!\d)")
    m = value.search(prompt, line_start, line_end) if line_start >= 0 else None
    if m is None:
        raise NeedlesError(
            f"KV document {index}: gold value not found in its gold dictionary", fix="report this as a bug"
        )
    text, offset = format_input(tokenizer, prompt, None, chat)
    depth = doc.get("depth")
    return Probe(
        probe_id=f"kv/s{doc.get('sample', index)}/len{doc.get('target_tokens')}/depth{_fmt(depth)}",
        family="kv",
        text=text,
        needle=(offset + m.start(), offset + m.end()),
        answer=str(doc["gold_value"]),
        doc=doc,
        meta={"length": doc.get("target_tokens"), "depth": depth, "variant": doc.get("variant")},
    )


def _fmt(depth) -> str:
    return format_depth(depth)


def kv_docs(
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int,
    seed: int,
    answer_template: bool = False,
    variant: str = "simple",
) -> list[dict]:
    """Documents exactly as the plugin's KV tasks build them (same generator, same spec fields)."""
    from harness_ext.tasklib.kv_generator import KVGenerator, KVSpec

    spec = KVSpec(
        variant=variant,
        answer_template=answer_template,
        num_samples=num_samples,
        seed=seed,
        lengths=tuple(int(x) for x in lengths),
        depths=tuple(float(d) for d in depths),
    )
    return KVGenerator(spec, tokenizer).generate()


def kv_probes(tokenizer: PreTrainedTokenizerBase, docs: Sequence[dict], chat: bool) -> list[Probe]:
    return [kv_probe(tokenizer, d, chat, i) for i, d in enumerate(docs)]


# ----------------------------------------------------------------------------------- MDQA
def mdqa_docs(metadata: dict) -> list[dict]:
    """MDQA documents exactly as the plugin's MDQA tasks build them (kv_tasks.mdqa, position sweep).

    ``metadata`` is what ``--metadata`` would hold for the ``mdqa_sweep`` task: mdqa_num_documents,
    mdqa_positions, mdqa_num_questions, and where the data live (mdqa_mirror, allow_unofficial_data).
    """
    try:
        from harness_ext.tasklib.mdqa import mdqa_dataset
    except ImportError:  # pragma: no cover - the MDQA family ships with the plugin
        raise NeedlesError("the MDQA task family is not installed", fix="use --probes niah kv") from None
    return list(mdqa_dataset(mdqa_task_kind="sweep", **metadata)["test"])


def mdqa_prompt(doc: dict) -> str:
    if isinstance(doc.get("prompt"), str):
        return doc["prompt"]
    from harness_ext.tasklib.mdqa import render_prompt

    return render_prompt(doc)


def mdqa_needle(doc: dict, prompt: str) -> tuple[int, int]:
    """Character span of the answer inside the gold document of an MDQA prompt.

    The gold document is the ``ctxs`` entry flagged ``isgold`` (Lost-in-the-Middle schema), found in
    the prompt by its rendered line ``Document [i](Title: ...) text``. The needle is the first answer
    string found (case-insensitively) in the gold text; when no answer is written out there verbatim,
    the whole gold passage text is the needle.
    """
    ctxs = doc.get("ctxs") or []
    gold = [(i, c) for i, c in enumerate(ctxs, start=1) if c.get("isgold")]
    if len(gold) != 1:
        raise NeedlesError(
            f"MDQA document {doc.get('qid')}: expected one gold passage, found {len(gold)}",
            fix="pass MDQA documents in the Lost-in-the-Middle schema (ctxs with isgold)",
        )
    i, ctx = gold[0]
    line = f"Document [{i}](Title: {ctx.get('title', '')}) "
    at = prompt.find(line)
    if at < 0 or not prompt.startswith(ctx["text"], at + len(line)):
        raise NeedlesError("MDQA document: the gold passage is not in the prompt", fix="report this as a bug")
    start = at + len(line)
    lowered = ctx["text"].lower()
    for ans in _answers(doc):
        k = lowered.find(ans.lower()) if ans.strip() else -1
        if k >= 0:
            return start + k, start + k + len(ans)
    return start, start + len(ctx["text"])


def _answers(doc: dict) -> list[str]:
    answers = doc.get("answers") or []
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def mdqa_probe(tokenizer: PreTrainedTokenizerBase, doc: dict, chat: bool, index: int = 0) -> Probe:
    """An MDQA document as a probe: the answer span inside the gold document is the needle."""
    prompt = mdqa_prompt(doc)
    lo, hi = mdqa_needle(doc, prompt)
    text, offset = format_input(tokenizer, prompt, None, chat)
    pos = doc.get("gold_position")
    return Probe(
        probe_id=f"mdqa/q{doc.get('qid', index)}/pos{pos}",
        family="mdqa",
        text=text,
        needle=(offset + lo, offset + hi),
        answer=" | ".join(_answers(doc)),
        doc=doc,
        meta={
            "gold_position": pos,
            "num_documents": doc.get("num_documents"),
            "needle_is_answer": prompt[lo:hi] != next(c["text"] for c in doc["ctxs"] if c.get("isgold")),
        },
    )


def mdqa_probes(tokenizer: PreTrainedTokenizerBase, docs: Sequence[dict], chat: bool) -> list[Probe]:
    return [mdqa_probe(tokenizer, d, chat, i) for i, d in enumerate(docs)]


# ----------------------------------------------------------------------------------- success checks
def success(probe: Probe, response: str) -> float:
    """The retrieval check: NIAH ROUGE-1 recall (Wu et al.), the tasks' own metric for KV, (synthetic) MDQA,
    MuSiQue and SummHay."""
    if probe.family == "kv":
        from harness_ext.tasklib.kv import process_results

        return process_results(probe.doc, [response])["value_acc"]
    if probe.family == "mdqa" or probe.family.startswith("synth_mdqa:"):
        from harness_ext.tasklib.metrics import best_subspan_em

        return best_subspan_em(response, _answers(probe.doc))
    if probe.family in ("musique", "summhay"):  # the tasks' own scorers (harness_ext.heads.probes_qa)
        from harness_ext.heads.probes_qa import qa_success

        return qa_success(probe, response)
    return rouge1_recall(probe.answer, response)
