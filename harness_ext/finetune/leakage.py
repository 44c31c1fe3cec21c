"""The leakage check of ``needles finetune``: training documents must not occur in the evaluation set.

The run's evaluation set is what ``lm_eval --tasks EVAL_TASKS --metadata EVAL_METADATA`` would score,
built here with the tasks' own generators and cache (the YAML's metadata < ``--eval-metadata`` <
``pretrained``). The KV family (:func:`check_no_leakage`) compares document hashes and generator
seeds with the ``kv_retrieval`` tasks. The other families (:func:`check_family_leakage`) are checked
against any task or group of the ``kv_retrieval``, ``synth_mdqa``, ``mdqa`` and ``niah`` folders:
by document hash, and for every evaluation item with a question by question hash
(:func:`harness_ext.tasklib.real_baseline.check_no_leakage`, the real-data baseline's check).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness_ext.core.errors import NeedlesError
from harness_ext.data.dataset_cache import dataset_sha256

# custom_dataset function -> (variant, answer_template), as in kv_tasks/kv_retrieval/utils.py
_DATASET_FNS = {"simple": ("simple", False), "simple_template": ("simple", True), "multisubkey": ("multisubkey", True)}
# task folders whose evaluation items the other families are checked against
FAMILY_TASK_FOLDERS = ("kv_retrieval", "synth_mdqa", "mdqa", "niah", "musique", "summhay", "passkey")


def docs_sha256(docs: list[dict]) -> str:
    """SHA-256 over the documents' ``doc_sha256`` in order (the tasks' ``needles_data_sha256``)."""
    return dataset_sha256(docs)


# --------------------------------------------------------------------------- the KV family
def _kv_task_dir() -> Path:
    from harness_ext.plugin.registration import tasks_dir

    return tasks_dir() / "kv_retrieval"


def _task_yaml(task: str) -> dict:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = _kv_task_dir() / f"{task}.yaml"
    if not path.is_file():
        tasks = sorted(p.stem for p in _kv_task_dir().glob("kv_retrieval_*.yaml"))
        raise NeedlesError(f"unknown evaluation task {task!r}", fix=f"use one of {tasks} (or the group kv_retrieval)")
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def expand_eval_tasks(tasks: Iterable[str]) -> list[str]:
    """Task names with the ``kv_retrieval`` group replaced by its members, each checked to exist."""
    import yaml

    out: list[str] = []
    for task in tasks:
        if task == "kv_retrieval":
            with open(_kv_task_dir() / "kv_retrieval.yaml", encoding="utf-8") as f:
                members = list(yaml.safe_load(f)["task"])
        else:
            _task_yaml(task)
            members = [task]
        out.extend(t for t in members if t not in out)
    return out


def eval_metadata_for(task: str, eval_metadata: dict, pretrained: str) -> tuple[dict, str, bool]:
    """The metadata lm-eval hands the task's custom_dataset (YAML defaults < --metadata < model_args)."""
    cfg = _task_yaml(task)
    fn = str(cfg["custom_dataset"]).rsplit(".", 1)[-1]
    if fn not in _DATASET_FNS:
        raise NeedlesError(f"task {task!r} is not a KV-retrieval task", fix="point --eval-tasks at kv_retrieval_*")
    metadata = {**cfg.get("metadata", {}), **eval_metadata, "pretrained": pretrained}
    variant, answer_template = _DATASET_FNS[fn]
    return metadata, variant, answer_template


def eval_docs(task: str, eval_metadata: dict, pretrained: str) -> list[dict]:
    """The documents ``lm_eval --tasks TASK --metadata EVAL_METADATA`` would score (same cache)."""
    from harness_ext.tasklib.kv import kv_dataset

    metadata, variant, answer_template = eval_metadata_for(task, eval_metadata, pretrained)
    return kv_dataset(variant, answer_template, metadata)["test"].to_list()


