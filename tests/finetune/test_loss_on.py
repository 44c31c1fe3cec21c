"""``loss_on``: the answer only (default) or every token of the long document (the language-modelling loss of
context extension), down to the labels of a collated batch; and the passkey training family it is used with."""

from __future__ import annotations

import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import FinetuneConfig, validate_hparams
from harness_ext.finetune.data import IGNORE_INDEX, collate, data_summary, format_example, train_spec
from harness_ext.finetune.passkey_family import TRAIN_SEED, PasskeyTrainSpec


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


PROMPT, TARGET = "The grass is green. The pass key is 68412. What is the pass key?", "68412"


def test_answer_labels_only_the_assistant_turn(tokenizer):
    e = format_example(tokenizer, PROMPT, TARGET)
    assert e.labels[: e.n_prompt] == [IGNORE_INDEX] * e.n_prompt and e.labels[e.n_prompt :] == e.input_ids[e.n_prompt :]
    assert "68412" in tokenizer.decode(e.input_ids[e.n_prompt :]) and "68412" in tokenizer.decode(e.input_ids)


def test_all_labels_every_token_but_the_first(tokenizer):
    answer = format_example(tokenizer, PROMPT, TARGET)
    e = format_example(tokenizer, PROMPT, TARGET, loss_on="all")
    assert e.input_ids == answer.input_ids and e.n_prompt == answer.n_prompt  # same tokens, other labels
    assert e.labels == [IGNORE_INDEX] + e.input_ids[1:]
    assert data_summary([e])["trained_tokens"] == len(e) - 1 and data_summary([answer])["trained_tokens"] < 10


@pytest.mark.parametrize("mode", ["grouped", "packed"])
def test_collated_labels_follow_loss_on(tokenizer, mode):
    """The labels the loss reads, shifted as the logits are: every next token of each sample (all), or only the
    answer's (answer); left padding and a packed neighbour are never labels."""
    short = format_example(tokenizer, "Hi.", "1", loss_on="all")
    long = format_example(tokenizer, PROMPT, TARGET, loss_on="all")
    batch = collate([short, long], mode, pad_id=0)
    labels = batch["labels"]
    if mode == "grouped":
        assert batch["logits_to_keep"] == len(long)  # every position of the longest sample but its last
        assert labels[1].tolist() == long.input_ids[1:]
        assert labels[0].tolist() == [IGNORE_INDEX] * (len(long) - len(short)) + short.input_ids[1:]
    else:
        kept = labels[0].tolist()
        assert kept == short.input_ids[1:] + long.input_ids[1:]  # the long sample's first token is not a label
        assert len(batch["logits_to_keep"]) == len(short) + len(long) - 2
    answer_batch = collate([format_example(tokenizer, PROMPT, TARGET)], mode, pad_id=0)
    n_answer = int((answer_batch["labels"] != IGNORE_INDEX).sum())
    assert n_answer == len(long) - long.n_prompt and int((labels != IGNORE_INDEX).sum()) > 4 * n_answer


def test_loss_on_is_checked_and_recorded():
    with pytest.raises(NeedlesError, match="loss_on"):
        validate_hparams(FinetuneConfig(loss_on="prompt"))
    import dataclasses

    from harness_ext.finetune.rundir import config_fingerprint

    a, b = FinetuneConfig(), FinetuneConfig(loss_on="all")
    assert dataclasses.asdict(b)["loss_on"] == "all"  # the manifest's hyperparameters hold every field
    assert config_fingerprint(a) != config_fingerprint(b)  # a resumed run cannot switch the loss


def test_passkey_family_spec():
    spec = train_spec({"family": "passkey", "lengths": [2048, 11264], "depths": [0.2, 0.8], "num_samples": 3})
    assert isinstance(spec, PasskeyTrainSpec) and spec.seed == TRAIN_SEED != 0  # the task scores seed 0
    assert spec.documents() == 12 and spec.to_json()["lengths"] == (2048, 11264)
    with pytest.raises(NeedlesError, match="do not apply to the passkey family"):
        train_spec({"family": "passkey", "variant": "simple"})
    with pytest.raises(NeedlesError, match="passkey_depths"):
        train_spec({"family": "passkey", "depths": [1.5]})


