"""Prompt identity: every data family and cell `needles finetune` trains on renders a document exactly as lm-eval
renders it at evaluation time with ``--apply_chat_template``.

The training side is the recipe's own path: the family's training rows (``train_spec`` -> ``generate_docs`` /
``synth_train_docs``) formatted by ``format_docs``. The evaluation side is lm-eval 0.4.13 itself: the real task
from ``kv_tasks`` (TaskManager, the YAML's ``doc_to_text``, ``target_delimiter``, no few-shot, the task's
``--metadata``), its ``build_all_requests`` called as the evaluator calls it for ``lm_eval run --apply_chat_template``
(``fewshot_as_multiturn`` on, ``system_instruction``), the chat template and the context encoding of lm-eval's
``vllm`` model class (what ``needles finetune``'s eval command runs) and of its ``hf`` class. The model classes are
used without a model: their ``apply_chat_template`` and encoding need only the tokenizer (SmolLM2's).

The prompt tokens must be equal; the answer is what follows them. A perturbed training rendering (a space, a system
turn, no generation prompt, a BOS, two documents swapped, the ``Answer:`` cue) must be caught.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import datasets
import pytest
from transformers import AutoTokenizer

from harness_ext.finetune.config import FinetuneConfig
from harness_ext.finetune.data import format_docs, generate_docs, train_spec
from harness_ext.finetune.families import SynthTrainSpec, describe_families, synth_train_docs
from harness_ext.finetune.outputs import record_outputs
from harness_ext.finetune.passkey_family import passkey_train_docs
from harness_ext.tasklib.passkey import plain_prompt

SYSTEM = "Answer from the documents only."
SYNTH = {"num_samples": 1, "num_documents": 4, "positions": [2]}
QA = {"num_samples": 1, "lengths": [1024], "placements": ["spread"]}
# (family, cell) -> (the finetune `data`, the lm-eval task that scores that family)
CASES: dict[tuple[str, str | None], tuple[dict, str]] = {
    ("kv", None): ({"family": "kv", "num_samples": 2, "seed": 0, "lengths": [256]}, "kv_retrieval_simple"),
    **{
        ("synth_mdqa", cell): ({"family": "synth_mdqa", "cell": cell, **SYNTH}, f"synth_mdqa_{cell}")
        for cell in ("symbolic_kv", "templated_entities", "templated_in_prose", "natural_in_prose", "real")
    },
    **{
        ("musique", cell): ({"family": "musique", "cell": cell, **QA}, "musique")
        for cell in ("real", "symbolic", "templated")
    },
    # the real cell on one haystack the task does not score (it scores news1)
    ("summhay", "real"): ({"family": "summhay", "cell": "real", **QA, "haystacks": ["news2"]}, "summhay_citation"),
    **{
        ("summhay", cell): ({"family": "summhay", "cell": cell, **QA}, "summhay_citation")
        for cell in ("symbolic", "templated")
    },
}
# The task's --metadata. KV: the training spec (seed 0, 256 tokens, uniform gold position), so the task generates
# exactly the training documents; the other families score their own (eval-split or real) documents.
EVAL_META = {
    "seed": 0,
    "lengths": [256],
    "num_samples": 2,
    "depths": None,
    "synth_num_samples": 1,
    "synth_num_documents": 4,
    "synth_positions": [2],
    "musique_lengths": [1024],
    "musique_num_questions": 1,
    "musique_placements": ["spread"],
    "summhay_lengths": [1024],
    "summhay_num_insights": 1,
    "summhay_placements": ["spread"],
    "summhay_haystacks": ["news1"],
    "allow_unofficial_data": True,
}
# the metric each task reports first, which the trained reply must score in full
MAIN_METRIC = {"kv": "both_acc", "synth_mdqa": "best_subspan_em", "musique": "answer_em", "summhay": "citation_f1"}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def world(smollm2_dir, shared_data, tmp_path_factory):
    """(training rows per case, lm-eval tasks by name, each task's own documents, eval metadata); data cached in a
    private folder."""
    from lm_eval.tasks import TaskManager

    from harness_ext.plugin.registration import tasks_dir
    from harness_ext.tasklib.qa_fixtures import write_musique_fixture, write_summhay_fixture

    root = tmp_path_factory.mktemp("prompt-identity")
    write_musique_fixture(root / "musique", num_questions=8)
    write_summhay_fixture(root / "summhay", num_documents=8)
    mirrors = {
        "mdqa_mirror": str(shared_data / "lost-in-the-middle"),
        "musique_mirror": str(root / "musique"),
        "summhay_mirror": str(root / "summhay"),
    }
    meta = {**EVAL_META, **mirrors, "pretrained": str(smollm2_dir)}  # lm-eval adds --model_args to the metadata
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEEDLES_CACHE_DIR", str(root / "cache"))
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        rows = {}
        for case, (data, _task) in CASES.items():
            spec = train_spec(data)
            if isinstance(spec, SynthTrainSpec):
                rows[case] = synth_train_docs(spec, EVAL_META | mirrors, str(smollm2_dir))
            else:
                rows[case] = generate_docs(spec, tok)
        manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=dict(meta))
        tasks = manager.load(sorted({task for _data, task in CASES.values()}))["tasks"]
        own = {name: list(task.test_docs()) for name, task in tasks.items()}  # before a test swaps the dataset
        yield rows, tasks, own, meta


# ---------------------------------------------------------------------------------- lm-eval's side
def lm_eval_model(backend: str, tok):
    """lm-eval's model class without a model: the attributes its chat template and context encoding read, set as
    its constructor sets them for ``--model vllm|hf --model_args pretrained=...`` (no chat_template_args,
    add_bos_token and prefix_token_id unset; vLLM resolves the template to the tokenizer's own)."""
    if backend == "vllm":
        vllm_causallms = pytest.importorskip("lm_eval.models.vllm_causallms")
        lm = object.__new__(vllm_causallms.VLLM)
        lm.hf_chat_template, lm.enable_thinking = tok.chat_template, None
    else:
        from lm_eval.models.huggingface import HFLM

        lm = object.__new__(HFLM)
        lm.backend = "causal"
    lm.tokenizer, lm.chat_template_args, lm.add_bos_token, lm.custom_prefix_token_id = tok, {}, None, None
    return lm


def eval_contexts(task, docs: list[dict], lm, system: str | None) -> list[str]:
    """The generate_until contexts of ``docs`` as ``lm_eval run --apply_chat_template [--system_instruction S]``
    builds them (lm_eval.evaluator.evaluate: build_all_requests), in the documents' order."""
    task.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)})
    task.build_all_requests(
        rank=0,
        world_size=1,
        system_instruction=system,
        apply_chat_template=True,
        fewshot_as_multiturn=True,  # the CLI's default with --apply_chat_template
        chat_template=lm.apply_chat_template,
        tokenizer_name="smollm2",
    )
    assert [i.doc_id for i in task.instances] == list(range(len(docs)))
    assert all(i.request_type == "generate_until" for i in task.instances)
    return [i.args[0] for i in task.instances]


