"""The continuation-loss family: scoring and aggregation, exact cuts, held-out text, determinism, text options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from other_process import dataset_in_another_process

from harness_ext.core.errors import NeedlesError
from harness_ext.core.tokenizers import load_tokenizer
from harness_ext.data.sources import RETRIEVAL_HEAD_HAYSTACK
from harness_ext.tasklib.breakdowns import parse_name
from harness_ext.tasklib.long_ppl import check_plain_prompt, long_ppl_dataset, perplexity_of, process_results
from harness_ext.tasklib.long_ppl_text import BOOK_PART
from harness_ext.tasklib.niah_haystack import extract_text
from harness_ext.tasklib.token_budget import count_plain, count_tokens

TASK = "needles_long_ppl"
SMALL = {"long_ppl_contexts": [300, 64, 1000], "long_ppl_continuation": 32, "long_ppl_num_docs": 3}


@pytest.fixture(scope="module")
def meta(smollm2_dir, shared_data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEEDLES_CACHE_DIR", str(tmp_path_factory.mktemp("long-ppl-cache")))
        mp.delenv("NEEDLES_NIAH_MIRROR", raising=False)
        yield {**SMALL, "pretrained": str(smollm2_dir), "niah_mirror": str(shared_data / "retrieval-head")}


@pytest.fixture(scope="module")
def dataset(meta):
    return long_ppl_dataset(TASK, meta)


@pytest.fixture(scope="module")
def rows(dataset):
    return dataset["test"].to_list()


def _book(shared_data: Path, rel: str) -> str:
    return extract_text((shared_data / "retrieval-head" / rel).read_bytes().decode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------------- scoring
def test_nll_and_perplexity_of_one_document():
    doc = {"continuation_tokens": 128, "context_tokens": 4096}
    out = process_results(doc, [(-256.0, False)])
    assert out["nll"] == out["nll_len4096"] == 2.0
    assert out["ppl"] == out["ppl_len4096"] == pytest.approx(math.exp(2.0))
    assert set(out) == {"nll", "ppl", "nll_len4096", "ppl_len4096"}
    assert (parse_name("nll_len4096").base, parse_name("nll_len4096").length) == ("nll", 4096)


def test_aggregates_are_total_nll_over_total_tokens():
    lls, tokens = [-100.0, -300.0, -50.0], 50  # three documents of 50 scored tokens each
    per_doc = [process_results({"continuation_tokens": tokens, "context_tokens": 64}, [(ll, False)]) for ll in lls]
    total = -sum(lls) / (tokens * len(lls))  # 450 nats / 150 tokens = 3.0
    assert sum(d["nll"] for d in per_doc) / len(per_doc) == pytest.approx(total)
    assert perplexity_of([d["ppl"] for d in per_doc]) == pytest.approx(math.exp(total))
    assert perplexity_of([d["ppl"] for d in per_doc]) < sum(d["ppl"] for d in per_doc) / 3  # not the mean of ppls


# ---------------------------------------------------------------------------------- rows
def test_cuts_have_exact_token_counts(rows, smollm2_dir):
    tok = load_tokenizer(str(smollm2_dir))
    assert len(rows) == 3 * 3 and [r["context_tokens"] for r in rows[:3]] == [64, 300, 1000]
    assert count_tokens(tok, [r["context"] for r in rows]) == [r["context_tokens"] for r in rows]
    whole = count_plain(tok, [r["context"] + r["continuation"] for r in rows])
    alone = count_plain(tok, [r["context"] for r in rows])
    assert [int(w - a) for w, a in zip(whole, alone, strict=True)] == [32] * len(rows)
    assert all(r["continuation"].startswith(" ") and not r["context"][-1].isspace() for r in rows)


def test_documents_share_their_continuation_and_read_the_held_out_part(rows, shared_data):
    book = _book(shared_data, BOOK_PART)
    by_doc: dict = {}
    for r in rows:
        by_doc.setdefault(r["doc"], []).append(r)
        at = r["continuation_start"]
        assert (
            book[r["context_start"] : at] == r["context"]
            and book[at : at + len(r["continuation"])] == r["continuation"]
        )
        assert r["source"] == BOOK_PART
    starts = sorted(group[0]["continuation_start"] for group in by_doc.values())
    for group in by_doc.values():
        assert len({r["continuation"] for r in group}) == 1  # the same scored text at every P
        contexts = sorted((r["context"] for r in group), key=len)
        assert all(longer.endswith(shorter) for shorter, longer in zip(contexts, contexts[1:]))
    assert all(b - a > 100 for a, b in zip(starts, starts[1:]))  # disjoint continuations
    others = _book(shared_data, RETRIEVAL_HEAD_HAYSTACK[0]) + _book(shared_data, RETRIEVAL_HEAD_HAYSTACK[1])
    assert BOOK_PART == RETRIEVAL_HEAD_HAYSTACK[-1]
    assert all(r["continuation"] not in others for r in rows)


def test_rows_are_byte_identical_in_another_process(meta, rows, dataset, tmp_path):
    builder = "harness_ext.tasklib.long_ppl:long_ppl_dataset"
    other = dataset_in_another_process(builder, "needles_long_ppl", meta, tmp_path / "other-cache", "11")
    assert json.dumps(other["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)
    assert other["sha"] == dataset.needles_info["needles_data_sha256"]
    info = dataset.needles_info
    assert info["needles_data_official"] is True and info["needles_alias_marks"] == []
    assert list(info["needles_data_files"]) == [BOOK_PART]


# ---------------------------------------------------------------------------------- other texts
def test_user_files_and_pg19_mirror(meta, shared_data, tmp_path):
    book = _book(shared_data, BOOK_PART)
    half = len(book) // 2
    cut = book.index(" ", half)
    (tmp_path / "a.txt").write_text(book[:cut], encoding="utf-8")
    (tmp_path / "b.txt").write_text(book[cut:], encoding="utf-8")
    base = {k: v for k, v in meta.items() if k != "niah_mirror"}
    own = long_ppl_dataset(TASK, {**base, "long_ppl_files": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]})
    got = own["test"].to_list()
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    assert [r["source"] for r in got[::3]] == [a, b, a]  # documents round-robin over the files
    assert own.needles_info["needles_alias_marks"] == ["own text: 2 files"]
    assert own.needles_info["needles_data_official"] is False

    (tmp_path / "pg19" / "test").mkdir(parents=True)
    (tmp_path / "pg19" / "test" / "10.txt").write_text(book, encoding="utf-8")
    pg19 = long_ppl_dataset(TASK, {**base, "long_ppl_text": "pg19", "long_ppl_pg19_mirror": str(tmp_path / "pg19")})
    assert {r["source"] for r in pg19["test"].to_list()} == {"test/10.txt"}
    assert pg19.needles_info["needles_alias_marks"] == ["pg19 test, unpinned mirror"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"long_ppl_contexts": [40000]}, r"room for 0 of 3 documents .* \(longest text: \d+ tokens\)"),
        ({"long_ppl_num_docs": 1000}, "room for"),
        ({"long_ppl_contexts": [8]}, "long_ppl_contexts"),
        ({"long_ppl_contexts": [64, 64]}, "repeats a length"),
        ({"long_ppl_context": [64]}, 'did you mean "long_ppl_contexts"'),
        ({"long_ppl_text": "files"}, "names none"),
        ({"long_ppl_text": "pg19"}, "long_ppl_pg19_mirror"),
        ({"long_ppl_files": ["/nonexistent/x.txt"]}, "is not a file"),
    ],
)
def test_bad_metadata_and_too_little_text_are_refused(meta, extra, message, monkeypatch):
    monkeypatch.delenv("NEEDLES_PG19_MIRROR", raising=False)
    with pytest.raises(NeedlesError, match=message):
        long_ppl_dataset(TASK, {**meta, **extra})


def test_tokenizer_is_required():
    with pytest.raises(NeedlesError, match="needs its tokenizer"):
        long_ppl_dataset(TASK, dict(SMALL))


@pytest.mark.parametrize(
    "fewshot,system,chat,flags",
    [(0, None, True, "--apply_chat_template"), (2, "Be brief.", False, "--system_instruction, --num_fewshot 2")],
)
def test_text_before_the_context_is_refused(fewshot, system, chat, flags):
    check_plain_prompt(TASK, 0, None, False)  # the plain prompt passes
    with pytest.raises(NeedlesError, match=f"{flags} would add text before it") as err:
        check_plain_prompt(TASK, fewshot, system, chat)
    assert "run needles_long_ppl without" in err.value.fix