@dataclass
class LeakageReport:
    tasks: list[str]
    eval_docs: int
    eval_seeds: list[int]
    overlap: int = 0
    eval_max_tokens: int = 0  # longest eval prompt (tokens before the chat template)
    eval_data_sha256: dict[str, str] = field(default_factory=dict)


def check_no_leakage(
    train: list[dict], train_seed: int, tasks: list[str], eval_metadata: dict, pretrained: str
) -> LeakageReport:
    """Refuse training data that shares a document (hash) or a generator seed with the eval set.

    The hash check is the hard guarantee; the seed check also catches the same dictionaries
    rendered at another depth or length, whose hashes differ.
    """
    train_hashes = {d["doc_sha256"] for d in train}
    report = LeakageReport(tasks=list(tasks), eval_docs=0, eval_seeds=[])
    for task in tasks:
        metadata, *_ = eval_metadata_for(task, eval_metadata, pretrained)
        seed = int(metadata.get("seed", 0))
        report.eval_seeds.append(seed)
        if seed == train_seed:
            raise NeedlesError(
                f"training seed {train_seed} is the seed of the evaluation set {task}",
                fix=f"pick a training seed other than {seed} (e.g. --seed 0)",
            )
        docs = eval_docs(task, eval_metadata, pretrained)
        report.eval_docs += len(docs)
        report.eval_max_tokens = max([report.eval_max_tokens] + [int(d.get("n_tokens") or 0) for d in docs])
        report.eval_data_sha256[task] = docs_sha256(docs)
        shared = train_hashes & {d["doc_sha256"] for d in docs}
        report.overlap += len(shared)
        if shared:
            raise NeedlesError(
                f"{len(shared)} training document(s) also appear in the evaluation set {task}",
                fix="use a different training seed or data parameters",
            )
    return report


# --------------------------------------------------------------------------- the other families
def _load_task_yaml(path: Path) -> dict:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(path, encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=_Loader) or {}
    if "include" in cfg:  # lm-eval's rule: the task's own keys override the included template's
        cfg = {**_load_task_yaml(path.parent / cfg["include"]), **cfg}
    return cfg


def task_config(task: str) -> tuple[str, dict]:
    """(folder, YAML with its ``include`` merged) of a task or group in :data:`FAMILY_TASK_FOLDERS`."""
    from harness_ext.plugin.registration import tasks_dir

    for folder in FAMILY_TASK_FOLDERS:
        path = tasks_dir() / folder / f"{task}.yaml"
        if path.is_file():
            return folder, _load_task_yaml(path)
    raise NeedlesError(
        f"unknown evaluation task {task!r} (or one the leakage check cannot build)",
        fix=f"use tasks or groups of {', '.join(FAMILY_TASK_FOLDERS)}, e.g. synth_mdqa_templated_entities or mdqa20",
    )


def expand_family_tasks(tasks: Iterable[str]) -> list[str]:
    """Task names with every group replaced by its members (recursively), each checked to exist."""
    out: list[str] = []

    def add(task: str) -> None:
        _folder, cfg = task_config(task)
        if "group" in cfg:
            for member in cfg.get("task") or []:
                add(member if isinstance(member, str) else member["task"])
        elif task not in out:
            out.append(task)

    for task in tasks:
        add(task)
    return out


def task_docs(task: str, eval_metadata: dict, pretrained: str) -> list[dict]:
    """The documents ``lm_eval --tasks TASK --metadata EVAL_METADATA`` would score (same generators, same cache)."""
    folder, cfg = task_config(task)
    if folder == "kv_retrieval":
        return eval_docs(task, eval_metadata, pretrained)
    metadata = {**(cfg.get("metadata") or {}), **eval_metadata, "pretrained": pretrained}
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if folder == "synth_mdqa":
        from harness_ext.tasklib.synth_mdqa import synth_dataset

        dataset = synth_dataset(**kwargs, **metadata)
    elif folder == "mdqa":
        from harness_ext.tasklib.mdqa import mdqa_dataset

        dataset = mdqa_dataset(**kwargs, **metadata)
    elif folder in ("musique", "summhay"):  # the study's other two tasks: the rows lm_eval scores (same cache)
        from harness_ext.tasklib.musique import musique_dataset
        from harness_ext.tasklib.summhay import summhay_dataset

        dataset = (musique_dataset if folder == "musique" else summhay_dataset)(**metadata)
    elif folder == "passkey":
        from harness_ext.tasklib.passkey import passkey_dataset

        dataset = passkey_dataset(task, metadata)
    else:
        from harness_ext.tasklib.niah import niah_dataset

        dataset = niah_dataset(str(cfg["custom_dataset"]).rsplit(".", 1)[-1], metadata)
    return dataset["test"].to_list()


