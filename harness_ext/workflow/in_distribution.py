"""The in-distribution check of every finetune: the finetuned model (and the base, paired) scored on held-out
documents of the family it was trained on, reported before any transfer result.

A finetune that did not learn its own training task says nothing about transfer: a worse (or unchanged)
score on the other tasks is then no evidence about the data, only about the training run. The held-out
task of each training family (:func:`held_out_for`), and why its documents are never training documents:

======================================  ===============================  ==============================================
training data (``finetune.data``)       held-out lm-eval task, metric    disjoint from training by
======================================  ===============================  ==============================================
``kv`` simple / simple + template /     ``kv_retrieval_simple`` /        a generator seed training does not use (the
multisubkey                             ``..._simple_template`` /        tasks' 1000; training 0), document hashes and
                                        ``..._multisubkey``, value_acc   seeds checked by the finetune's leakage check
``synth_mdqa`` cell C (``real`` too)    ``synth_mdqa_C``,                the cell's eval split (random streams keyed by
                                        best_subspan_em                  split; real: NQ-Open questions split by hash),
                                                                         document and question hashes checked
``musique`` real                        ``musique``, answer_f1           MuSiQue's dev file (training reads train),
                                                                         question hashes checked
``summhay`` real                        ``summhay_citation``,            the haystacks the evaluation scores (training
                                        citation_f1                      reads the others), insights checked
``passkey``                             ``needles_passkey``,             a generator seed training does not use (the
                                        passkey_acc                      task's 0; training 1), document hashes checked
``musique`` / ``summhay`` symbolic,     none: no lm-eval task scores     (reported as unavailable)
templated                               the cells' eval-split rows
======================================  ===============================  ==============================================

Size: :data:`DEFAULT_DOCUMENTS` held-out documents in the training shape (lengths, positions or placements,
documents per prompt), overridable with ``in_distribution: {documents: N}`` (``in_distribution: false`` turns
the check off). The shape and size are ``--metadata`` keys, added only where no other suite task of the same
family reads them (one ``--metadata`` serves the whole evaluation, and a target's documents must not change);
otherwise the suite's settings govern and the report says which shape keys differ from training.

Verdict (two-sided, at the workflow's alpha): better with significance: learned; worse with significance:
"the finetune did not learn its own task: transfer results below are not interpretable"; otherwise "not shown
to learn its own task", with the MDE of the pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness_ext.core.errors import NeedlesError

ROLE = "in_distribution"  # the suite role of the check (never part of a claim's Holm family)
# 60 paired documents: an exact McNemar test at alpha 0.05 detects about a 20-point gain (the demo's held-out KV n)
DEFAULT_DOCUMENTS = 60
NOT_LEARNED = "the finetune did not learn its own task: transfer results below are not interpretable"
NOT_SHOWN = "the finetune was not shown to learn its own task"
LEARNED = "the finetune learned its own task"
CONSTANT = (
    "the finetune gives one reply to most held-out documents: its score is what the metric gives that reply, not "
    "evidence that it learned its own task"
)
# a reply given to half the documents answers the task's format, not each document (where a task has few possible
# answers a guess scores: on SummHay haystacks of four or five documents a fixed pair of IDs scores citation F1 ~0.5)
CONSTANT_SHARE = 0.5
# (variant, answer_template) of the KV training data -> the kv_retrieval task that draws the same documents
_KV_TASKS = {
    ("simple", False): "kv_retrieval_simple",
    ("simple", True): "kv_retrieval_simple_template",
    ("multisubkey", True): "kv_retrieval_multisubkey",
}
_KV_KNOBS = ("gold_dict_size", "dict_size_range", "key_digits", "value_digits", "subkeys", "common_subkeys")
_QA_TASKS = {"musique": ("musique", "answer_f1"), "summhay": ("summhay_citation", "citation_f1")}


@dataclass(frozen=True)
class HeldOut:
    """The in-distribution check of one training family: the lm-eval task and the ``--metadata`` it needs."""

    family: str  # "kv", "synth_mdqa:real", "musique:real", ...
    task: str | None  # None: no lm-eval task scores held-out documents of this family (``missing`` says why)
    metric: str = ""
    shape: dict = field(default_factory=dict)  # --metadata keys of the training shape (lengths, positions...)
    size: dict = field(default_factory=dict)  # --metadata keys of the number of held-out documents
    disjoint: str = ""  # why the held-out documents are never training documents
    missing: str = ""

    @property
    def label(self) -> str:
        return label(self.task)


def label(task: str) -> str:
    """How tables, the pilot and the plan name the check of a held-out task."""
    return f"{ROLE}:{task}"


def options(raw: object, where: str) -> dict:
    """``in_distribution:`` of a config, validated: ``{enabled, documents}`` (absent: on, DEFAULT_DOCUMENTS)."""
    fix = f"write `{where}: {{documents: {DEFAULT_DOCUMENTS}}}`, or `{where}: false` to leave the check out"
    if raw is None or raw is True:
        raw = {}
    if raw is False:
        raw = {"enabled": False}
    if not isinstance(raw, dict):
        raise NeedlesError(f"{where} {raw!r} is not a mapping", fix=fix)
    unknown = sorted(set(raw) - {"enabled", "documents"})
    if unknown:
        raise NeedlesError(f"{where} has unknown key(s) {unknown}", fix=fix)
    documents = raw.get("documents", DEFAULT_DOCUMENTS)
    if isinstance(documents, bool) or not isinstance(documents, int) or documents < 1:
        raise NeedlesError(f"{where}.documents {documents!r} is not a whole number >= 1", fix=fix)
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise NeedlesError(f"{where}.enabled {enabled!r} is not true or false", fix=fix)
    return {"enabled": enabled, "documents": documents}


def _per(documents: int, *counts: int) -> int:
    """Samples so that samples x (positions, lengths...) is at least ``documents``."""
    return max(1, math.ceil(documents / max(1, math.prod(counts))))


def _listed(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def held_out_for(data: dict, documents: int = DEFAULT_DOCUMENTS) -> HeldOut:
    """The held-out task of the training data ``data`` (a FinetuneConfig's ``data``, recipe merged)."""
    from harness_ext.finetune.data import train_spec
    from harness_ext.finetune.families import SynthTrainSpec
    from harness_ext.finetune.passkey_family import PasskeyTrainSpec

    spec = train_spec(data)
    if isinstance(spec, PasskeyTrainSpec):
        return _passkey(spec, documents)
    if not isinstance(spec, SynthTrainSpec):
        return _kv(spec, documents)
    s = spec.synth
    if spec.family == "synth_mdqa":
        from harness_ext.tasklib.synth_mdqa import CELLS

        knobs = CELLS[s.cell].knobs
        shape = {"synth_num_documents": s.num_documents, "synth_positions": list(s.positions)}
        if s.lengths:
            shape["synth_lengths"] = list(s.lengths)
        if "synth_facts_per_document" in knobs:
            shape["synth_facts_per_document"] = s.facts_per_document
        if "synth_reference_needles" in knobs and s.reference_needles:
            shape["synth_reference_needles"] = True
        size = {"synth_num_samples": _per(documents, len(s.positions), len(s.lengths or (None,)))}
        how = "NQ-Open questions of the eval split (by question hash)" if s.cell == "real" else "the eval split"
        return HeldOut(
            f"synth_mdqa:{s.cell}",
            f"synth_mdqa_{s.cell}",
            "best_subspan_em",
            shape,
            size,
            f"{how} of the cell (training draws the train split); document and question hashes checked by the "
            "finetune's leakage check",
        )
    family = f"{spec.family}:{s.cell}"
    if s.cell != "real":
        return HeldOut(
            family,
            None,
            missing=f"no lm-eval task scores held-out rows of the {family} cell (its eval split)",
        )
    task, metric = _QA_TASKS[spec.family]
    prefix = "musique" if spec.family == "musique" else "summhay"
    shape = {f"{prefix}_lengths": list(s.lengths), f"{prefix}_placements": list(s.placements)}
    count = _per(documents, len(s.lengths), len(s.placements))
    if spec.family == "musique":
        size = {"musique_num_questions": count}
        how = "MuSiQue's dev file (training reads the train file); question hashes checked by the leakage check"
    else:
        shape["summhay_num_gold"] = s.num_gold
        size = {"summhay_num_insights": count}
        how = "the haystacks the evaluation scores (training reads the others); insights and haystacks checked"
    return HeldOut(family, task, metric, shape, size, how)


def _passkey(spec, documents: int) -> HeldOut:
    g = spec.grid
    shape = {"passkey_lengths": list(g.lengths), "passkey_depths": list(g.depths)}
    return HeldOut(
        "passkey",
        "needles_passkey",
        "passkey_acc",
        shape,
        {"passkey_num_samples": _per(documents, len(g.lengths), len(g.depths))},
        f"a generator seed training does not use (the task's seed, 0 by default; training {g.seed}); document "
        "hashes checked by the finetune's leakage check",
    )


def _kv(spec, documents: int) -> HeldOut:
    from harness_ext.tasklib.kv_generator import KVSpec

    task = _KV_TASKS.get((spec.variant, bool(spec.answer_template)), f"kv_retrieval_{spec.variant}")
    shape: dict = {"depths": _listed(spec.depths)}
    if spec.lengths:
        shape["lengths"] = list(spec.lengths)
    else:
        shape |= {"lengths": None, "num_dicts": spec.num_dicts}
    default = KVSpec()
    shape |= {k: _listed(getattr(spec, k)) for k in _KV_KNOBS if getattr(spec, k) != getattr(default, k)}
    size = {"num_samples": _per(documents, len(spec.lengths or (None,)), len(spec.depths or (None,)))}
    return HeldOut(
        "kv",
        task,
        "value_acc",
        shape,
        size,
        f"a generator seed training does not use (the task's seed, 1000 by default; training {spec.seed}); "
        "document hashes and seeds checked by the finetune's leakage check",
    )


def metadata_family(task: str) -> str | None:
    """The ``--metadata`` family whose keys ``task`` reads (harness_ext.tasklib.metadata_keys)."""
    for prefix, family in (
        ("kv_retrieval", "kv_retrieval"),
        ("synth_mdqa", "synth_mdqa"),
        ("musique", "musique"),
        ("summhay", "summhay"),
        ("needles_passkey", "passkey"),
    ):
        if task == prefix or task.startswith(prefix + "_"):
            return family
    return None


def merged_metadata(metadata: dict, check: HeldOut, other_tasks: list[str]) -> tuple[dict, dict]:
    """(metadata with the check's shape and size keys added, the shape keys scored otherwise than trained).

    Keys are added only when no task of ``other_tasks`` reads the check's family (their documents must stay
    what the config says) and the key is not set; a set key, or a shared family, keeps the config's value."""
    family = metadata_family(check.task or "")
    shared = any(metadata_family(t) == family for t in other_tasks if t != check.task) or check.task in other_tasks
    out = dict(metadata)
    if not shared:
        for key, value in {**check.shape, **check.size}.items():
            out.setdefault(key, value)
    differs = {
        key: {"trained": value, "scored": out.get(key, "the task's default")}
        for key, value in check.shape.items()
        if out.get(key, "the task's default") != value
    }
    return out, differs


def modal_reply(run, task: str, filter_: str = "none") -> dict | None:
    """The run's most common reply to the task's documents, ``{"reply", "count", "n"}`` (stripped text), from its
    sample logs; None when it has none or the task generates no text."""
    from collections import Counter

    from harness_ext.reporting.reply_form import reply_text
    from harness_ext.reporting.results_io import iter_samples
    from harness_ext.workflow.paired import leaf_tasks

    replies: Counter = Counter()
    for leaf in leaf_tasks(run, task):
        path = run.samples_path(leaf)
        if path is None:
            return None
        for row in iter_samples(path):
            if row.get("filter", "none") == filter_ and ("resps" in row or "filtered_resps" in row):
                replies[reply_text(row).strip()] += 1
    if not replies:
        return None
    reply, count = replies.most_common(1)[0]
    return {"reply": reply, "count": count, "n": sum(replies.values())}


def verdict(delta: float, p: float, alpha: float, mde_text: str | None, modal: dict | None = None) -> tuple[str, str]:
    """(status, sentence) of a paired two-sided test of finetuned - base on the held-out documents; ``modal``: the
    finetuned run's most common reply (:func:`modal_reply`), which turns a significant gain given by one reply to
    most documents into "constant"."""
    if p < alpha and delta > 0:
        if modal and modal["count"] >= CONSTANT_SHARE * modal["n"]:
            quoted = modal["reply"] if len(modal["reply"]) <= 40 else modal["reply"][:40] + "..."
            return "constant", f"{CONSTANT} ({modal['count']} of {modal['n']} replies are {quoted!r})"
        return "learned", LEARNED
    if p < alpha and delta < 0:
        return "not_learned", NOT_LEARNED
    return "not_shown", NOT_SHOWN + (f" ({mde_text})" if mde_text else "")
