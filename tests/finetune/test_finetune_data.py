"""Training data for `needles finetune`: label mask, chat formatting, batching, packing, leakage."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.data import (
    IGNORE_INDEX,
    Example,
    check_lengths,
    check_no_leakage,
    collate,
    eval_docs,
    format_docs,
    format_example,
    generate_docs,
    loss_sum,
    plan_batches,
    train_spec,
)

EVAL_META = {"lengths": [128], "depths": None, "num_samples": 6}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def docs(tok):
    spec = train_spec({"variant": "simple", "num_samples": 4, "seed": 3, "lengths": [128, 256]})
    return generate_docs(spec, tok)


def test_label_mask_trains_only_the_assistant_answer(tok, docs):
    doc = docs[0]
    ex = format_example(tok, doc["prompt"], doc["target"])
    # the prompt tokens are exactly what lm-eval feeds vLLM with --apply_chat_template
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": doc["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert ex.input_ids[: ex.n_prompt] == tok(rendered)["input_ids"]
    labels = ex.labels
    assert len(labels) == len(ex.input_ids)
    assert all(x == IGNORE_INDEX for x in labels[: ex.n_prompt])
    trained = [x for x in labels if x != IGNORE_INDEX]
    assert trained == ex.input_ids[ex.n_prompt :]
    # what is trained: the answer and the end-of-turn token, nothing of the prompt or the question
    text = tok.decode(trained)
    assert text.startswith(doc["target"]) and text[len(doc["target"]) :].strip() == "<|im_end|>"
    assert doc["gold_key"] not in tok.decode(ex.input_ids[: ex.n_prompt])[-30:]  # the turn header, not the question
    assert tok.decode(ex.input_ids[ex.n_prompt - 3 : ex.n_prompt]).endswith("assistant\n")


def test_system_prompt_goes_into_the_masked_part(tok, docs):
    plain = format_example(tok, docs[0]["prompt"], docs[0]["target"])
    with_system = format_example(tok, docs[0]["prompt"], docs[0]["target"], system="Be brief.")
    assert "Be brief." in tok.decode(with_system.input_ids[: with_system.n_prompt])
    assert with_system.input_ids[with_system.n_prompt :] == plain.input_ids[plain.n_prompt :]


def _reference_loss(model, examples: list[Example]) -> float:
    """Plain HF: each example alone, full logits, the model's own shifted loss, token-weighted."""
    total, count = 0.0, 0
    for e in examples:
        out = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        n = sum(1 for x in e.labels[1:] if x != IGNORE_INDEX)
        total += float(out.loss) * n
        count += n
    return total / count


@pytest.mark.parametrize("mode", ["grouped", "packed"])
def test_collated_loss_equals_per_example_loss(tok, tiny, docs, mode):
    """Left padding + logits_to_keep (grouped) and packing give the same loss as one-by-one."""
    examples = format_docs(tok, docs[:4])
    assert len({len(e) for e in examples}) > 1  # different lengths: padding / packing matter
    batch = collate(examples, mode, tok.pad_token_id)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = tiny(**inputs, logits_to_keep=batch["logits_to_keep"], use_cache=False).logits
        ours = float(loss_sum(logits, batch)) / int((batch["labels"] != IGNORE_INDEX).sum())
        ref = _reference_loss(tiny, examples)
    assert ours == pytest.approx(ref, rel=1e-5)


def test_packed_samples_do_not_attend_to_each_other(tok, tiny, docs):
    examples = format_docs(tok, docs[:3])
    batch = collate(examples, "packed", tok.pad_token_id)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers ignores the packing
        packed = tiny(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([tiny(torch.tensor([e.input_ids])).logits[0] for e in examples])
        # the same concatenation with running positions and a plain causal mask: cross-attention
        leaky = tiny(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-4)
    tail = slice(len(examples[0]), None)
    assert not torch.allclose(leaky[tail], alone[tail], atol=1e-4)  # the check above can fail


def test_batch_plans_cover_every_example_once_and_are_deterministic():
    lengths = [100 + (i * 37) % 900 for i in range(103)]
    for mode in ("grouped", "padded", "packed"):
        plan = plan_batches(lengths, 4, mode, seed=1, epoch=0, pack_tokens=2000)
        assert sorted(i for b in plan for i in b) == list(range(103))
        assert plan == plan_batches(lengths, 4, mode, seed=1, epoch=0, pack_tokens=2000)
        assert plan != plan_batches(lengths, 4, mode, seed=1, epoch=1, pack_tokens=2000)
    packed = plan_batches(lengths, 4, "packed", 1, 0, pack_tokens=2000)
    assert all(sum(lengths[i] for i in b) <= 2000 for b in packed)

    def padded_tokens(plan):
        return sum(len(b) * max(lengths[i] for i in b) for b in plan)

    grouped = padded_tokens(plan_batches(lengths, 4, "grouped", 1, 0))
    padded = padded_tokens(plan_batches(lengths, 4, "padded", 1, 0))
    assert grouped < 0.8 * padded  # length grouping removes most padding
    assert grouped >= sum(lengths)


def test_lengths_come_from_the_data_and_are_never_truncated(tok, docs):
    examples = format_docs(tok, docs)
    longest = max(len(e) for e in examples)
    assert check_lengths(examples, model_max=8192, max_length=None) == longest
    with pytest.raises(NeedlesError, match="more than max_length"):
        check_lengths(examples, model_max=8192, max_length=longest - 1)
    with pytest.raises(NeedlesError, match="the model holds at most"):
        check_lengths(examples, model_max=longest - 1, max_length=None)


def test_training_docs_are_disjoint_from_the_eval_set(tok, smollm2_dir):
    spec = train_spec({"num_samples": 6, "seed": 0, "lengths": [128]})
    train = generate_docs(spec, tok)
    report = check_no_leakage(train, 0, ["kv_retrieval_simple"], EVAL_META, str(smollm2_dir))
    assert report.eval_docs == 6 and report.overlap == 0 and report.eval_seeds == [1000]
    # the eval documents are the ones lm_eval builds from the task YAML + --metadata (seed 1000)
    held_out = eval_docs("kv_retrieval_simple", EVAL_META, str(smollm2_dir))
    same = generate_docs(train_spec({"num_samples": 6, "seed": 1000, "lengths": [128]}), tok)
    assert [d["doc_sha256"] for d in same] == [d["doc_sha256"] for d in held_out]
    with pytest.raises(NeedlesError, match="also appear in the evaluation set"):
        check_no_leakage(train + held_out[:1], 0, ["kv_retrieval_simple"], EVAL_META, str(smollm2_dir))
    with pytest.raises(NeedlesError, match="seed of the evaluation set"):
        check_no_leakage(train, 1000, ["kv_retrieval_simple"], EVAL_META, str(smollm2_dir))


def test_unknown_data_key_is_refused():
    with pytest.raises(NeedlesError, match="unknown data key"):
        train_spec({"num_sample": 3})
