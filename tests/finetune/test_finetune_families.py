"""`needles finetune` on other data families: the default KV data unchanged, the synth_mdqa cells and the
real-data baseline as training data (train split, real SmolLM2 tokenizer, leakage refused), one tiny run.

Data: the real Lost-in-the-Middle oracle file (../shared/data) as the MDQA mirror of the synthetic cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from harness_ext.cli import main as cli_main
from harness_ext.core.errors import NeedlesError
from harness_ext.finetune.config import FinetuneConfig, load_config
from harness_ext.finetune.data import format_docs, generate_docs, prepare_docs, train_spec
from harness_ext.finetune.leakage import check_family_leakage, docs_sha256, task_docs
from harness_ext.tasklib.real_baseline import question_hash
from harness_ext.tasklib.synth_corpus import question_split

# Pinned before the data families existed: the default training data (data: {family: kv}) with SmolLM2.
DEFAULT_KV_DOCS_SHA256 = "95d664d3d5107565b9b80a33e1e15dcb36d70dbde0f4b0c8cc52d18cee8433c9"  # docs_sha256
DEFAULT_KV_JSON_SHA256 = "e5a3420e998a27670d4d3667769097ddc31dcbd312b3b76cb8cef4d215438600"  # every field
SMALL_KV_JSON_SHA256 = "a16cc8e920e00561465bc5d85e453bc8d50c2bef3fe7a4a3edc7a3dab10fa222"  # 8 docs, 128 tokens
SYNTH = {"family": "synth_mdqa", "num_samples": 3, "num_documents": 4, "positions": [1, 4]}
EVAL_SYNTH = {"synth_num_samples": 3, "synth_num_documents": 4, "synth_positions": [1, 4]}


def _json_sha(docs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def mirror(shared_data) -> dict:
    return {"mdqa_mirror": str(shared_data / "lost-in-the-middle")}


def synth_cfg(cell: str, mirror: dict, tasks: list[str], **data) -> FinetuneConfig:
    return load_config(
        overrides={
            "data": {**SYNTH, "cell": cell, **data},
            "eval_tasks": tasks,
            "eval_metadata": {**mirror, **EVAL_SYNTH},
        }
    )


def test_default_kv_data_is_unchanged(tok):
    default = load_config()
    assert default.data == {"variant": "simple", "num_samples": 350, "seed": 0, "lengths": [256]}
    docs = generate_docs(train_spec(default.data), tok)
    assert docs_sha256(docs) == DEFAULT_KV_DOCS_SHA256 and _json_sha(docs) == DEFAULT_KV_JSON_SHA256
    # an explicit `family: kv` is the same data (the key is not a KVSpec field)
    explicit = load_config(overrides={"data": {"family": "kv", "num_samples": 8, "lengths": [128]}})
    assert explicit.data["family"] == "kv" and train_spec(explicit.data) == train_spec(
        {**default.data, **explicit.data}
    )
    assert _json_sha(generate_docs(train_spec(explicit.data), tok)) == SMALL_KV_JSON_SHA256


def test_a_family_on_the_command_line_starts_from_its_own_defaults(tmp_path):
    cfg = load_config(overrides={"data": {"family": "synth_mdqa", "cell": "real"}})
    assert cfg.data == {"family": "synth_mdqa", "cell": "real"}  # not the KV defaults (variant, lengths)
    spec = train_spec(cfg.data)
    assert spec.synth.split == "train" and spec.synth.num_samples == 350 and spec.to_json()["family"] == "synth_mdqa"
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  family: synth_mdqa\n  cell: templated_entities\n  num_documents: 5\n")
    merged = load_config(path, {"data": {"num_samples": 7}})
    assert merged.data == {"family": "synth_mdqa", "cell": "templated_entities", "num_documents": 5, "num_samples": 7}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"family": "synth_mdqa", "cell": "templated_entities", "variant": "simple"}, "['variant'] do not apply"),
        ({"family": "synth_mdqa", "cell": "nope"}, "data.cell='nope' is not a synth_mdqa cell"),
        ({"family": "synth_mdqa"}, "data.cell=None is not a synth_mdqa cell"),
        ({"family": "synth_mdqa", "cell": "real", "positions": ["x"]}, "data.positions='x' is not a whole number"),
        ({"family": "synth_mdqa", "cell": "real", "num_documents": 2, "positions": [3]}, "positions=[3] with 2"),
        ({"family": "images"}, "unknown data family 'images'"),
        ({"num_documents": 4}, "are keys of --data-family synth_mdqa"),
        ({"family": "synth_mdqa", "cell": "real", "target": "essay"}, "data.target='essay' is not a target form"),
        ({"family": "musique", "cell": "real", "target": "sentence"}, "['target'] do not apply"),
        ({"target": "sentence"}, "are keys of --data-family synth_mdqa"),
    ],
)
def test_bad_family_data_is_refused(data, message):
    with pytest.raises(NeedlesError) as err:
        train_spec(data)
    assert message in f"{err.value.problem} {err.value.fix}"


@pytest.mark.parametrize("cell", ["templated_entities", "real"])
def test_synth_training_docs_come_from_the_train_split_and_fit_the_tokenizer(cell, tok, smollm2_dir, mirror):
    cfg = synth_cfg(cell, mirror, [f"synth_mdqa_{cell}"], lengths=[384], positions=[1, 2])
    spec, tasks, docs, leak = prepare_docs(cfg, tok, str(smollm2_dir))
    assert tasks == [f"synth_mdqa_{cell}"] and len(docs) == 3 * 2
    assert all(d["split"] == "train" and d["cell"] == cell for d in docs)
    # length-exact with the real SmolLM2 tokenizer: at most the target, the gold where requested
    counts = [len(tok(d["prompt"])["input_ids"]) for d in docs]
    assert all(n == d["n_tokens"] <= 384 for n, d in zip(counts, docs)) and max(counts) > 384 * 0.8
    assert [d["gold_position"] for d in docs] == [1, 2] * 3
    assert all(d["ctxs"][d["gold_position"] - 1]["isgold"] and d["target"] == d["answers"][0] for d in docs)
    # the chat examples train exactly the answer after the LitM prompt
    examples = format_docs(tok, docs)
    assert tok.decode(examples[0].input_ids[examples[0].n_prompt :]).startswith(docs[0]["target"])
    if cell == "real":
        assert all(question_split(d["question"]) == "train" for d in docs)
    evaluated = task_docs(f"synth_mdqa_{cell}", cfg.eval_metadata, str(smollm2_dir))
    assert {question_hash(d["question"]) for d in docs}.isdisjoint(question_hash(d["question"]) for d in evaluated)
    assert leak.family == "synth_mdqa" and leak.overlap == 0 and leak.eval_docs == len(evaluated) == 3 * 2
    assert leak.eval_questions == 3 and leak.eval_data_sha256[tasks[0]] == docs_sha256(evaluated)


@pytest.mark.parametrize("cell", ["templated_entities", "real"])
def test_a_sentence_target_is_the_gold_documents_answer_sentence(cell, tok, smollm2_dir, mirror):
    """data.target: sentence trains the gold document's sentence that holds the answer (the restating reply form)
    on the same prompts as the answer target; the metric credits it, and it is one line of the gold document."""
    from harness_ext.tasklib.metrics import best_subspan_em

    answer_cfg = synth_cfg(cell, mirror, [f"synth_mdqa_{cell}"])
    spec, _, answer_docs, _ = prepare_docs(answer_cfg, tok, str(smollm2_dir))
    cfg = synth_cfg(cell, mirror, [f"synth_mdqa_{cell}"], target="sentence")
    spec, _, docs, _ = prepare_docs(cfg, tok, str(smollm2_dir))
    assert [d["prompt"] for d in docs] == [d["prompt"] for d in answer_docs]
    assert spec.to_json()["target"] == "sentence" and "target" not in train_spec(answer_cfg.data).to_json()
    assert spec.manifest_fields()["target"] == "sentence" and spec.info["answer_fallbacks"] == 0
    for d in docs:
        gold = " ".join(d["ctxs"][d["gold_position"] - 1]["text"].split())
        assert d["target"] != d["answers"][0] and d["target"] in gold and "\n" not in d["target"]
        assert best_subspan_em(d["target"], d["answers"]) == 1.0 and len(d["target"]) < len(gold)
    examples = format_docs(tok, docs)
    assert tok.decode(examples[0].input_ids[examples[0].n_prompt :]).startswith(docs[0]["target"])


def test_synth_training_docs_are_deterministic_across_processes(tok, smollm2_dir, mirror, tmp_path):
    cfg = synth_cfg("symbolic_kv", mirror, ["synth_mdqa_symbolic_kv"])
    _spec, _tasks, docs, _leak = prepare_docs(cfg, tok, str(smollm2_dir))
    code = (
        "import json, sys; from harness_ext.finetune.config import load_config;"
        "from harness_ext.finetune.data import train_spec; from harness_ext.finetune.families import synth_train_docs;"
        "a = json.loads(sys.argv[1]); cfg = load_config(overrides=a);"
        "docs = synth_train_docs(train_spec(cfg.data), cfg.eval_metadata, sys.argv[2]);"
        "print(json.dumps(docs, sort_keys=True))"
    )
    args = json.dumps({"data": cfg.data, "eval_metadata": cfg.eval_metadata})
    env = {**os.environ, "NEEDLES_NO_CACHE": "1", "PYTHONHASHSEED": "123"}  # built afresh, not read back
    out = subprocess.run(
        [sys.executable, "-c", code, args, str(smollm2_dir)], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == json.loads(json.dumps(docs, sort_keys=True))


def test_an_evaluation_item_planted_in_training_is_refused(tok, smollm2_dir, mirror):
    cfg = synth_cfg("real", mirror, ["synth_mdqa_real"])
    _spec, tasks, docs, _leak = prepare_docs(cfg, tok, str(smollm2_dir))
    evaluated = task_docs("synth_mdqa_real", cfg.eval_metadata, str(smollm2_dir))
    args = (cfg.data["family"], tasks, cfg.eval_metadata, str(smollm2_dir), tok)
    with pytest.raises(NeedlesError, match="also appear in the evaluation set synth_mdqa_real"):
        check_family_leakage(docs + evaluated[:1], *args)  # the same document: its hash
    # the same question in another rendering (other distractors, other position): its question hash
    planted = dict(docs[0], question=evaluated[0]["question"].upper(), doc_sha256="0" * 64)
    with pytest.raises(NeedlesError, match="evaluation set synth_mdqa_real: 1 evaluation question"):
        check_family_leakage(docs + [planted], *args)
    # NQ-Open questions of both splits (the closed-book MDQA task): the real baseline is refused, by question
    meta = {**cfg.eval_metadata, "mdqa_num_questions": 40}
    with pytest.raises(NeedlesError, match="evaluation set mdqa_closedbook: .* also occur in the training set"):
        check_family_leakage(docs, cfg.data["family"], ["mdqa_closedbook"], meta, str(smollm2_dir), tok)


def test_tiny_finetune_on_a_synth_cell_records_family_and_hashes(tiny_llama_dir, mirror, tmp_path, capsys):
    out = tmp_path / "run"
    eval_meta = {**mirror, **EVAL_SYNTH}
    argv = ["finetune", "--model", str(tiny_llama_dir), "-o", str(out), "--data-family", "synth_mdqa"]
    argv += ["--data-cell", "templated_entities", "--num-samples", "4", "--num-documents", "4", "--positions", "1", "4"]
    argv += ["--eval-tasks", "synth_mdqa_templated_entities", "--eval-metadata", json.dumps(eval_meta)]
    argv += ["--max-steps", "2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8"]
    code = cli_main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    data = manifest["data"]
    assert data["family"] == "synth_mdqa" and data["cell"] == "templated_entities" and data["split"] == "train"
    assert data["spec"]["num_samples"] == 4 and data["spec"]["positions"] == [1, 4] and data["documents"] == 8
    trained = [json.loads(line) for line in (out / "train_docs.jsonl").read_text().splitlines()]
    assert data["data_sha256"] == docs_sha256(trained) == data["dataset_sha256"]
    assert data["data_files"] == {"qa_data/nq-open-oracle.jsonl.gz": _sha_file(Path(mirror["mdqa_mirror"]))}
    leak = manifest["leakage_check"]
    assert leak["family"] == "synth_mdqa" and leak["overlap"] == 0 and leak["eval_docs"] == 6
    assert leak["eval_questions"] == 3 and leak["train_seed"] == 0
    assert manifest["training"]["steps"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    cmd = shlex.split(manifest["eval_command"])
    assert cmd[cmd.index("--tasks") + 1] == "synth_mdqa_templated_entities"
    assert json.loads(cmd[cmd.index("--metadata") + 1]) == eval_meta
    assert manifest["eval_command"] in captured.out


def _sha_file(root: Path) -> str:
    return hashlib.sha256((root / "qa_data" / "nq-open-oracle.jsonl.gz").read_bytes()).hexdigest()
