"""Training data for ``needles finetune``: generation, leakage check, chat formatting, batching.

The documents come from the same :class:`~harness_ext.tasklib.kv_generator.KVGenerator` as the
``kv_retrieval`` tasks, from a seed the evaluation does not use (``data: {family: kv}``, the default),
or from the train split of a synthetic MDQA cell (``data: {family: synth_mdqa, cell: ...}``,
:mod:`harness_ext.finetune.families`) or passkey documents (``data: {family: passkey}``,
:mod:`harness_ext.finetune.passkey_family`); :mod:`harness_ext.finetune.leakage` checks them against the
evaluation set. Each document becomes one chat
turn pair (user = prompt, assistant = target) rendered with the model's chat template exactly
the way lm-eval renders it at evaluation time (``--apply_chat_template``); the assistant turn is
trained on (``loss_on: answer``, the default), or every token (``loss_on: all``).

Batching never truncates and never lets packed samples attend to each other:

- ``grouped`` (default): samples of similar length share a micro-batch (HF-style mega-batch
  sort), left padding, so padding is small and every answer ends at the last position;
- ``padded``: random order, padded to the longest sample of the batch (the plain baseline);
- ``packed``: samples concatenated into rows of at most ``pack_tokens`` tokens with
  ``position_ids`` restarting at 0 per sample and no 2-D attention mask. transformers turns that
  into a block-diagonal causal mask (sdpa/eager) or varlen kernels (flash-attention), so a token
  only ever attends inside its own sample (tests/finetune/test_finetune_data.py checks the logits). This
  needs ``use_cache=False`` in the forward call: with a KV cache transformers skips the detection.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import BATCHING_MODES
from harness_ext.finetune.families import SynthTrainSpec, data_family, kv_keys_fix, synth_train_docs, synth_train_spec
from harness_ext.finetune.leakage import (  # noqa: F401 - eval_docs, docs_sha256: this module's public names too
    LeakageReport,
    check_family_leakage,
    check_no_leakage,
    docs_sha256,
    eval_docs,
    expand_eval_tasks,
    expand_family_tasks,
)
from harness_ext.finetune.passkey_family import (
    PASSKEY_FAMILY,
    PasskeyTrainSpec,
    passkey_train_docs,
    passkey_train_spec,
)

EVAL_SEED_DEFAULT = 1000  # kv_retrieval YAML metadata
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- generation
def train_spec(data: dict) -> Any:
    """The spec of the training set: a KVSpec for the ``kv`` family (the default), else the family's spec
    (:func:`harness_ext.finetune.families.synth_train_spec`). Unlike the KV eval tasks, the gold position is
    uniform (``depths`` None, as in the reference generator) unless the caller sets depths."""
    from harness_ext.tasklib.kv_generator import KVSpec

    family = data_family(data)
    if family == PASSKEY_FAMILY:
        return passkey_train_spec(data)
    if family != "kv":
        return synth_train_spec(data)
    known = {f.name for f in fields(KVSpec)}
    unknown = sorted(set(data) - known - {"family"})
    if unknown:
        raise NeedlesError(f"unknown data key(s) {unknown}", fix=kv_keys_fix(unknown, sorted(known)))
    kwargs = {k: v for k, v in data.items() if k != "family"}
    kwargs.setdefault("depths", None)
    for key in ("lengths", "depths", "dict_size_range", "key_digits", "value_digits"):
        if kwargs.get(key) is not None:
            value = kwargs[key]
            kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    spec = KVSpec(**kwargs)
    spec.validate()
    return spec


def prepare_docs(cfg: Any, tokenizer: Any, base: str) -> tuple[Any, list[str], list[dict], LeakageReport]:
    """(spec, eval tasks, training documents, leakage report): documents of the data family of ``cfg``
    (a FinetuneConfig), checked against its evaluation set."""
    spec = train_spec(cfg.data)
    if isinstance(spec, PasskeyTrainSpec):
        tasks = expand_family_tasks(cfg.eval_tasks)
        docs = passkey_train_docs(spec, tokenizer)
        return spec, tasks, docs, check_family_leakage(docs, spec.family, tasks, cfg.eval_metadata, base, tokenizer)
    if isinstance(spec, SynthTrainSpec):
        tasks = expand_family_tasks(cfg.eval_tasks)
        docs = synth_train_docs(spec, cfg.eval_metadata, base)
        leak = check_family_leakage(docs, spec.family, tasks, cfg.eval_metadata, base, tokenizer)
        return spec, tasks, docs, leak
    tasks = expand_eval_tasks(cfg.eval_tasks)
    docs = generate_docs(spec, tokenizer)
    leak = check_no_leakage(docs, spec.seed, tasks, cfg.eval_metadata, base)
    return spec, tasks, docs, leak


def generate_docs(spec: Any, tokenizer: Any) -> list[dict]:
    from harness_ext.tasklib.kv_generator import KVGenerator

    return KVGenerator(spec, tokenizer).generate()


# --------------------------------------------------------------------------- chat formatting
@dataclass
class Example:
    """One tokenized training sample: the chat prompt, then the assistant turn; ``loss_on`` says which tokens are
    trained on (``answer``: the assistant turn; ``all``: every token but the first, which nothing predicts)."""

    input_ids: list[int]
    n_prompt: int  # tokens before the assistant answer
    loss_on: str = "answer"

    @property
    def n_unlabelled(self) -> int:
        """Leading tokens without a label: the prompt (``answer``), or only the first token (``all``)."""
        return self.n_prompt if self.loss_on == "answer" else 1

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.n_unlabelled + self.input_ids[self.n_unlabelled :]

    def __len__(self) -> int:
        return len(self.input_ids)


def require_chat_template(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise NeedlesError(
            f"the tokenizer of {name} has no chat template",
            fix="finetune an instruct/chat model (lm_eval --apply_chat_template needs one too)",
        )


def chat_messages(prompt: str, target: str | None = None, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    if target is not None:
        msgs.append({"role": "assistant", "content": target})
    return msgs


def format_example(
    tokenizer: Any, prompt: str, target: str, system: str | None = None, loss_on: str = "answer"
) -> Example:
    """Tokens exactly as lm-eval's vLLM backend sees the prompt, plus the assistant turn.

    The prompt is rendered with ``add_generation_prompt=True`` and encoded on its own (as lm-eval
    does, adding special tokens unless the template already starts with BOS); the assistant turn
    is the rest of the full rendered conversation (answer + end-of-turn), encoded separately so
    the prompt tokens are byte-for-byte those of the evaluation.
    """
    prompt_text = tokenizer.apply_chat_template(
        chat_messages(prompt, None, system), tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(chat_messages(prompt, target, system), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise NeedlesError(
            "the chat template renders the conversation differently once the answer is added",
            fix="use a model whose chat template keeps the prompt as a prefix of the full conversation",
        )
    bos = tokenizer.bos_token
    special = not (bos and prompt_text.startswith(bos))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise NeedlesError("an assistant answer encodes to 0 tokens", fix="check the data's target field")
    return Example(list(prompt_ids) + list(answer_ids), len(prompt_ids), loss_on)


def format_docs(tokenizer: Any, docs: list[dict], system: str | None = None, loss_on: str = "answer") -> list[Example]:
    return [format_example(tokenizer, d["prompt"], d["target"], system, loss_on) for d in docs]


def check_lengths(examples: list[Example], model_max: int | None, max_length: int | None) -> int:
    """The training sequence length: the longest example. Never truncated: too long -> error. ``model_max`` is
    the window the run trains with: the model's, or the extended one of a ``context`` section."""
    longest = max(len(e) for e in examples)
    if max_length is not None and longest > max_length:
        raise NeedlesError(
            f"the longest training example has {longest} tokens, more than max_length={max_length}",
            fix="raise max_length or lower the data lengths (examples are never truncated)",
        )
    if model_max is not None and longest > model_max:
        raise NeedlesError(
            f"the longest training example has {longest} tokens; the model holds at most {model_max}",
            fix="lower the data lengths (e.g. --lengths 512), or extend the window past them "
            "(--context-length N --rope-type yarn; docs/extension.md)",
        )
    return longest