def test_passkey_training_documents_are_not_the_scored_ones(smollm2_dir):
    """The documents train on seed 1; the leakage check loads the task's seed-0 documents and compares hashes."""
    from harness_ext.finetune.data import prepare_docs

    cfg = FinetuneConfig(
        model=str(smollm2_dir),
        data={"family": "passkey", "lengths": [256], "depths": [0.5], "num_samples": 2},
        eval_tasks=["needles_passkey"],
        eval_metadata={"passkey_lengths": [256], "passkey_depths": [0.5], "passkey_num_samples": 2},
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    spec, tasks, docs, leak = prepare_docs(cfg, tok, str(smollm2_dir))
    assert tasks == ["needles_passkey"] and len(docs) == 2 and leak.eval_docs == 2 and leak.overlap == 0
    assert all(d["target"] in d["prompt"] and d["n_tokens"] == 256 for d in docs)
    same = FinetuneConfig(**{**cfg.__dict__, "data": {**cfg.data, "seed": 0}})
    with pytest.raises(NeedlesError, match="also appear in the evaluation set needles_passkey"):
        prepare_docs(same, tok, str(smollm2_dir))


def test_passkey_training_beside_a_niah_target_compares_documents_not_questions(smollm2_dir, shared_data, tmp_path):
    """A passkey finetune checked against NIAH (the extension experiment's target): NIAH documents carry a question,
    passkey training documents none, so only document hashes are compared (not a refusal for a missing question)."""
    import shutil

    from transformers import AutoTokenizer

    from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
    from harness_ext.finetune.data import prepare_docs

    mirror = tmp_path / "mirror"
    for rel in RETRIEVAL_HEAD.files:
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        src = shared_data / "retrieval-head" / ("needles.jsonl" if rel == RETRIEVAL_HEAD_NEEDLES else rel)
        shutil.copyfile(src, mirror / rel)
    cfg = FinetuneConfig(
        model=str(smollm2_dir),
        data={"family": "passkey", "lengths": [256], "depths": [0.5], "num_samples": 2},
        eval_tasks=["needles_passkey", "niah_single"],
        eval_metadata={"passkey_lengths": [256], "passkey_depths": [0.5], "passkey_num_samples": 2,
                       "niah_lengths": [300], "niah_depths": [0.5], "niah_num_samples": 2, "niah_mirror": str(mirror)},
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    _, tasks, docs, leak = prepare_docs(cfg, tok, str(smollm2_dir))
    assert tasks == ["needles_passkey", "niah_single"] and len(docs) == 2
    assert leak.eval_docs == 4 and leak.overlap == 0 and set(leak.eval_data_sha256) == set(tasks)


@pytest.mark.heavy
def test_a_tiny_run_trains_every_token_of_passkey_documents(tiny_llama_dir, tmp_path):
    """Two LoRA steps of the tiny random Llama on passkey documents with ``loss_on: all``: every step's labels are
    every token of its document but the first, and the manifest records the loss and the family."""
    from harness_ext.finetune.recipe import finetune

    cfg = FinetuneConfig(
        model=str(tiny_llama_dir),
        output_dir=str(tmp_path / "run"),
        data={"family": "passkey", "lengths": [200], "depths": [0.5], "num_samples": 2},
        eval_tasks=["needles_passkey"],
        eval_metadata={"passkey_lengths": [200], "passkey_depths": [0.5], "passkey_num_samples": 2},
        loss_on="all",
        batch_size=1,
        max_steps=2,
        lora_r=4,
        lora_alpha=8,
    )
    manifest = finetune(cfg, progress=False)
    import json

    history = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["label_tokens"] for h in history] == [h["tokens"] - 1 for h in history]  # batch 1, no padding
    assert manifest["hyperparameters"]["loss_on"] == "all" and manifest["data"]["family"] == "passkey"
    assert manifest["data"]["tokens"]["trained_tokens"] == manifest["data"]["tokens"]["tokens"] - 2
    assert manifest["leakage_check"]["overlap"] == 0
