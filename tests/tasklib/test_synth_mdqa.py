"""The synthetic MDQA grid and the real-data baseline: rows, pairing, determinism, lengths, collisions,
leakage, metadata, training examples and the grid description.

Data: the real Lost-in-the-Middle oracle file (../shared/data) as an MDQA mirror; lengths use the real
SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.data.sources import RETRIEVAL_HEAD, RETRIEVAL_HEAD_NEEDLES
from harness_ext.tasklib.breakdowns import parse_name
from harness_ext.tasklib.mdqa import render_prompt
from harness_ext.tasklib.metrics import contains_answer, squad_normalize
from harness_ext.tasklib.real_baseline import check_no_leakage, question_of
from harness_ext.tasklib.synth_cells import NATURAL_FACTS, natural_pool, natural_split
from harness_ext.tasklib.synth_corpus import (
    SPLITS,
    Corpus,
    arrange,
    invented_name,
    load_corpus,
    prompt_of,
    question_split,
)
from harness_ext.tasklib.synth_mdqa import (
    CELLS,
    SynthSpec,
    context_for,
    describe,
    draw_sample,
    generate,
    generate_rows,
    process_results,
    spec_from_metadata,
    training_examples,
)
from harness_ext.tasklib.token_budget import count_tokens

SYNTHETIC = [c for c in CELLS if c != "real"]
QA_HEAD = "Write a high-quality answer for the given question using only the provided search results"


@pytest.fixture
def meta(shared_data, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEEDLES_MDQA_MIRROR", raising=False)
    return {"mdqa_mirror": str(shared_data / "lost-in-the-middle")}


@pytest.fixture
def corpus(meta) -> Corpus:
    return load_corpus(meta)


def _by_sample(rows: list[dict]) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["sample"]].append(r)
    return out


@pytest.mark.parametrize("cell", list(CELLS))
def test_gold_at_every_requested_position_same_sample(cell, corpus):
    spec = SynthSpec(cell, num_documents=6, positions=(1, 3, 6), num_samples=4, seed=3)
    rows = generate_rows(spec, corpus)
    assert len(rows) == 4 * 3
    assert [r["gold_position"] for r in rows] == [1, 3, 6] * 4  # sample-major
    for group in _by_sample(rows).values():
        first = group[0]
        gold = first["ctxs"][0]
        distractors = [c for c in first["ctxs"] if not c["isgold"]]
        for r in group:
            p = r["gold_position"]
            assert r["num_documents"] == len(r["ctxs"]) == 6
            assert [c["isgold"] for c in r["ctxs"]] == [i == p - 1 for i in range(6)]
            assert r["ctxs"][p - 1] == gold  # the same gold document ...
            assert [c for c in r["ctxs"] if not c["isgold"]] == distractors  # ... and distractors, in order
            assert (r["question"], r["answers"]) == (first["question"], first["answers"])
            assert r["prompt"] == render_prompt({"question": r["question"], "ctxs": r["ctxs"]})
            assert r["prompt"].startswith(QA_HEAD) and r["prompt"].endswith(f"\nQuestion: {r['question']}\nAnswer:")
            assert f"\nDocument [{p}](Title: {gold['title']}) {gold['text']}\n" in r["prompt"]
        assert first["gold_span"] in gold["text"]
        assert contains_answer(gold["text"], first["answers"])
        assert not any(contains_answer(f"{c['title']} {c['text']}", first["answers"]) for c in distractors)
    assert len({r["doc_sha256"] for r in rows}) == len(rows)


def test_cells_have_their_shape(corpus):
    rows = {c: generate_rows(SynthSpec(c, num_documents=5, positions=(2,), num_samples=3), corpus) for c in CELLS}
    kv = rows["symbolic_kv"][0]
    assert kv["question"].startswith("What is the value of key ") and kv["gold_span"].startswith("key ")
    assert all(c["title"].startswith("record ") and c["text"].count("key ") == 3 for c in kv["ctxs"])
    ent = rows["templated_entities"][0]
    assert all(len(c["text"].split(". ")) == 3 for c in ent["ctxs"])  # facts_per_document sentences each
    passages = {p["text"] for p in corpus.passages}
    for cell in ("templated_in_prose", "natural_in_prose"):
        for r in rows[cell]:
            gold = r["ctxs"][1]
            span = r["gold_span"]
            assert {gold["text"].replace(span + " ", "", 1), gold["text"].replace(" " + span, "", 1)} & passages
            assert all(c["text"] in passages for c in r["ctxs"] if not c["isgold"])
    natural_answers = {f.answer for f in NATURAL_FACTS}
    assert all(r["answers"][0] in natural_answers for r in rows["natural_in_prose"])
    eval_questions = {r["question"] for r in corpus.rows if question_split(r["question"]) == "eval"}
    assert all(r["question"] in eval_questions for r in rows["real"])


def test_deterministic_across_processes(meta, shared_data):
    code = (
        "import json, sys\n"
        "from harness_ext.tasklib.synth_mdqa import CELLS, SynthSpec, generate\n"
        "meta = json.loads(sys.argv[1])\n"
        "out = {c: generate(SynthSpec(c, num_documents=4, positions=(1, 4), num_samples=3, seed=7), meta)[0]"
        " for c in CELLS}\n"
        "sys.stdout.write(json.dumps(out, sort_keys=True))\n"
    )
    env = dict(os.environ, NEEDLES_NO_CACHE="1", PYTHONHASHSEED="random")
    procs = [
        subprocess.Popen([sys.executable, "-c", code, json.dumps(meta)], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and len(outs[0]) > 10_000
    here = {c: generate(SynthSpec(c, num_documents=4, positions=(1, 4), num_samples=3, seed=7), meta)[0] for c in CELLS}
    assert json.dumps(here, sort_keys=True).encode() == outs[0]
    other_seed, _ = generate(SynthSpec("templated_in_prose", num_documents=4, positions=(1,), num_samples=3), meta)
    assert [r["question"] for r in other_seed] != [r["question"] for r in here["templated_in_prose"][::2]]


def test_cache_hit_and_dataset_sha(meta):
    spec = SynthSpec("symbolic_kv", num_documents=3, positions=(1, 3), num_samples=2)
    rows, info = generate(spec, meta)
    again, info2 = generate(spec, meta)
    assert rows == again and info["needles_data_sha256"] == info2["needles_data_sha256"]
    assert info["needles_data_official"] is True and info["needles_alias_marks"] == []
    assert list(info["needles_data_files"]) == ["qa_data/nq-open-oracle.jsonl.gz"]


@pytest.mark.parametrize("cell", ["symbolic_kv", "templated_in_prose", "real"])
def test_length_within_one_document_of_target(cell, corpus, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    spec = SynthSpec(cell, positions=(1, 3), num_samples=2, lengths=(768, 1536), seed=1)
    rows = generate_rows(spec, corpus, tok)
    assert len(rows) == 2 * 2 * 2
    ctx = context_for(spec, corpus)
    for r in rows:
        length = r["target_tokens"]
        assert count_tokens(tok, [r["prompt"]])[0] == r["n_tokens"] <= length
        sample = draw_sample(spec, ctx, r["sample"], r["num_documents"])  # a pool with one document more
        assert sample.question == r["question"]
        longer = prompt_of(sample.question, arrange(sample, r["num_documents"] + 1, r["gold_position"]))
        assert count_tokens(tok, [longer])[0] > length
    docs = {(r["sample"], r["target_tokens"]): r["num_documents"] for r in rows}
    assert all(docs[(i, 768)] < docs[(i, 1536)] for i in range(2))


def test_lengths_need_a_tokenizer_and_room(corpus, smollm2_dir):
    with pytest.raises(NeedlesError, match="tokenizer"):
        generate_rows(SynthSpec("real", lengths=(512,), positions=(1,)), corpus)
    tok = load_tokenizer(str(smollm2_dir))
    with pytest.raises(NeedlesError, match="gold position 40 does not fit") as err:
        generate_rows(SynthSpec("real", lengths=(256,), positions=(1, 40), num_samples=1), corpus, tok)
    assert "synth_lengths" in err.value.fix


def _nq_text(corpus: Corpus) -> tuple[set[str], list[str]]:
    answers = {squad_normalize(a) for r in corpus.rows for a in r["answers"]}
    passages = [f" {squad_normalize(c['title'] + ' ' + c['text'])} " for r in corpus.rows for c in r["ctxs"]]
    return answers, passages


def test_no_invented_string_occurs_in_nq_open(corpus):
    answers, passages = _nq_text(corpus)
    blob = "\n".join(passages)
    invented = set()
    for cell in SYNTHETIC:
        for r in generate_rows(SynthSpec(cell, num_documents=8, positions=(1,), num_samples=12), corpus):
            invented.update(r["answers"])
            if cell == "templated_entities":  # the entity names are invented too
                invented.update(c["title"] for c in r["ctxs"])
    assert len(invented) > 40
    for text in invented:
        norm = squad_normalize(text)
        assert norm not in answers, text
        assert f" {norm} " not in blob, text


def test_collisions_are_redrawn_and_colliding_facts_dropped():
    base = Corpus.from_rows([{"question": "q", "answers": ["x"], "ctxs": [{"title": "t", "text": "plain text."}]}])
    first = invented_name(np.random.default_rng(5), base, set())
    fact = next(f for f in NATURAL_FACTS if natural_split(f) == "eval")
    poisoned = Corpus.from_rows(
        [{"question": "q", "answers": [first], "ctxs": [{"title": "t", "text": f"About {fact.answer} here."}]}]
    )
    assert poisoned.collides(first) and poisoned.collides(fact.answer)
    redrawn = invented_name(np.random.default_rng(5), poisoned, set())
    assert redrawn != first and not poisoned.collides(redrawn)
    assert fact in natural_pool(base, "eval") and fact not in natural_pool(poisoned, "eval")


def test_leakage_check(meta, corpus):
    spec = SynthSpec("real", num_documents=3, positions=(1,), num_samples=30)
    eval_rows, _ = generate(spec, meta)
    train = training_examples(spec, meta)
    assert all(question_split(question_of(t)) == "train" for t in train)
    check_no_leakage(train, eval_rows)  # disjoint: passes
    leaked = train[:5] + [{"prompt": r["prompt"], "completion": " x"} for r in eval_rows[:3]]
    with pytest.raises(NeedlesError, match=r"^3 evaluation question\(s\) of 30 .*leaked"):
        check_no_leakage(leaked, eval_rows)
    for cell in SYNTHETIC:
        small = SynthSpec(cell, num_documents=3, positions=(1,), num_samples=12)
        check_no_leakage(training_examples(small, meta), generate(small, meta)[0])


def test_synthetic_data_never_uses_eval_passages(corpus):
    eval_texts = {r["ctxs"][0]["text"] for r in corpus.rows if question_split(r["question"]) == "eval"}
    assert eval_texts and not eval_texts & {p["text"] for p in corpus.passages}
    train_rows = generate_rows(
        SynthSpec("real", num_documents=5, positions=(1,), num_samples=10, split="train"), corpus
    )
    assert all(question_split(r["question"]) == "train" for r in train_rows)
    assert not any(c["text"] in eval_texts for r in train_rows for c in r["ctxs"] if not c["isgold"])


def test_training_examples_share_the_prompt(meta):
    spec = SynthSpec("templated_entities", num_documents=3, positions=(1, 3), num_samples=2)
    train = training_examples(spec, meta)
    rows, _ = generate(SynthSpec("templated_entities", 3, (1, 3), 2, split="train"), meta)
    assert [t["prompt"] for t in train] == [r["prompt"] for r in rows]
    assert [t["completion"] for t in train] == [" " + r["answers"][0] for r in rows]
    assert all(set(t) == {"prompt", "completion"} and t["prompt"].endswith("\nAnswer:") for t in train)


def test_metadata_keys_and_values():
    spec = spec_from_metadata("real", {"synth_positions": [5, 1], "synth_num_samples": "3", "version": 1.0})
    assert spec.positions == (1, 5) and spec.num_samples == 3 and spec.num_documents == 10
    assert spec_from_metadata("symbolic_kv", {"lengths": [1024], "mdqa_mirror": "x", "config_source": "y"})
    with pytest.raises(NeedlesError, match="unknown --metadata key 'synth_postions'") as err:
        spec_from_metadata("real", {"synth_postions": [1]})
    assert 'did you mean "synth_positions"' in err.value.fix
    with pytest.raises(NeedlesError, match="is not an integer"):
        spec_from_metadata("real", {"synth_num_documents": "ten"})
    with pytest.raises(NeedlesError, match=r"outside 1\.\.1000"):
        spec_from_metadata("real", {"synth_num_documents": 0})
    with pytest.raises(NeedlesError, match=r"outside 64\.\."):
        spec_from_metadata("real", {"synth_lengths": [32]})
    with pytest.raises(NeedlesError, match="positions <= documents"):
        spec_from_metadata("real", {"synth_positions": [1, 12]})
    with pytest.raises(NeedlesError, match="unknown cell"):
        SynthSpec("symbolic").validate()


def test_process_results_breakdowns():
    doc = {"answers": ["Grenmark"], "gold_position": 5, "target_tokens": None}
    assert process_results(doc, ["It is Grenmark.\nmore"]) == {"best_subspan_em": 1.0, "best_subspan_em_pos5": 1.0}
    scores = process_results(dict(doc, target_tokens=1024), ["no"])
    assert scores == {
        k: 0.0
        for k in ("best_subspan_em", "best_subspan_em_len1024", "best_subspan_em_pos5", "best_subspan_em_len1024_pos5")
    }
    b = parse_name("best_subspan_em_len1024_pos5")
    assert (b.base, b.length, b.position_kind, b.position) == ("best_subspan_em", 1024, "doc", "5")


def test_describe_the_grid(meta):
    grid = describe(meta)
    assert list(grid) == list(CELLS)
    axes = {name: (g["concept"], g["diversity"]) for name, g in grid.items()}
    assert axes["symbolic_kv"] == ("symbolic", "low") and axes["natural_in_prose"] == ("natural", "high")
    assert axes["templated_entities"] == ("templated", "low") and axes["templated_in_prose"] == ("templated", "high")
    for g in grid.values():
        assert "synth_positions" in g["knobs"] and g["summary"]
        prompt = g["example"]["prompt"]
        assert prompt.startswith(QA_HEAD) and "\nDocument [3](Title: " in prompt and prompt.endswith("Answer:")


def test_reference_needles_join_the_natural_pool(meta, shared_data, tmp_path):
    mirror = tmp_path / "niah"
    (mirror / RETRIEVAL_HEAD_NEEDLES).parent.mkdir(parents=True)
    shutil.copyfile(shared_data / "retrieval-head" / "needles.jsonl", mirror / RETRIEVAL_HEAD_NEEDLES)
    reference = [json.loads(line)["real_needle"] for line in (mirror / RETRIEVAL_HEAD_NEEDLES).open()]
    seen = set()
    for split in SPLITS:  # at most 12 built-in + 3 reference facts per split: 15 samples use each one
        spec = SynthSpec("natural_in_prose", 3, (1,), 15, split=split, reference_needles=True)
        rows, info = generate(spec, {**meta, "niah_mirror": str(mirror)})
        assert info["needles_data_files"][RETRIEVAL_HEAD_NEEDLES] == RETRIEVAL_HEAD.files[RETRIEVAL_HEAD_NEEDLES].sha256
        seen |= {r["answers"][0] for r in rows}
    assert set(reference) <= seen and len(seen) == len(NATURAL_FACTS) + len(reference)