# --------------------------------------------------------------------------- batching
def plan_batches(
    lengths: list[int], batch_size: int, mode: str, seed: int, epoch: int, pack_tokens: int | None = None
) -> list[list[int]]:
    """Micro-batches (lists of example indices) for one epoch; deterministic in (seed, epoch)."""
    if mode not in BATCHING_MODES:
        raise NeedlesError(f"unknown batching mode {mode!r}", fix=f"use one of {list(BATCHING_MODES)}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lens = np.asarray(lengths)
    if mode == "padded":
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if mode == "packed":
        return _pack(order, lens, pack_tokens or batch_size * int(lens.max()))
    # grouped: sort inside mega-batches of 50 batches (keeps randomness), then shuffle the batches
    mega = batch_size * 50
    batches = []
    for i in range(0, len(order), mega):
        chunk = order[i : i + mega]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches.extend(chunk[j : j + batch_size].tolist() for j in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


def _pack(order: np.ndarray, lens: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most ``capacity`` tokens; bin order stays random."""
    if int(lens.max()) > capacity:
        raise NeedlesError(
            f"pack_tokens={capacity} is shorter than the longest example ({int(lens.max())})", fix="raise pack_tokens"
        )
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(order.tolist(), key=lambda i: -lens[i]):
        for b, free in enumerate(room):
            if lens[idx] <= free:
                bins[b].append(idx)
                room[b] -= int(lens[idx])
                break
        else:
            bins.append([idx])
            room.append(capacity - int(lens[idx]))
    first = {b: min(order.tolist().index(i) for i in members) for b, members in enumerate(bins)}
    return [bins[b] for b in sorted(first, key=first.get)]


def collate(examples: list[Example], mode: str, pad_id: int) -> dict:
    """Tensors for one micro-batch plus ``logits_to_keep`` (only labelled positions need logits).

    grouped/padded: left padding, so every labelled span ends at the last position and the last
    ``A + 1`` positions hold all logits the loss needs (A = longest labelled span: the answer, or the
    whole sample but its first token with ``loss_on: all``); position_ids count real tokens only.
    packed: one row, position_ids restart per sample, no attention mask; a sample's first token is
    never a label, so no sample is trained to follow the one packed before it.
    """
    import torch

    if mode == "packed":
        ids, pos, labels = [], [], []
        for e in examples:
            ids += e.input_ids
            pos += list(range(len(e)))
            labels += e.labels
        keep = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "logits_to_keep": torch.tensor(keep),
            "labels": torch.tensor([[labels[t + 1] for t in keep]]),
        }
    width = max(len(e) for e in examples)
    answer = max(len(e) - e.n_unlabelled for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), answer), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, width - len(e) :] = torch.tensor(e.input_ids)
        mask[r, width - len(e) :] = 1
        n_answer = len(e) - e.n_unlabelled
        labels[r, answer - n_answer :] = torch.tensor(e.input_ids[e.n_unlabelled :])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # logits at positions width-answer-1 .. width-2 predict the label tokens at width-answer .. width-1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "logits_to_keep": answer + 1,
        "labels": labels,
    }


def label_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def loss_sum(logits: Any, batch: dict) -> Any:
    """Summed token cross-entropy over the labelled tokens of a collated batch (fp32)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    if isinstance(batch["logits_to_keep"], int):
        logits = logits[:, :-1, :]  # the last position predicts past the end
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def data_summary(examples: list[Example]) -> dict:
    lens = np.array([len(e) for e in examples])
    answers = np.array([len(e) - e.n_prompt for e in examples])
    return {
        "examples": len(examples),
        "tokens": int(lens.sum()),
        "answer_tokens": int(answers.sum()),
        "trained_tokens": int(sum(len(e) - e.n_unlabelled for e in examples)),
        "min_len": int(lens.min()),
        "max_len": int(lens.max()),
        "mean_len": round(float(lens.mean()), 1),
    }


def write_docs(path: Path, docs: list[dict]) -> None:
    from harness_ext.core.atomic_io import write_jsonl_atomic

    write_jsonl_atomic(path, docs)