def eval_ids(lm, context: str) -> list[int]:
    """The tokens the model is fed: VLLM.generate_until encodes with tok_encode, HFLM with tok_batch_encode."""
    if hasattr(lm, "hf_chat_template"):
        return lm.tok_encode([context])[0]
    ids, mask = lm.tok_batch_encode([context])
    return ids[0][mask[0].bool()].tolist()


def first_difference(train: list[int], evaluated: list[int], tok) -> str | None:
    """None when equal, else where the training prompt tokens part from lm-eval's (decoded, for the message)."""
    if train == evaluated:
        return None
    at = next((i for i, (a, b) in enumerate(zip(train, evaluated)) if a != b), min(len(train), len(evaluated)))
    return (
        f"token {at} of {len(train)} (training) / {len(evaluated)} (lm-eval): "
        f"training {tok.decode(train[at : at + 12])!r} vs lm-eval {tok.decode(evaluated[at : at + 12])!r}"
    )


# ---------------------------------------------------------------------------------- the checks
def test_every_family_and_cell_of_needles_finetune_is_covered():
    assert {(r["family"], r["cell"]) for r in describe_families()} == set(CASES)


@pytest.mark.parametrize("backend", ["vllm", "hf"])
@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}:{c[1]}" if c[1] else c[0])
def test_training_prompt_tokens_are_lm_evals(case, system, backend, world, tok):
    rows, tasks, _own, _meta = world
    task = tasks[CASES[case][1]]
    docs = rows[case][:2]
    lm = lm_eval_model(backend, tok)
    contexts = eval_contexts(task, docs, lm, system)
    for doc, example, context in zip(docs, format_docs(tok, docs, system), contexts, strict=True):
        trained_prompt = example.input_ids[: example.n_prompt]
        diff = first_difference(trained_prompt, eval_ids(lm, context), tok)
        assert diff is None, f"{case}: the training prompt differs from lm-eval's at {diff}"
        # what follows the prompt is the target and the end of the turn, nothing else
        answer = tok.decode(example.input_ids[example.n_prompt :])
        assert answer == doc["target"] + tok.eos_token + "\n"
        # the user turn is the task's doc_to_text (no delimiter, no few-shot), the system turn as asked
        assert context.endswith(task.doc_to_text(doc) + "<|im_end|>\n<|im_start|>assistant\n")
        assert task.doc_to_text(doc) == doc["prompt"] and (system is None or f"system\n{system}<|im_end|>" in context)


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}:{c[1]}" if c[1] else c[0])
def test_the_trained_reply_is_the_tasks_target_and_scores_in_full(case, world):
    rows, tasks, _own, _meta = world
    task = tasks[CASES[case][1]]
    for doc in rows[case][:2]:
        assert task.doc_to_target(doc) == doc["target"]
        scores = task.process_results(doc, [doc["target"]])
        assert scores[MAIN_METRIC[case[0]]] == 1.0, scores