def _eval_tokens(docs: list[dict], tokenizer: Any) -> int:
    """The longest prompt in tokens: the documents' own count, else counted (MDQA documents carry none)."""
    from harness_ext.tasklib.mdqa import render_prompt
    from harness_ext.tasklib.token_budget import count_tokens

    known = [int(d["n_tokens"]) for d in docs if d.get("n_tokens")]
    missing = [d.get("prompt") or render_prompt(d) for d in docs if not d.get("n_tokens")]
    counted = count_tokens(tokenizer, missing) if missing and tokenizer is not None else []
    return max([0, *known, *counted])


@dataclass
class FamilyLeakageReport(LeakageReport):
    family: str = ""
    eval_questions: int = 0  # distinct evaluation questions whose hash was compared with the training questions


def check_family_leakage(
    train: list[dict], family: str, tasks: list[str], eval_metadata: dict, pretrained: str, tokenizer: Any = None
) -> FamilyLeakageReport:
    """Refuse training documents that share a document hash, or a question hash, with an evaluation item."""
    from harness_ext.finetune.passkey_family import PASSKEY_FAMILY
    from harness_ext.tasklib.real_baseline import check_no_leakage as check_questions
    from harness_ext.tasklib.real_baseline import question_hash

    train_hashes = {d["doc_sha256"] for d in train}
    report = FamilyLeakageReport(tasks=list(tasks), eval_docs=0, eval_seeds=[], family=family)
    for task in tasks:
        folder, _cfg = task_config(task)
        docs = task_docs(task, eval_metadata, pretrained)
        report.eval_docs += len(docs)
        report.eval_max_tokens = max(report.eval_max_tokens, _eval_tokens(docs, tokenizer))
        hashed = all(isinstance(d.get("doc_sha256"), str) for d in docs)
        report.eval_data_sha256[task] = docs_sha256(docs) if hashed else _json_sha256(docs)
        shared = train_hashes & {d.get("doc_sha256") for d in docs}
        report.overlap += len(shared)
        if shared:
            raise NeedlesError(
                f"{len(shared)} training document(s) also appear in the evaluation set {task}",
                fix="train on the train split (the default) and evaluate on the eval split",
            )
        asked = [d for d in docs if isinstance(d.get("question"), str)]
        # passkey training documents all ask "What is the pass key?" and SummHay's ask none (their insights and
        # haystacks are compared below): no question of theirs can be an evaluation item's, so only their document
        # hashes are compared (a NIAH, MDQA or MuSiQue target beside such a finetune)
        if asked and family not in (PASSKEY_FAMILY, "summhay"):
            try:
                check_questions(train, asked)
            except NeedlesError as exc:  # name the evaluation set: one run may be checked against several
                fix = f"{exc.fix}; or leave {task} out of --eval-tasks (its questions are not all held out)"
                raise NeedlesError(f"evaluation set {task}: {exc.problem}", fix=fix) from None
            report.eval_questions += len({question_hash(d["question"]) for d in asked})
        if folder == "summhay":  # no questions: insights and haystacks (harness_ext.tasklib.qa_cells)
            from harness_ext.tasklib.qa_cells import check_overlap

            report.eval_questions += check_overlap(train, docs, task)
    return report


def _json_sha256(docs: list[dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(docs, sort_keys=True, default=str).encode()).hexdigest()
