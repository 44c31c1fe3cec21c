"""FLenQA data: the fixture's schema, fixture detection, prompts byte for byte, ordering and filters."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from harness_ext.core.errors import NeedlesError
from harness_ext.data.sources import FIXTURE_MARKER, FLENQA_FILE
from harness_ext.tasklib.flenqa import COLUMNS, flenqa_dataset, render_prompt
from harness_ext.tasklib.flenqa_fixture import DISPERSIONS, PADDING_TYPES, write_fixture

OPT_IN = {"allow_unofficial_data": True}
Q = "\u2019"  # the CoT prompts' typographic apostrophe


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flenqa-fixture")
    write_fixture(out, ctx_sizes=(250, 500, 1000), instances=4, seed=0)
    return out


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("NEEDLES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the hub here
    for var in ("NEEDLES_FLENQA_MIRROR", "NEEDLES_ALLOW_UNOFFICIAL_DATA"):
        monkeypatch.delenv(var, raising=False)


def test_fixture_has_the_dataset_schema(fixture_dir):
    table = pq.read_table(fixture_dir / FLENQA_FILE)
    assert set(COLUMNS) <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["dataset"] for r in rows} == {"MonoRel", "PIR", "Simplified RuleTaker"}
    assert {r["label"] for r in rows} == {"True", "False"}
    assert {r["padding_type"] for r in rows} == set(PADDING_TYPES)
    assert {r["dispersion"] for r in rows} == set(DISPERSIONS)
    assert {r["ctx_size"] for r in rows} == {250, 500, 1000}
    assert len({r["global_sample_id"] for r in rows}) == len(rows)
    for r in rows:  # the key facts are in the mixin, which grows with ctx_size
        assert all(f in r["mixin"] for f in r["facts"])
        assert 0.5 * r["ctx_size"] < len(r["mixin"].split()) < 1.2 * r["ctx_size"]
    assert b"needles_fixture" in table.schema.metadata


def test_fixture_needs_opt_in_and_is_marked(fixture_dir, tmp_path):
    with pytest.raises(NeedlesError, match="allow_unofficial_data"):
        flenqa_dataset(flenqa_task="pir", flenqa_mirror=str(fixture_dir))
    # the stamp inside the parquet file is enough, even without the folder's marker file
    bare = tmp_path / "bare"
    shutil.copytree(fixture_dir, bare)
    (bare / FIXTURE_MARKER).unlink()
    with pytest.raises(NeedlesError, match="fixture"):
        flenqa_dataset(flenqa_task="pir", flenqa_mirror=str(bare))
    ds = flenqa_dataset(flenqa_task="pir", flenqa_mirror=str(bare), **OPT_IN)
    assert ds.needles_info["needles_data_official"] is False
    assert ds.needles_info["needles_alias_marks"] == ["NON-OFFICIAL DATA: fixture"]


def test_missing_data_offline_is_a_clear_error():
    with pytest.raises(NeedlesError, match="HF_HUB_OFFLINE"):
        flenqa_dataset(flenqa_task="pir")


def test_rows_interleave_ctx_sizes_and_filters_apply(fixture_dir):
    ds = flenqa_dataset(flenqa_task="monorel", flenqa_mirror=str(fixture_dir), **OPT_IN)["test"]
    assert len(ds) == 4 * 3 * len(PADDING_TYPES) * len(DISPERSIONS)
    assert [d["ctx_size"] for d in ds.select(range(6))] == [250, 500, 1000] * 2
    assert {d["dataset"] for d in ds} == {"MonoRel"}
    small = flenqa_dataset(
        flenqa_task="pir",
        flenqa_ctx_sizes=[500],
        flenqa_padding_types=["books"],
        flenqa_dispersions=["first", "last"],
        flenqa_mirror=str(fixture_dir),
        **OPT_IN,
    )["test"]
    assert {(d["ctx_size"], d["padding_type"]) for d in small} == {(500, "books")} and len(small) == 4 * 2
    with pytest.raises(NeedlesError, match="no FLenQA"):
        flenqa_dataset(flenqa_task="pir", flenqa_ctx_sizes=[3000], flenqa_mirror=str(fixture_dir), **OPT_IN)
    reseeded = flenqa_dataset(flenqa_task="monorel", flenqa_order_seed=3, flenqa_mirror=str(fixture_dir), **OPT_IN)
    assert [d["global_sample_id"] for d in reseeded["test"]] != [d["global_sample_id"] for d in ds]


# Expected prompts, written out from PAPERS.md section 3 (typos and U+2019 included).
def _expected(task: str, cot: bool, q: str, rule: str, mixin: str) -> str:
    if task == "ruletaker" and not cot:
        return (
            f"Answer whether the statement {q} can be derived from the rule and the facts. Answer with either "
            f'"True" or "False".\nRule: {rule}\nFacts: {mixin}\nAnswer with either "True or "False".\n'
        )
    if task == "ruletaker":
        return (
            f"Answer whether the statement {q} can be derived from the rule and the facts.\nShow your steps then "
            f'answer with either "True" or "False".\nRule: {rule}\nFacts: {mixin}\nAnswer with either "True or '
            '"False". Let\'s work this out in a step by step way to be sure we have the right answer.\n'
        )
    if task == "pir" and not cot:
        return f"{mixin}\nTrue/False Question: {q}\nAnswer only True or False.\n"
    if task == "pir":
        return (
            f"Show your steps then answer with {Q}true{Q} or {Q}false{Q}.\n{mixin}\nTrue/False Question: {q}\n"
            f"Let{Q}s work this out in a step by step way to\nbe sure we have the right answer.\n"
        )
    head = (
        f"Here are some facts. Answer the exact following question based on the text: {q} Answer the question "
        "as it appears exactly.\n"
    )
    if not cot:
        return f"{head}{mixin}\n{q}\nAnswer only True or False.\n"
    return (
        f"{head}Show your steps then answer with {Q}true{Q} or {Q}false{Q}.\n{mixin}\n{q}\nLet{Q}s work this out "
        "in a step by step way to be sure we have the right answer. Show your work and finally answer with "
        f"{Q}true{Q} or {Q}false{Q}. The final step should include the exact text of the question and the answer.\n"
    )


@pytest.mark.parametrize("task", ["monorel", "pir", "ruletaker"])
@pytest.mark.parametrize("cot", [False, True])
def test_prompts_match_the_reference_byte_for_byte(fixture_dir, task, cot):
    ds = flenqa_dataset(flenqa_task=task, flenqa_cot=cot, flenqa_mirror=str(fixture_dir), **OPT_IN)["test"]
    for doc in ds.select(range(3)):
        assert render_prompt(doc) == _expected(task, cot, doc["question"], str(doc["rule"]), doc["mixin"])


def test_prompt_fields_are_rendered_like_the_reference_fstrings():
    doc = {"question": "Is {x} true?", "rule": None, "mixin": "a\u2019b", "prompt_template": "flenqa/pir.jinja"}
    assert render_prompt(doc) == "a\u2019b\nTrue/False Question: Is {x} true?\nAnswer only True or False.\n"
    doc = dict(doc, rule=["r1", "r2"], prompt_template="flenqa/ruletaker.jinja")
    assert "\nRule: ['r1', 'r2']\n" in render_prompt(doc)  # str() of a list, as an f-string would print it