def test_training_rows_come_from_the_evaluated_generator(world, smollm2_dir):
    """The training documents are the evaluation's generator, only the seed (KV) or split (synth_mdqa) apart:
    KV with the training spec as the task's --metadata gives exactly the training documents."""
    from harness_ext.tasklib.synth_mdqa import generate

    rows, _tasks, own, meta = world
    assert [d["prompt"] for d in own["kv_retrieval_simple"]] == [d["prompt"] for d in rows[("kv", None)]]
    for (family, cell), (data, task_name) in CASES.items():
        if family != "synth_mdqa":
            continue
        as_eval, _info = generate(replace(train_spec(data).synth, split="eval"), meta)
        assert [d["prompt"] for d in own[task_name]] == [d["prompt"] for d in as_eval], cell
        assert all(d["split"] == "train" for d in rows[(family, cell)])


def _swap_documents(prompt: str) -> str:
    lines = prompt.split("\n")
    a, b = sorted(sorted(range(len(lines)), key=lambda i: -len(lines[i]))[:2])  # documents are the longest lines
    lines[a], lines[b] = lines[b], lines[a]
    return "\n".join(lines)


def _toggle_answer_cue(prompt: str) -> str:
    return prompt.removesuffix("\nAnswer:") if prompt.endswith("\nAnswer:") else prompt + "\nAnswer:"


# one rendering difference each, applied to the training side only
PERTURBATIONS = {
    "trailing_whitespace": lambda tok, d: format_docs(tok, [{**d, "prompt": d["prompt"] + " "}]),
    "system_prompt": lambda tok, d: format_docs(tok, [d], system="You are a helpful assistant."),
    "document_order": lambda tok, d: format_docs(tok, [{**d, "prompt": _swap_documents(d["prompt"])}]),
    "answer_cue": lambda tok, d: format_docs(tok, [{**d, "prompt": _toggle_answer_cue(d["prompt"])}]),
}


def _without_generation_prompt(tok, doc: dict) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": doc["prompt"]}], tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _with_bos(tok, doc: dict) -> list[int]:
    (example,) = format_docs(tok, [doc])
    return [tok.bos_token_id, *example.input_ids[: example.n_prompt]]


@pytest.mark.parametrize("case", [("kv", None), ("synth_mdqa", "real"), ("musique", "real"), ("summhay", "symbolic")])
@pytest.mark.parametrize("perturbation", [*PERTURBATIONS, "no_generation_prompt", "bos"])
def test_the_comparison_catches_one_rendering_difference(case, perturbation, world, tok):
    rows, tasks, _own, _meta = world
    doc = rows[case][0]
    lm = lm_eval_model("hf", tok)
    (context,) = eval_contexts(tasks[CASES[case][1]], [doc], lm, None)
    if perturbation == "no_generation_prompt":
        perturbed = _without_generation_prompt(tok, doc)
    elif perturbation == "bos":
        perturbed = _with_bos(tok, doc)
    else:
        (example,) = PERTURBATIONS[perturbation](tok, doc)
        perturbed = example.input_ids[: example.n_prompt]
    (example,) = format_docs(tok, [doc])
    assert first_difference(example.input_ids[: example.n_prompt], eval_ids(lm, context), tok) is None
    assert first_difference(perturbed, eval_ids(lm, context), tok) is not None


def test_the_eval_command_renders_the_training_system_prompt(world, tok, smollm2_dir, tmp_path):
    """The lm_eval command a finetune writes renders the prompt the run trained on, with or without a system
    prompt: its --system_instruction (absent: lm-eval, like training, gets the template's default system turn)."""
    rows, tasks, _own, _meta = world
    doc = rows[("kv", None)][0]
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(smollm2_dir / "config.json", model / "config.json")
    for system in (SYSTEM, None):
        cfg = FinetuneConfig(output_dir=str(tmp_path / "out"), method="full", system_prompt=system)
        manifest: dict = {}
        kwargs = {"window": 2048, "seq_len": 300, "eval_max_tokens": 300, "on_gpu": False}
        record_outputs(manifest, cfg, str(smollm2_dir), ["kv_retrieval_simple"], model, None, **kwargs)
        argv = manifest["eval_argv"]
        assert "--apply_chat_template" in argv
        instruction = argv[argv.index("--system_instruction") + 1] if "--system_instruction" in argv else None
        lm = lm_eval_model("vllm", tok)
        (context,) = eval_contexts(tasks["kv_retrieval_simple"], [doc], lm, instruction)
        (example,) = format_docs(tok, [doc], cfg.system_prompt)
        diff = first_difference(example.input_ids[: example.n_prompt], eval_ids(lm, context), tok)
        assert diff is None, f"system prompt {system!r}: the eval command renders another prompt, at {diff}"


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_passkey_training_renders_the_cue_in_the_assistant_turn_as_lm_eval(backend, tok, smollm2_dir, tmp_path):
    """needles_passkey's reply begins with its ``gen_prefix`` ("The pass key is"): lm-eval opens the assistant turn
    with it and the model continues; the passkey training family trains the same turn, cue then key. The user turn
    ending in the cue (the reference's plain text as one chat message) is another prompt and is caught."""
    from lm_eval.tasks import TaskManager

    from harness_ext.plugin.registration import tasks_dir

    data = {"family": "passkey", "lengths": [256], "depths": [0.0, 1.0], "num_samples": 1}
    meta = {"passkey_lengths": [256], "passkey_depths": [0.5], "passkey_num_samples": 1, "pretrained": str(smollm2_dir)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
        docs = passkey_train_docs(train_spec(data), tok)
        manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=meta)
        task = manager.load(["needles_passkey"])["tasks"]["needles_passkey"]
    lm = lm_eval_model(backend, tok)
    contexts = eval_contexts(task, docs, lm, None)
    assert len(docs) == 2
    for doc, example, context in zip(docs, format_docs(tok, docs), contexts, strict=True):
        assert context.endswith(doc["prompt"] + "<|im_end|>\n<|im_start|>assistant\nThe pass key is")
        evaluated = eval_ids(lm, context)
        diff = first_difference(example.input_ids[: len(evaluated)], evaluated, tok)
        assert diff is None, f"passkey: the training prompt differs from lm-eval's at {diff}"
        key = doc["passkey"]
        assert tok.decode(example.input_ids[len(evaluated) :]) == f" {key}" + tok.eos_token + "\n"
        assert task.process_results({**doc, "target": key}, [f" {key}."])["passkey_acc"] == 1.0  # the reply scores
        cue_in_user_turn = format_docs(tok, [{"prompt": plain_prompt(doc), "target": key}])[0]
        assert first_difference(cue_in_user_turn.input_ids[: len(evaluated)], evaluated, tok) is not None
